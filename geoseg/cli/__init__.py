"""The ``geoseg`` command (``main``: run, synth, train) over the Python API."""
