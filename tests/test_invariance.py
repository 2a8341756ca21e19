"""Tiling invariance through the real pipeline (Ray, GeoTIFF, GeoPackage) against synthetic truth.

The oracle models are context-free (each pixel decided alone), so every tile size and halo must
give the same bytes, the same polygons and the same counts, and all must equal the scene's truth.
"""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely

from geoseg.core.config import load_config
from geoseg.runner.pipeline import run

TILINGS = [(t, h) for t in (256, 512, 1024) for h in (0, 32, 128)]
_reference: dict[str, object] = {}


def _normalised(geoms) -> list[bytes]:
    return sorted(shapely.to_wkb(shapely.normalize(g)) for g in geoms)


def _match(found: gpd.GeoDataFrame, truth: gpd.GeoDataFrame) -> np.ndarray:
    """IoU of each truth object with its best-overlapping found object (0 if none)."""
    tree = shapely.STRtree(found.geometry.values)
    t_idx, f_idx = tree.query(truth.geometry.values, predicate="intersects")
    a, b = truth.geometry.values[t_idx], found.geometry.values[f_idx]
    iou = shapely.area(shapely.intersection(a, b)) / shapely.area(shapely.union(a, b))
    best = np.zeros(len(truth))
    np.maximum.at(best, t_idx, iou)
    return best


@pytest.mark.parametrize("tile,halo", TILINGS)
def test_tiling_invariance_against_truth(ray_session, synth_scene, oracle_config_path, tmp_path, tile, halo):
    config = load_config(
        oracle_config_path, {"tiling": {"tile_size": tile, "halo": halo}, "runtime": {"batch_size": 4}}
    )
    report = run([str(synth_scene)], tmp_path, config, progress=False)
    assert report.ok, report.failures
    out = tmp_path / "scene"
    truth_dir = synth_scene.with_suffix(".truth")

    with rasterio.open(out / "scene_landuse.tif") as got, rasterio.open(truth_dir / "landuse.tif") as want:
        landuse = got.read(1)
        assert (landuse == want.read(1)).all()
        assert got.crs == want.crs and got.transform == want.transform
    summary = json.loads((out / "summary.json").read_text())
    for name, layer in (("buildings", "buildings"), ("ships", "ships")):
        found = gpd.read_file(out / "scene.gpkg", layer=name)
        truth = gpd.read_file(truth_dir / "objects.gpkg", layer=layer)
        assert len(found) == len(truth) == summary["models"][name]["classes"][name[:-1]]["count"]
        assert (_match(found, truth) >= 0.9).all()
        with rasterio.open(out / f"scene_{name}.tif") as ds:
            ids = ds.read(1)
        assert set(np.unique(ids)) - {0} == set(found["instance_id"])
        key = f"{name}-polygons"
        polys = _normalised(found.geometry.values)
        if key in _reference:  # identical across tilings (ids up to renumbering)
            assert polys == _reference[key]
            pairs = set(zip(_reference[f"{name}-ids"].ravel().tolist(), ids.ravel().tolist()))
            assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs)
        else:
            _reference[key], _reference[f"{name}-ids"] = polys, ids
    regions = _normalised(gpd.read_file(out / "scene.gpkg", layer="landuse").geometry.values)
    assert _reference.setdefault("landuse-regions", regions) == regions


def test_scene_holds_the_hard_cases(synth_scene):
    """The invariance test means something only if the scene has seam, corner and giant objects."""
    truth = gpd.read_file(synth_scene.with_suffix(".truth") / "objects.gpkg", layer="buildings")
    with rasterio.open(synth_scene) as ds:
        t = ds.transform
    to_pixels = lambda xy: np.column_stack([(xy[:, 0] - t.c) / t.a, (xy[:, 1] - t.f) / t.e])  # noqa: E731
    boxes = [shapely.bounds(shapely.transform(g, to_pixels)) for g in truth.geometry.values]
    assert any(x1 - x0 > 1024 for x0, _, x1, _ in boxes)  # longer than the largest tile
    for k in (256, 512, 1024):  # a four-tile corner inside an object, for each tile size
        assert any(x0 < k < x1 and y0 < k < y1 for x0, y0, x1, y1 in boxes)


def test_three_channel_decoding_separates_touching_buildings(ray_session, tmp_path, oracle_config_path):
    from geoseg.train.synth import write_scene

    scene = tmp_path / "pairs" / "pairs.tif"
    scene.parent.mkdir()
    objects = write_scene(scene, size=512, seed=5, touching_pairs=6, nodata_corner=False)
    pairs = sum(o.contact is not None for o in objects) // 2
    assert pairs >= 3
    counts = {}
    for channels, factory in (
        (["body"], "geoseg.train.synth:oracle_buildings"),
        (["body", "border", "contact"], "geoseg.train.synth:oracle_buildings_3ch"),
    ):
        import yaml

        cfg = yaml.safe_load(oracle_config_path.read_text())
        cfg["models"] = {"buildings": {**cfg["models"]["buildings"], "channels": channels, "factory": factory}}
        cfg["tiling"] = {"tile_size": 256, "halo": 32}
        path = tmp_path / f"{len(channels)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = tmp_path / f"out{len(channels)}"
        assert run([str(scene)], out, load_config(path), progress=False).ok
        counts[len(channels)] = len(gpd.read_file(out / "pairs" / "pairs.gpkg", layer="buildings"))
    truth = len(gpd.read_file(scene.with_suffix(".truth") / "objects.gpkg", layer="buildings"))
    assert counts[3] == truth
    assert counts[1] == truth - pairs  # one channel merges each touching pair
