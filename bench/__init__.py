"""Benchmarks for geoseg: pipeline ceiling and memory, U-Net vs the model alone and geoai-py, driver CPU,
start-up, a 1.3-gigapixel real raster, instance post-processing, and a GPU section (``bench.gpu``).

Run ``make bench`` (``python -m bench.run --out bench/results.json``); see ``bench/README.md``.
"""
