"""True ground areas and lengths where the projection's scale drifts across the scene.

Four synthetic scenes, each spanning enough of the earth for the CRS's scale to vary by 5 % or
more, run through the real pipeline with the oracle models (which reproduce the synthetic truth
exactly): Antarctic polar stereographic centred on the South Pole, Lambert conformal conic over
Canada, Web Mercator around 70 N and EPSG:4326. Every land-use class total, every land-use region
and every object's ``area_m2`` must be within 0.1 % of its area on the ellipsoid, computed here
independently of geoseg: the truth polygons (pixel outlines) densified in the CRS, taken to
longitude/latitude and measured with ``pyproj.Geod``. Building lengths and widths (axis-aligned
boxes in the CRS) must be within 0.5 % of the Geod lengths of their middle lines.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from pyproj import CRS, Transformer

from geoseg.core.config import load_config
from geoseg.core.units import ground_scale
from geoseg.runner.pipeline import run
from geoseg.train.synth import LANDUSE_CLASSES, write_scene

SIZE = 512


def _lcc_origin() -> tuple[float, float]:
    return 6200000.0 - SIZE / 2 * 6250.0, 3000000.0 + SIZE / 2 * 6250.0


def _merc_origin() -> tuple[float, float]:
    return Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(20.0, 71.5)


# name -> (crs, pixel size, top-left corner). Pixel areas vary across each scene by 6.7 % (polar:
# 3200 km centred on the pole, which sits inside a pixel, not on a corner where longitude is
# undefined), 8.7 % (Canada, 3200 km of LCC), 21 % (Web Mercator, 640 km of CRS y from 71.5 N)
# and 12 % (EPSG:4326, 50 N to 43.6 N).
SCENES = {
    "polar": ("EPSG:3031", 6250.0, (-SIZE / 2 * 6250.0 - 1850.0, SIZE / 2 * 6250.0 + 3150.0)),
    "lcc": ("EPSG:3347", 6250.0, _lcc_origin()),
    "merc": ("EPSG:3857", 1250.0, _merc_origin()),
    "geo": ("EPSG:4326", 0.0125, (-77.0, 50.0)),
}


def _transform(name: str) -> Affine:
    _, pixel, (x0, y0) = SCENES[name]
    return Affine(pixel, 0, x0, 0, -pixel, y0)


class Truth:
    """Ellipsoidal areas and lengths of CRS geometries, with pyproj.Geod only."""

    def __init__(self, crs: str, pixel: float) -> None:
        crs_obj = CRS.from_user_input(crs)
        self.geod = crs_obj.get_geod()
        self.to_ll = Transformer.from_crs(crs_obj, crs_obj.geodetic_crs, always_xy=True)
        self.step = pixel / 4  # densify in the CRS: Geod's edges are geodesics, the pixels' are not

    def _ring_area(self, ring: shapely.LinearRing) -> float:
        xy = shapely.get_coordinates(shapely.segmentize(ring, self.step))
        lon, lat = self.to_ll.transform(xy[:, 0], xy[:, 1])
        return abs(self.geod.polygon_area_perimeter(lon, lat)[0])

    def area(self, geom: shapely.Geometry) -> float:
        polys = shapely.get_parts(geom)
        return float(sum(self._ring_area(p.exterior) - sum(self._ring_area(r) for r in p.interiors) for p in polys))

    def length(self, x0: float, y0: float, x1: float, y1: float) -> float:
        line = shapely.segmentize(shapely.LineString([(x0, y0), (x1, y1)]), self.step)
        xy = shapely.get_coordinates(line)
        lon, lat = self.to_ll.transform(xy[:, 0], xy[:, 1])
        return float(self.geod.line_length(lon, lat))


def geod_pixel_area(crs: str, t: Affine, row: int, col: int) -> float:
    box = shapely.box(t.c + col * t.a, t.f + (row + 1) * t.e, t.c + (col + 1) * t.a, t.f + row * t.e)
    return Truth(crs, abs(t.a)).area(box)


@pytest.mark.parametrize("name", list(SCENES))
def test_pixel_areas_match_geod_across_the_grid(name):
    """Pixels far from the centre, in rows and columns alike, within 1e-4 of their Geod area (the
    lattice interpolation is ~2e-5); windows of any offset and size give the whole grid's values
    (the lattice belongs to the grid: areas do not depend on the tiling)."""
    crs, pixel, _ = SCENES[name]
    t = _transform(name)
    pa = ground_scale(crs, t, SIZE, SIZE).pixel_areas
    whole = pa.window(0, 0, SIZE, SIZE)
    points = [
        (0, 0),
        (0, SIZE - 1),
        (SIZE - 1, 0),
        (SIZE - 1, SIZE - 1),
        (SIZE // 2, 3),
        (5, SIZE // 2),
        (SIZE // 2, SIZE // 2),
        (123, 467),
        (401, 77),
    ]
    for r, c in points:
        exact = geod_pixel_area(crs, t, r, c)
        assert whole[r, c] == pytest.approx(exact, rel=1e-4), (r, c)
        assert pa.window(r, c, 1, 1)[0, 0] == pytest.approx(exact, rel=1e-4), (r, c)
    for r0, c0, h, w in ((150, 250, 256, 256), (0, 0, 64, 64), (448, 448, 64, 64), (7, 301, 200, 211)):
        np.testing.assert_allclose(pa.window(r0, c0, h, w), whole[r0 : r0 + h, c0 : c0 + w], rtol=1e-12)
    # The scale drift is what this is about: planar areas would be off by several per cent.
    drift = whole.max() / whole.min()
    assert drift > 1.05, drift
    if name in ("polar", "lcc"):  # across columns as well as rows
        assert max(row.max() / row.min() for row in whole) > 1.03


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory, oracle_config_path):
    root = tmp_path_factory.mktemp("areas")
    (root / "in").mkdir()
    paths = []
    for k, (name, (crs, pixel, origin)) in enumerate(SCENES.items()):
        path = root / "in" / f"{name}.tif"
        write_scene(path, size=SIZE, seed=20 + k, crs=crs, pixel_size=pixel, origin=origin)
        paths.append(str(path))
    config = load_config(oracle_config_path, {"tiling": {"tile_size": 256, "halo": 16}})
    report = run(paths, root / "out", config, progress=False)
    assert report.ok, report.failures
    return root


@pytest.mark.parametrize("name", list(SCENES))
def test_areas_within_0_1_percent_of_the_ellipsoid(runs, name):
    crs, pixel, _ = SCENES[name]
    truth = Truth(crs, pixel)
    src = runs / "in" / f"{name}.tif"
    out = runs / "out" / name
    summary = json.loads((out / "summary.json").read_text())

    # Land-use classes: the truth raster's regions, each measured with Geod.
    with rasterio.open(src.with_suffix(".truth") / "landuse.tif") as ds:
        classes, transform = ds.read(1), ds.transform
    expected = np.zeros(len(LANDUSE_CLASSES))
    for geom, value in rasterio.features.shapes(classes, mask=classes != 255, transform=transform):
        expected[int(value)] += truth.area(shapely.geometry.shape(geom))
    got = summary["models"]["landuse"]["classes"]
    for k, cls in enumerate(LANDUSE_CLASSES):
        assert got[cls]["area_m2"] == pytest.approx(expected[k], rel=1e-3), cls
    # Every land-use region: its own outline (not simplified: simplify_m is 0) measured with Geod.
    regions = pyogrio.read_dataframe(out / f"{name}.gpkg", layer="landuse")
    region_truth = np.array([truth.area(g) for g in regions.geometry.values])
    np.testing.assert_allclose(regions.area_m2.to_numpy(), region_truth, rtol=1e-3)

    # Every object, matched to its truth footprint.
    for layer in ("buildings", "ships"):
        want = pyogrio.read_dataframe(src.with_suffix(".truth") / "objects.gpkg", layer=layer)
        got_df = pyogrio.read_dataframe(out / f"{name}.gpkg", layer=layer)
        assert len(got_df) == len(want) > 0, layer
        tree = shapely.STRtree(want.geometry.values)
        match = tree.query(shapely.point_on_surface(got_df.geometry.values), predicate="within")
        assert sorted(match[1].tolist()) == list(range(len(want))), layer  # one truth object each
        true_area = np.array([truth.area(g) for g in want.geometry.values])[match[1]]
        np.testing.assert_allclose(got_df.area_m2.to_numpy()[match[0]], true_area, rtol=1e-3)

        if layer == "buildings":  # axis-aligned boxes in the CRS: their middle lines
            geoms = want.geometry.values[match[1]]
            boxes = np.isclose(shapely.area(geoms), shapely.area(shapely.envelope(geoms)))
            assert boxes.sum() >= 5
            for i in np.flatnonzero(boxes):
                x0, y0, x1, y1 = geoms[i].bounds
                xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
                sides = sorted([truth.length(x0, ym, x1, ym), truth.length(xm, y0, xm, y1)])
                row = got_df.iloc[match[0][i]]
                assert row.length_m == pytest.approx(sides[1], rel=5e-3)
                assert row.width_m == pytest.approx(sides[0], rel=5e-3)
                if sides[1] > 1.2 * sides[0]:  # orientation: the long side's geodesic azimuth at the centre
                    ex, ey = (x1, ym) if truth.length(x0, ym, x1, ym) > truth.length(xm, y0, xm, y1) else (xm, y1)
                    (lon0, lon1), (lat0, lat1) = truth.to_ll.transform([xm, ex], [ym, ey])
                    az = truth.geod.inv(lon0, lat0, lon1, lat1)[0] % 180
                    diff = (row.orientation_deg - az + 90) % 180 - 90
                    assert abs(diff) < 0.5, (row.orientation_deg, az)


def test_planar_areas_would_fail(runs):
    """The check above has teeth: planar pixel area x pixels is off by > 0.1 % for most objects
    (and by several per cent for many) in the polar and Lambert scenes."""
    for name in ("polar", "lcc"):
        crs, pixel, _ = SCENES[name]
        truth = Truth(crs, pixel)
        want = pyogrio.read_dataframe(runs / "in" / f"{name}.truth" / "objects.gpkg", layer="buildings")
        planar = want.pixels.to_numpy() * pixel * pixel
        err = np.abs(planar / np.array([truth.area(g) for g in want.geometry.values]) - 1)
        assert (err > 1e-3).mean() > 0.9 and err.max() > 0.04, (name, np.median(err), err.max())
        assert math.isfinite(err.max())
