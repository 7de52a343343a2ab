"""ETA prediction service: online features from Redis + a LightGBM quantile model → ETA range.

``eta.v1.EtaService`` answers ``PredictEta`` (one restaurant) and ``PredictEtaBatch`` (up to
``PREDICTION_MAX_BATCH`` = 100 restaurants to one customer, for a home feed). Every answer has a point
estimate and a p10–p90 range, the model version, every feature the model used with its age, the
features that were stale or missing, and why the answer is degraded if it is.

Modules: :mod:`~prediction.config` (settings), :mod:`~prediction.server` (the servicer),
:mod:`~prediction.reader` (the one-round-trip feature read with its time budget and circuit breaker),
:mod:`~prediction.redis_client` (the lean pipelined Redis client), :mod:`~prediction.inference` and
:mod:`~prediction.models` (in-process scoring, hot reload), :mod:`~prediction.admission` (load
shedding, per-RPC latency, readiness), :mod:`~prediction.prediction_log` (served predictions →
PostgreSQL), :mod:`~prediction.metrics`.

Fallbacks (what is used when something is missing, and why)
-----------------------------------------------------------
=============================  ===========================================================================
situation                      what the answer uses, and how it says so
=============================  ===========================================================================
a feature absent in Redis      its documented default (``eta_common.features.DEFAULTS``): 0 for the order
                               counts, orders in the kitchen and the busy flag (no recorded activity
                               means none), NaN for the mean prep time and the free-driver count (no
                               data is not "zero minutes"/"zero drivers"; LightGBM routes NaN the way it
                               learnt for missing values). Listed in ``missing_features``; quality MISSING.
a feature older than its       the value as read (it is still the best estimate); listed in
budget                         ``stale_features``; quality STALE (budgets: ``PREDICTION_STALENESS_*``).
Redis down / erroring          every online feature = its default, the request-time features (distance,
                               hour) as usual; degradation ``ONLINE_STORE_UNAVAILABLE``.
Redis slow                     after ``min(PREDICTION_REDIS_TIMEOUT_MS, deadline − reserve)``: the same
                               defaults; degradation ``ONLINE_STORE_TIMEOUT``. Repeated failures open a
                               circuit (``PREDICTION_REDIS_FAILURES_TO_OPEN``) so later calls answer at
                               once without waiting, until a probe after the backoff succeeds.
no registry model yet          (or the registry unreachable at start) ``heuristic-v0``: 10 min + 2.5 min/km
                               + 2 min per order in the kitchen, range ±35 %; degradation
                               ``HEURISTIC_MODEL``. The registry is polled and the model installed as soon
                               as one is promoted.
the model raises               the heuristic answers (``HEURISTIC_MODEL``), if allowed.
PostgreSQL down                predictions are served as usual; their log rows are dropped and counted.
=============================  ===========================================================================

Errors are only for what cannot be answered: INVALID_ARGUMENT (bad request, field by field),
RESOURCE_EXHAUSTED (overloaded: ``PREDICTION_MAX_IN_FLIGHT``), DEADLINE_EXCEEDED (the deadline leaves
less than ``PREDICTION_DEADLINE_RESERVE_MS`` to answer), UNAVAILABLE with the reason (no model and
``PREDICTION_HEURISTIC_FALLBACK=false``, the only case in which health is NOT_SERVING).
"""
