"""Scores against truth: pixel IoU per class, instance P/R/F1 at IoU 0.5 (rasters and polygons),
and ``score_synthetic`` on a ``geoseg run`` of a synthetic scene (the oracle models score 1.0)."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from geoseg.train.evaluate import (
    confusion,
    distinct_outlines,
    format_scores,
    match_instances,
    match_polygons,
    score_synthetic,
    semantic_scores,
)


def test_confusion_and_iou():
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 255]])
    cm = confusion(pred, truth, 3)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 1], [1, 0, 1, 0]]  # the 255 prediction: a miss of class 1
    s = semantic_scores(cm, ["a", "b", "c"])
    assert s["iou"] == {
        "a": pytest.approx(1 / 3, abs=1e-4),
        "b": pytest.approx(2 / 4, abs=1e-4),
        "c": pytest.approx(1 / 2),
    }
    assert s["pixels"] == 7 and s["pixel_accuracy"] == pytest.approx(4 / 7, abs=1e-4)
    assert semantic_scores(np.zeros((2, 3), int), ["x", "y"])["iou"] == {"x": None, "y": None}


def test_instance_matching_at_iou_half():
    truth = np.zeros((10, 10), int)
    truth[0:4, 0:4] = 1  # found exactly
    truth[6:10, 6:10] = 2  # overlapped at IoU 4/16 < 0.5: a miss and a false positive
    truth[0:2, 8:10] = 3  # missed
    pred = np.zeros_like(truth)
    pred[0:4, 0:4] = 7
    pred[6:10, 9:10] = 9
    pred[6:10, 6:8] = 0
    m = match_instances(pred, truth)
    assert (m["matched"], m["predicted"], m["truth"]) == (1, 2, 3)
    assert m["precision"] == 0.5 and m["recall"] == pytest.approx(1 / 3, abs=1e-4)
    polys = match_polygons(
        [shapely.box(0, 0, 4, 4), shapely.box(9, 6, 10, 10)],
        [shapely.box(0, 0, 4, 4), shapely.box(6, 6, 10, 10), shapely.box(8, 0, 10, 2)],
    )
    assert {k: polys[k] for k in ("matched", "predicted", "truth")} == {"matched": 1, "predicted": 2, "truth": 3}
    assert match_instances(np.zeros((3, 3)), np.zeros((3, 3)))["f1"] == 1.0  # nothing to find, nothing found


def test_oracle_run_scores_perfectly_against_synthetic_truth(ray_session, tmp_path, oracle_config_path):
    from geoseg.core.config import load_config
    from geoseg.runner.pipeline import run
    from geoseg.train.synth import write_scene

    scene = tmp_path / "s.tif"
    objects = write_scene(scene, size=512, seed=4, touching_pairs=0)
    config = load_config(oracle_config_path, {"tiling": {"tile_size": 256, "halo": 16}})
    report = run([str(scene)], tmp_path / "out", config, progress=False)
    assert report.ok, report.failures
    scores = score_synthetic(tmp_path / "out" / "s", scene.with_suffix(".truth"))
    assert scores["landuse"]["mean_iou"] == 1.0 and scores["landuse"]["pixel_accuracy"] == 1.0
    for head, kind in (("buildings", "building"), ("ships", "ship")):
        assert scores[head]["f1"] == 1.0, scores[head]
        assert 0 < scores[head]["truth"] <= sum(o.kind == kind for o in objects)
    text = format_scores(scores)
    assert "landuse: mean IoU 1.0" in text and "buildings:" in text and "F1 1.000 at IoU 0.5" in text


def test_distinct_outlines_drops_repeats_only():
    """A building given twice is one object; neighbours that touch or overlap a little stay."""
    a = shapely.box(0, 0, 10, 10)
    copy = shapely.box(0, 0, 10, 10.05)  # the same outline, digitised again (IoU 0.995)
    neighbour = shapely.box(9, 0, 19, 10)  # overlaps a by 10 %
    inside = shapely.box(2, 2, 4, 4)  # a small building within a larger outline: a different object
    assert distinct_outlines([a, copy, neighbour, inside]) == [a, neighbour, inside]


def test_distinct_outlines_on_osm_agree_with_burning(shared_data):
    """On HOT's Kathmandu outlines, the outlines kept are those that still own pixels when
    ``geoseg train`` burns them one by one (first come, first kept) on a 0.3 m grid."""
    import geopandas as gpd
    from rasterio.features import rasterize
    from rasterio.transform import from_origin

    outlines = gpd.read_file(shared_data / "hotosm_buildings" / "kathmandu_buildings.geojson").to_crs(3857)
    x0, y0, x1, y1 = outlines.total_bounds
    shape = (int((y1 - y0) / 0.3) + 1, int((x1 - x0) / 0.3) + 1)
    transform = from_origin(x0, y1, 0.3, 0.3)
    ids = np.zeros(shape, np.int32)
    owners = 0
    for k, geom in enumerate(outlines.geometry, start=1):
        burn = rasterize([(geom, 1)], out_shape=shape, transform=transform, fill=0, dtype="uint8") > 0
        owners += bool((burn & (ids == 0)).any()) or not burn.any()  # (one under a pixel: kept by both)
        ids[burn & (ids == 0)] = k
    kept = distinct_outlines(list(outlines.geometry))
    assert len(kept) == owners < len(outlines)
