"""Georeferencing on real inputs: ``geoseg run`` on real GeoTIFFs (UTM, Web Mercator, a uint16
panchromatic band) and on a synthetic EPSG:4326 scene, with real Ray and real files read back.

For each input: every mask has exactly the input's CRS, transform and size; pixels the input masks
(GDAL mask: nodata value, per band) are nodata in the semantic mask (255) and 0 in the instance
mask, and are never counted; GeoPackage layers are in the input's CRS; areas are true ellipsoidal
areas: for UTM each pixel's planar area over PROJ's areal scale at its centre, for EPSG:3857 and
EPSG:4326 checked with ``pyproj.Geod``.
The models are the context-free palette oracles of ``geoseg.train.synth`` (any real image gives some
classes; what is checked here is where and how the results are placed and measured).
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
from pyproj import CRS, Geod, Proj, Transformer

from geoseg.core.config import load_config
from geoseg.runner.pipeline import run

LANDUSE = ["water", "forest", "cropland", "urban", "bare"]


def write_config(
    path: Path, bands: list[int], normalize: object = "none", tile_size: int = 256, halo: int = 16
) -> Path:
    """A small context-free config: a semantic and an instance head reading the same bands."""
    cfg = {
        "tiling": {"tile_size": tile_size, "halo": halo},
        "runtime": {"batch_size": 4},
        "models": {
            "landuse": {
                "task": "semantic",
                "classes": LANDUSE,
                "bands": bands,
                "normalize": normalize,
                "factory": "geoseg.train.synth:oracle_landuse",
            },
            "ships": {
                "task": "instance",
                "classes": ["ship"],
                "bands": bands,
                "normalize": normalize,
                "factory": "geoseg.train.synth:oracle_ships",
            },
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def valid_mask(path: Path, bands: list[int]) -> np.ndarray:
    """Pixels GDAL marks valid in every band the models read."""
    with rasterio.open(path) as ds:
        return np.all(ds.read_masks(sorted(set(bands))) > 0, axis=0)


def geod_row_pixel_area(path: Path) -> np.ndarray:
    """True area (m^2) of one pixel per row, computed independently of geoseg: for each row a strip
    spanning the whole raster width (one vertex per pixel corner) on the CRS's ellipsoid, divided by
    the width. In a geographic or Mercator grid every pixel of a row has the same ground area."""
    with rasterio.open(path) as ds:
        crs, t, w, h = CRS.from_wkt(ds.crs.to_wkt()), ds.transform, ds.width, ds.height
    geod = Geod(ellps="WGS84")
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    cols = np.arange(w + 1, dtype=np.float64)
    areas = np.empty(h)
    for r in range(h):
        c = np.concatenate([cols, cols[::-1]])
        rr = np.concatenate([np.full_like(cols, r), np.full_like(cols, r + 1)])
        lon, lat = to_ll.transform(t.c + t.a * c + t.b * rr, t.f + t.d * c + t.e * rr)
        areas[r] = abs(geod.polygon_area_perimeter(lon, lat)[0]) / w
    return areas


def check_outputs(src: Path, out: Path, bands: list[int]) -> dict:
    """Checks shared by every input; returns the scene's summary.json."""
    stem = src.stem
    scene_dir = out / stem
    assert scene_dir.is_dir(), sorted(p.name for p in out.iterdir())
    summary = json.loads((scene_dir / "summary.json").read_text())
    valid = valid_mask(src, bands)
    with rasterio.open(src) as s:
        src_crs, src_transform, src_shape = s.crs, s.transform, (s.height, s.width)

    # Every mask sits exactly on the input's grid.
    masks = {}
    for head in ("landuse", "ships"):
        with rasterio.open(scene_dir / f"{stem}_{head}.tif") as m:
            assert m.crs == src_crs, (head, m.crs, src_crs)
            assert m.crs.to_epsg() == src_crs.to_epsg()
            assert m.transform == src_transform, (head, m.transform, src_transform)
            assert (m.height, m.width) == src_shape
            masks[head] = m.read(1)

    # Nodata in, nodata out; never counted.
    landuse, ships = masks["landuse"], masks["ships"]
    assert np.array_equal(landuse == 255, ~valid), "semantic nodata must be exactly the input's masked pixels"
    assert landuse[valid].max() < len(LANDUSE)
    assert not ships[~valid].any(), "instance ids on masked input pixels"
    n_valid = int(valid.sum())
    assert summary["valid_pixels"] == n_valid
    classes = summary["models"]["landuse"]["classes"]
    assert sum(c["pixels"] for c in classes.values()) == n_valid
    for k, name in enumerate(LANDUSE):
        assert classes[name]["pixels"] == int((landuse == k).sum()), name
    ship = summary["models"]["ships"]["classes"]["ship"]
    assert ship["pixels"] == int((ships > 0).sum())
    assert ship["count"] == len(np.unique(ships[ships > 0]))
    assert summary["crs"] == src_crs.to_string() or CRS(summary["crs"]).equals(CRS(src_crs.to_wkt()))
    assert (summary["width"], summary["height"]) == (src_shape[1], src_shape[0])

    # GeoPackage: every layer in the input's CRS, objects inside the raster, one row per object.
    gpkg = scene_dir / f"{stem}.gpkg"
    left, top = src_transform.c, src_transform.f
    right, bottom = src_transform * (src_shape[1], src_shape[0])
    for layer in ("landuse", "ships"):
        info = pyogrio.read_info(gpkg, layer=layer)
        assert CRS.from_user_input(info["crs"]).equals(CRS.from_wkt(src_crs.to_wkt()), ignore_axis_order=True), info[
            "crs"
        ]
        if info["features"]:
            x0, y0, x1, y1 = info["total_bounds"]
            eps = abs(src_transform.a) * 1e-6
            assert x0 >= min(left, right) - eps and x1 <= max(left, right) + eps
            assert y0 >= min(top, bottom) - eps and y1 <= max(top, bottom) + eps
    ship_rows = pyogrio.read_dataframe(gpkg, layer="ships", read_geometry=False)
    assert len(ship_rows) == ship["count"]
    landuse_rows = pyogrio.read_dataframe(gpkg, layer="landuse")
    total_area = sum(c["area_m2"] for c in classes.values())
    # (summary.json rounds each class's area to 0.001 m^2)
    assert landuse_rows["area_m2"].sum() == pytest.approx(total_area, rel=1e-9, abs=0.0005 * len(classes))
    summary["_landuse_rows"] = landuse_rows
    summary["_valid"] = valid
    summary["_ships"] = ships
    summary["_landuse"] = landuse
    return summary


