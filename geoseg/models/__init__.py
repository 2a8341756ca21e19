"""Models and inference: loading a head's network from its contract, normalising and running it on
batches of windows, blending windows into tiles, and decoding probabilities into classes and
objects. Knows torch, not Ray."""
