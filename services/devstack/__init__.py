"""Local stack for ``make run`` and the integration tests: real servers from Python wheels, no Docker."""