def run_one(tmp_path: Path, src: Path, bands: list[int], normalize: object = "none") -> dict:
    config = load_config(write_config(tmp_path / "config.yaml", bands, normalize))
    out = tmp_path / "out"
    report = run([str(src)], out, config, progress=False)
    assert report.ok, report.failures
    assert len(report.summaries) == 1
    return check_outputs(src, out, bands)


def projected_area_checks(src: Path, summary: dict) -> None:
    """UTM: area_m2 is the ground area of the counted pixels, each pixel's planar area over the
    projection's areal scale at its centre (PROJ's own factors, independent of geoseg): not the
    planar area (UTM's scale is 0.9996 on the central meridian, more away from it). The layer's
    polygons still cover exactly the counted pixels (their planar area)."""
    with rasterio.open(src) as s:
        crs, t, h, w = CRS.from_wkt(s.crs.to_wkt()), s.transform, s.height, s.width
    rows, cols = np.mgrid[0:h, 0:w] + 0.5
    to_ll = Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)
    lon, lat = to_ll.transform(t.c + t.a * cols + t.b * rows, t.f + t.d * cols + t.e * rows)
    planar_pixel = abs(t.a * t.e - t.b * t.d)
    pixel_area = planar_pixel / Proj(crs).get_factors(lon, lat).areal_scale
    landuse, valid, ships = summary["_landuse"], summary["_valid"], summary["_ships"]
    classes = summary["models"]["landuse"]["classes"]
    for k, (name, c) in enumerate(classes.items()):
        assert c["area_m2"] == pytest.approx(float(pixel_area[landuse == k].sum()), rel=1e-5, abs=1e-3), name
    total = sum(c["area_m2"] for c in classes.values())
    assert total == pytest.approx(float(pixel_area[valid].sum()), rel=1e-5)
    poly_area = float(shapely.area(summary["_landuse_rows"].geometry.values).sum())
    assert poly_area == pytest.approx(int(valid.sum()) * planar_pixel, rel=1e-9)
    ship = summary["models"]["ships"]["classes"]["ship"]
    assert ship["area_m2"] == pytest.approx(float(pixel_area[ships > 0].sum()), rel=1e-5, abs=1e-3)


