"""Training and scoring: ``geoseg train`` (chips, Ray Train loop, held-out evaluation), synthetic
scenes with exact ground truth, and the scores (instance matching, seam index) tests and the demo
use."""
