"""Held-out scores through ``geoseg run`` (whole scenes, blended windows), to set beside the
``geoseg train --evaluate`` figures that each model's ``geoseg.json`` records.

Ships: ``models/s2-ships-l2a`` alone, tiled as ``configs/sentinel2.yaml`` tiles, on each held-out
port's B02 B03 B04 B08 stacked at 10 m,
objects matched to the COCO vessel masks at IoU >= 0.3, summed over the ports. Buildings:
``models/aerial-buildings`` alone on HOT's Nairobi drone image averaged to 0.3 m (its pixel size),
polygons matched to the OpenStreetMap outlines at IoU >= 0.5 where there is imagery.

Usage: ``python -m bench.run_path_scores --out bench/run_path_scores.json`` (``--precision fp32``:
the runs in float32, as ``--evaluate`` scores, rather than in what ``auto`` picks on this machine;
``--only ships``: one head).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def ships(work: Path, precision: str) -> dict[str, Any]:
    import rasterio

    from geoseg.core.config import config_from_dict, load_config
    from geoseg.runner.pipeline import run
    from geoseg.train.data import _coco_ids
    from geoseg.train.evaluate import match_instances, prf

    sys.path.insert(0, str(REPO / "tests"))
    from helpers.sentinel2 import stack

    # The tiling of configs/sentinel2.yaml (windows of 256 px sharing 128), the config users run it with.
    tiling = load_config(REPO / "configs" / "sentinel2.yaml").tiling.model_dump()
    config = config_from_dict(
        {
            "tiling": tiling,
            "runtime": {"precision": precision},
            "models": {"ships": {"weights": str(REPO / "models" / "s2-ships-l2a")}},
        }
    )
    recorded = json.loads((REPO / "models" / "s2-ships-l2a" / "geoseg.json").read_text())["metrics"]
    places, tp, n_pred, n_truth, device = {}, 0, 0, 0, ""
    for port in recorded["places"]:
        src = stack(SHARED, port, work / f"{port}.tif")
        report = run([str(src)], work / "out", config, progress=False)
        assert report.ok, report.failures
        device = report.device
        with rasterio.open(work / "out" / port / f"{port}_ships.tif") as ds:
            pred = ds.read(1)
        truth = _coco_ids(SHARED / "sen2ships" / port / f"{port}_coco.json", pred.shape)
        scores = match_instances(pred, truth, 0.3)
        places[port] = {"run": scores, "evaluate": recorded["places"][port]["objects"]}
        tp, n_pred, n_truth = tp + scores["matched"], n_pred + scores["predicted"], n_truth + scores["truth"]
    return {"device": device, "places": places, "run": prf(tp, n_pred, n_truth, 0.3), "evaluate": recorded["objects"]}


def buildings(work: Path, precision: str) -> dict[str, Any]:
    import geopandas as gpd
    import rasterio
    from rasterio.enums import Resampling

    from geoseg.core.config import config_from_dict
    from geoseg.runner.pipeline import run
    from geoseg.train.evaluate import distinct_outlines, match_polygons, on_imagery

    image = SHARED / "hotosm_buildings" / "nairobi.tif"
    src = work / "nairobi_0.3m.tif"
    with rasterio.open(image) as ds:
        shape = (ds.height // 4, ds.width // 4)
        profile = ds.profile
        profile.update(
            width=shape[1],
            height=shape[0],
            transform=ds.transform * ds.transform.scale(4, 4),
            compress="deflate",
            photometric="rgb",
            tiled=True,
            blockxsize=256,
            blockysize=256,
        )
        data = ds.read(out_shape=(ds.count, *shape), resampling=Resampling.average)
        mask = ds.dataset_mask(out_shape=shape, resampling=Resampling.nearest)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(src, "w", **profile) as out:
        out.write(data)
        out.write_mask(mask)
    weights = str(REPO / "models" / "aerial-buildings")
    config = config_from_dict({"runtime": {"precision": precision}, "models": {"buildings": {"weights": weights}}})
    report = run([str(src)], work / "out", config, progress=False)
    assert report.ok, report.failures
    with rasterio.open(src) as ds:
        crs, bounds, valid, transform = ds.crs, ds.bounds, ds.dataset_mask(), ds.transform
    truth = gpd.read_file(SHARED / "hotosm_buildings" / "nairobi_buildings.geojson").to_crs(crs).clip(bounds)
    found = gpd.read_file(work / "out" / src.stem / f"{src.stem}.gpkg", layer="buildings")

    recorded = json.loads((REPO / "models" / "aerial-buildings" / "geoseg.json").read_text())["metrics"]
    scores = match_polygons(
        on_imagery(found.geometry, valid, transform),
        distinct_outlines(on_imagery(truth.geometry, valid, transform)),
        0.5,
    )
    return {"device": report.device, "run": scores, "evaluate": recorded["objects"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/run_path_scores.json")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    ap.add_argument("--only", choices=["ships", "buildings"], action="append")
    args = ap.parse_args()
    heads = {"ships": ships, "buildings": buildings}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.only or list(heads):
            (Path(tmp) / part).mkdir()
            results[part] = heads[part](Path(tmp) / part, args.precision)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for head, r in results.items():
        print(
            f"{head} ({r['device']}): geoseg run F1 {r['run']['f1']} "
            f"({r['run']['predicted']} predicted / {r['run']['truth']} true), "
            f"--evaluate F1 {r['evaluate']['f1']} ({r['evaluate']['predicted']} / {r['evaluate']['truth']})"
        )


if __name__ == "__main__":
    main()
