"""Benchmarks for geoseg: bounded driver memory, throughput vs the model alone, instance post-processing.

Run ``make bench`` (``python -m bench.run --out bench/results.json``); see ``bench/README.md``.
"""
