"""The public output contract: COG masks, GeoPackage layers, summaries, as a GIS reads them."""

from __future__ import annotations

import csv
import json
import sqlite3

import numpy as np
import pyogrio
import pytest
import rasterio

from geoseg.core.config import load_config
from geoseg.runner.pipeline import run
from geoseg.train.synth import write_scene


@pytest.fixture(scope="module")
def outputs(ray_session, tmp_path_factory, oracle_config_path):
    root = tmp_path_factory.mktemp("outputs")
    scene = root / "in" / "small.tif"
    scene.parent.mkdir()
    write_scene(scene, size=700, seed=11)
    config = load_config(oracle_config_path, {"tiling": {"tile_size": 256, "halo": 16}})
    report = run([str(scene.parent)], root / "out", config, progress=False)
    assert report.ok, report.failures
    return scene, root / "out"


def test_masks_are_cogs_with_colours_and_class_names(outputs):
    scene, out = outputs
    with rasterio.open(scene) as src:
        crs, transform, shape = src.crs, src.transform, src.shape
    with rasterio.open(out / "small" / "small_landuse.tif") as ds:
        assert (ds.crs, ds.transform, ds.shape) == (crs, transform, shape)
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255
        assert ds.block_shapes[0] == (512, 512)
        assert ds.overviews(1) == [2]  # 700 px: one overview level down to < 512
        assert ds.tags()["geoseg_model"] == "landuse"
        assert json.loads(ds.tags()["geoseg_classes"]) == ["water", "forest", "cropland", "urban", "bare"]
        assert ds.colormap(1)[0][:3] == (0x1E, 0x3C, 0x8C)
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    with rasterio.open(out / "small" / "small_buildings.tif") as ds:
        assert ds.dtypes[0] == "uint32" and ds.nodata == 0
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"


def test_geopackage_layers_index_and_counts_table(outputs):
    scene, out = outputs
    gpkg = out / "small" / "small.gpkg"
    layers = dict(pyogrio.list_layers(gpkg))
    assert layers == {
        "landuse": "MultiPolygon",
        "buildings": "MultiPolygon",
        "ships": "MultiPolygon",
        "counts": None,
        "layer_styles": None,
    }  # QGIS's default styles (geoseg.outputs.styles)
    with rasterio.open(scene) as src:
        crs = src.crs
    for layer in ("landuse", "buildings", "ships"):
        info = pyogrio.read_info(gpkg, layer=layer)
        assert rasterio.crs.CRS.from_user_input(info["crs"]) == crs
    fields = list(pyogrio.read_info(gpkg, layer="buildings")["fields"])
    assert fields == ["instance_id", "class", "score", "area_m2", "length_m", "width_m", "orientation_deg"]
    with sqlite3.connect(gpkg) as db:
        rtrees = {
            r[0] for r in db.execute("select table_name from gpkg_extensions where extension_name = 'gpkg_rtree_index'")
        }
        assert rtrees == {"landuse", "buildings", "ships"}
        counts = {(m, c): (n, px) for m, c, n, px in db.execute("select model, class, count, pixels from counts")}
    summary = json.loads((out / "small" / "summary.json").read_text())
    assert counts[("buildings", "building")] == (
        summary["models"]["buildings"]["classes"]["building"]["count"],
        summary["models"]["buildings"]["classes"]["building"]["pixels"],
    )
    # Instance attributes: ids match the raster, measures are metric and consistent.
    df = pyogrio.read_dataframe(gpkg, layer="buildings")
    assert (df.length_m >= df.width_m).all() and ((df.orientation_deg >= 0) & (df.orientation_deg < 180)).all()
    # 1 m pixels on UTM 18N's central meridian, where its scale is 0.9996: the ground area (geoseg's
    # area_m2, on the ellipsoid) is the planar area / 0.9996^2, 0.08 % more than the planar area.
    assert np.allclose(df.area_m2, df.geometry.area / 0.9996**2, rtol=1e-6)
    assert ((df.score > 0.5) & (df.score <= 1)).all()


def test_summaries_agree_and_count_only_valid_pixels(outputs):
    scene, out = outputs
    summary = json.loads((out / "small" / "summary.json").read_text())
    with rasterio.open(scene) as src:
        valid = int((src.read_masks(1) > 0).sum())
    landuse = summary["models"]["landuse"]["classes"]
    assert sum(v["pixels"] for v in landuse.values()) == valid == summary["valid_pixels"]
    assert {k: summary[k] for k in ("input", "width", "height", "status")} == {
        "input": str(scene),
        "width": 700,
        "height": 700,
        "status": "ok",
    }
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 5 + 1 + 1 and all(r["status"] == "ok" for r in rows)
    ships = next(r for r in rows if r["model"] == "ships")
    assert int(ships["count"]) == summary["models"]["ships"]["classes"]["ship"]["count"]


def test_rerun_skips_scenes_done_with_the_same_config(outputs, oracle_config_path):
    scene, out = outputs
    summary_path = out / "small" / "summary.json"
    before = summary_path.stat().st_mtime_ns
    same = load_config(oracle_config_path, {"tiling": {"tile_size": 256, "halo": 16}})
    report = run([str(scene.parent)], out, same, progress=False)
    assert report.ok and report.skipped == 1 and summary_path.stat().st_mtime_ns == before
    assert report.summaries[0]["models"] == json.loads(summary_path.read_text())["models"]
    other = load_config(oracle_config_path, {"tiling": {"tile_size": 512, "halo": 16}})
    report = run([str(scene.parent)], out, other, progress=False)
    assert report.ok and report.skipped == 0 and summary_path.stat().st_mtime_ns > before


def test_an_all_nodata_tile_inside_the_scene(ray_session, tmp_path, oracle_config_path):
    """A tile skipped for being all nodata still closes its neighbours' seams: same result as one tile."""
    import geopandas as gpd
    import shapely
    from rasterio.windows import Window

    scene = tmp_path / "in" / "hole.tif"
    scene.parent.mkdir()
    write_scene(scene, size=512, seed=4, nodata_corner=False)
    with rasterio.open(scene, "r+") as ds:  # tile (2, 2) of a 64-pixel tiling: all nodata
        ds.write(np.zeros((3, 64, 64), np.uint8), window=Window(128, 128, 64, 64))
    results = {}
    # Halo 0: the skipped tile's read window (core + halo) is all nodata, so no model runs on it.
    # 512: the whole scene in one tile, no seams at all.
    for tile in (64, 512):
        config = load_config(oracle_config_path, {"tiling": {"tile_size": tile, "halo": 0}})
        report = run([str(scene)], tmp_path / f"out{tile}", config, progress=False)
        assert report.ok, report.failures
        out = tmp_path / f"out{tile}" / "hole"
        with rasterio.open(out / "hole_landuse.tif") as ds:
            mask = ds.read(1)
        layers = {
            name: sorted(
                shapely.to_wkb(shapely.normalize(g)) for g in gpd.read_file(out / "hole.gpkg", layer=name).geometry
            )
            for name in ("landuse", "buildings", "ships")
        }
        results[tile] = (mask, layers, json.loads((out / "summary.json").read_text())["models"])
    assert (results[64][0][128:192, 128:192] == 255).all()
    assert (results[64][0] == results[512][0]).all()
    assert results[64][1] == results[512][1] and results[64][2] == results[512][2]
