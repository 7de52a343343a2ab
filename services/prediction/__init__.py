"""ETA prediction service: online features from Redis + a LightGBM quantile model → ETA range."""
