"""Ingestion service: validates app-backend events and publishes them to Kafka, answering per event.

Modules, in the order a request meets them:

- :mod:`ingestion.server` — the gRPC surface: decoding, batch limits, the in-flight budget
  (:mod:`ingestion.budget`), deadlines, and the StreamEvents protocol (ordered, windowed answers);
- :mod:`ingestion.pipeline` — one batch from request to answer: validate → dedup → Kafka → statuses;
- :mod:`ingestion.validation` — the validation rules (pure functions);
- :mod:`ingestion.dedup` — idempotency by event_id across replicas (Redis, two-state claims);
- :mod:`ingestion.publisher` — the hand-off to the Kafka producer and its acknowledgements, with spans;
- :mod:`ingestion.probes` — plaintext health checks for Kubernetes when the API port speaks TLS;
- :mod:`ingestion.config`, :mod:`ingestion.metrics`, ``__main__`` (wiring; auth and TLS come from
  :mod:`eta_common.auth`).
"""
