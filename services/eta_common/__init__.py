"""Shared internal package: what every ETA-platform service needs.

- :mod:`eta_common.config`: typed settings from environment variables with documented defaults.
- :mod:`eta_common.logs`: structured (JSON) logging.
- :mod:`eta_common.telemetry`: OpenTelemetry setup and trace-context propagation (gRPC, Kafka headers).
- :mod:`eta_common.grpc_server`: aio gRPC server bootstrap (health, reflection, SIGTERM drain).
- :mod:`eta_common.kafka`: topics, keys, producer/consumer factories.
- :mod:`eta_common.online_store`: the Redis key layout, the update scripts and the pipelined reads.
- :mod:`eta_common.feature_block`: a read's features as flat rows (what the serving path scores).
- :mod:`eta_common.features`: feature definitions shared by the online and offline paths.
- :mod:`eta_common.db`: PostgreSQL pool, migrations, event archive, model registry.
"""
