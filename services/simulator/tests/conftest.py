from __future__ import annotations

import pytest

from simulator.city import CityConfig
from simulator.tests.helpers import DAY_MS, MONDAY, Run, simulate


@pytest.fixture(scope="session")
def day_run() -> Run:
    """One simulated Monday with the default city."""
    return simulate(CityConfig(), MONDAY, DAY_MS)
