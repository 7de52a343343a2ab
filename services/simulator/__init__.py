"""City simulator: restaurants, drivers and customers producing ``eta.v1`` events.

* :mod:`simulator.city` — :class:`~simulator.city.CityConfig` (every model parameter), entities, random model
* :mod:`simulator.engine` — the discrete-event engine (:class:`~simulator.engine.CitySimulation`)
* :mod:`simulator.markets` — several markets (cities) at once (:class:`~simulator.markets.Platform`)
* :mod:`simulator.oracle` — the expected delivery time given the true hidden state
* :mod:`simulator.seed` — history into PostgreSQL (:func:`~simulator.seed.seed_history`)
* :mod:`simulator.live` — real-time traffic through the ingestion API (:func:`~simulator.live.run_live`)
* :mod:`simulator.publisher` — batching, retrying PublishEvents client
* :mod:`simulator.messages` — the ``eta.v1.Event`` builders; :mod:`simulator.progress` — the progress line

See README.md next to this file for the model, the CLI and measured figures.
"""

from simulator.city import CityConfig
from simulator.engine import CitySimulation, OrderOutcome
from simulator.live import LIVE_DEMAND_MULTIPLIER, LiveStats, run_live
from simulator.markets import Platform, market_configs, parse_markets
from simulator.seed import SeedStats, seed_history

__all__ = [
    "LIVE_DEMAND_MULTIPLIER",
    "CityConfig",
    "CitySimulation",
    "LiveStats",
    "OrderOutcome",
    "Platform",
    "SeedStats",
    "market_configs",
    "parse_markets",
    "run_live",
    "seed_history",
]