def geodesic_area_checks(src: Path, summary: dict) -> None:
    """Geographic / Mercator: area_m2 is the true ground area of the counted pixels (pyproj.Geod),
    far from what a planar computation in the CRS would give."""
    row_area = geod_row_pixel_area(src)
    valid = summary["_valid"]
    expected = float((valid.sum(axis=1) * row_area).sum())
    classes = summary["models"]["landuse"]["classes"]
    total = sum(c["area_m2"] for c in classes.values())
    assert total == pytest.approx(expected, rel=1e-6)
    ships = summary["_ships"]
    ship = summary["models"]["ships"]["classes"]["ship"]
    assert ship["area_m2"] == pytest.approx(float(((ships > 0).sum(axis=1) * row_area).sum()), rel=1e-6, abs=1e-3)
    with rasterio.open(src) as s:
        planar = abs(s.transform.a * s.transform.e) * int(valid.sum())
        geographic = CRS.from_wkt(s.crs.to_wkt()).is_geographic
    if not geographic:
        assert abs(total - planar) / total > 0.01, "area_m2 looks like the planar (CRS-unit) area"


def test_landsat_utm_uint8_nodata(ray_session, shared_data, tmp_path):
    """rasterio's RGB.byte.tif: EPSG:32618, uint8, nodata 0 (per-band masks differ at the edges)."""
    src = shared_data / "rasterio" / "RGB.byte.tif"
    summary = run_one(tmp_path, src, [1, 2, 3])
    valid = summary["_valid"]
    assert 0 < valid.sum() < valid.size  # the file has a real nodata collar
    projected_area_checks(src, summary)


def test_sentinel2_web_mercator_uint16(ray_session, shared_data, tmp_path):
    """Sentinel-2 RGB over Honolulu in EPSG:3857 (uint16, no nodata): areas are true ground areas."""
    src = shared_data / "sen2ships" / "honolulu" / "honolulu_rgb.tiff"
    with rasterio.open(src) as s:
        assert s.crs.to_epsg() == 3857 and s.dtypes[0] == "uint16" and s.count == 3
    summary = run_one(tmp_path, src, [1, 2, 3], normalize={"scale": 256})
    geodesic_area_checks(src, summary)


def test_spacenet_pan_uint16_single_band(ray_session, shared_data, tmp_path):
    """SpaceNet WorldView-2 pan (1 band uint16, EPSG:32616) fed to 3-band models as bands [1, 1, 1]."""
    src = shared_data / "spacenet_atlanta" / "sample_geotiff.tif"
    with rasterio.open(src) as s:
        assert s.count == 1 and s.dtypes[0] == "uint16"
    summary = run_one(tmp_path, src, [1, 1, 1], normalize={"scale": 8})
    projected_area_checks(src, summary)


def test_synthetic_epsg4326(ray_session, tmp_path):
    """A geographic grid (1e-5 degree pixels): areas from the ellipsoid, not degrees squared."""
    from geoseg.train.synth import write_scene

    src = tmp_path / "geo4326.tif"
    write_scene(src, size=384, seed=5, crs="EPSG:4326", pixel_size=1e-5)
    summary = run_one(tmp_path, src, [1, 2, 3])
    valid = summary["_valid"]
    assert 0 < valid.sum() < valid.size  # the synthetic nodata corner
    geodesic_area_checks(src, summary)
    # The oracle recovers the truth exactly: land use, nodata included.
    with (
        rasterio.open(src.with_suffix(".truth") / "landuse.tif") as t,
        rasterio.open(tmp_path / "out" / "geo4326" / "geo4326_landuse.tif") as m,
    ):
        assert np.array_equal(t.read(1), m.read(1))
    # A 1e-5 degree pixel near 38.9 N is about 0.87 m x 1.11 m.
    total = sum(c["area_m2"] for c in summary["models"]["landuse"]["classes"].values())
    assert total / valid.sum() == pytest.approx(0.866 * 1.110, rel=0.01)
