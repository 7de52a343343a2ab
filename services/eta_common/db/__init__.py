"""PostgreSQL (offline store): connection pool, migrations, event archive, model registry."""
