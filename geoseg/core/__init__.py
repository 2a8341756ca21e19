"""What every layer shares and nothing in geoseg sits under: the run configuration and a model's
input contract, errors, ground units (metres in any CRS), storage (local folders and S3) and tile
checkpoints. Knows neither Ray nor torch."""
