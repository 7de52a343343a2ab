"""Ingestion service: validates app-backend events and publishes them to Kafka."""
