"""Comparing two runs' outputs of one scene (tests that disturb a run check it against an
undisturbed one). Imported by the tests as ``helpers.outputs``."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio


def same_instances(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renumbering: the same pixels are objects and the id map is one-to-one."""
    if not ((a > 0) == (b > 0)).all():
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def wkb_set(gpkg: Path, layer: str) -> list[bytes]:
    """A layer's geometries, normalised, as sorted WKB (equal sets whatever the feature order)."""
    return sorted(g.normalize().wkb for g in gpd.read_file(gpkg, layer=layer).geometry)


def assert_same_scene(a: Path, b: Path, stem: str, tasks: dict[str, str]) -> dict[str, int]:
    """Scene folders ``a`` and ``b`` hold equal outputs: summaries' counts and areas, masks on the
    same grid (class masks byte-equal, instance masks up to renumbering), every layer's polygons.
    ``tasks``: head name -> ``semantic`` or ``instance``. Returns the features per layer."""
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["models"] == sb["models"], stem
    assert sa["valid_pixels"] == sb["valid_pixels"] and sa["tiles"] == sb["tiles"], stem
    features = {}
    for head, task in tasks.items():
        with rasterio.open(a / f"{stem}_{head}.tif") as x, rasterio.open(b / f"{stem}_{head}.tif") as y:
            assert x.transform == y.transform and x.crs == y.crs and x.shape == y.shape, (stem, head)
            xa, ya = x.read(1), y.read(1)
        if task == "semantic":
            assert xa.tobytes() == ya.tobytes(), (stem, head)
        else:
            assert same_instances(xa, ya), (stem, head)
        wa, wb = wkb_set(a / f"{stem}.gpkg", head), wkb_set(b / f"{stem}.gpkg", head)
        assert wa == wb, (stem, head, len(wa), len(wb))
        features[head] = len(wa)
    return features
