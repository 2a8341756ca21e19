"""geoseg: large GeoTIFFs -> seam-free land-use masks, object polygons and counts, on Ray."""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and editors; at run time loaded on first use (__getattr__)
    from geoseg.api import run
    from geoseg.results import open_run

__all__ = ["__version__", "open_run", "run"]
# Loaded on first use, so that `import geoseg` stays light (no Ray, torch or GDAL).
_LAZY = {"run": "geoseg.api", "open_run": "geoseg.results"}


def __getattr__(name: str):  # noqa: ANN202 (PEP 562)
    """``geoseg.run(inputs, out, config=None, **overrides)`` and ``geoseg.open_run(out)``."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geoseg' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
