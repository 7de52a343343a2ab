"""Trainer: PostgreSQL history → point-in-time training set → LightGBM quantile models → registry."""
