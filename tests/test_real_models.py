"""The example real-sensor models through the whole pipeline on real scenes (issue 3's real-data check).

Their detections are weak (see docs/models.md); what is asserted here is what must hold whatever the
model: polygons and instance rasters on the input's grid and CRS, ids that agree, counts that agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
import yaml

from geoseg.core.config import load_config
from geoseg.runner.pipeline import run

REPO = Path(__file__).resolve().parents[1]

CASES = [
    ("ships", "s2-ships", "sen2ships/honolulu/honolulu_rgb.tiff"),
    ("buildings", "spacenet-buildings", "spacenet_atlanta/sample_geotiff.tif"),
]


@pytest.mark.parametrize("head,model,scene", CASES)
def test_example_model_gives_georeferenced_objects(ray_session, shared_data, tmp_path, head, model, scene):
    scene = shared_data / scene
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"tiling": {"tile_size": 256, "halo": 32}, "models": {head: {"weights": str(REPO / "models" / model)}}}
        )
    )
    report = run([str(scene)], tmp_path / "out", load_config(cfg), progress=False)
    assert report.ok, report.failures
    out = tmp_path / "out" / scene.stem
    with rasterio.open(scene) as src, rasterio.open(out / f"{scene.stem}_{head}.tif") as ids_ds:
        assert (ids_ds.crs, ids_ds.transform, ids_ds.shape) == (src.crs, src.transform, src.shape)
        ids = ids_ds.read(1)
        bounds = shapely.box(*src.bounds)
        crs = src.crs
    info = pyogrio.read_info(out / f"{scene.stem}.gpkg", layer=head)
    assert rasterio.crs.CRS.from_user_input(info["crs"]) == crs
    _, _, wkb, fields = pyogrio.raw.read(out / f"{scene.stem}.gpkg", layer=head, columns=["instance_id"])
    geoms = shapely.from_wkb(wkb)
    assert len(geoms) > 0 and all(bounds.covers(g) for g in geoms)
    assert set(fields[0].tolist()) == set(np.unique(ids).tolist()) - {0}
    summary = json.loads((out / "summary.json").read_text())
    cls = next(iter(summary["models"][head]["classes"].values()))
    assert cls["count"] == len(geoms) and cls["pixels"] == int((ids > 0).sum())
