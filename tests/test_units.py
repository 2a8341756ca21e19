"""``geoseg.units.ground_scale`` and ``local_metric_crs`` against independent pyproj computations.

Rules under test: planar metric CRSs (UTM, state planes in feet, LAEA) give the planar pixel area
converted to square metres; geographic and Mercator-family CRSs give the true area of each pixel
row on the CRS's own ellipsoid (checked against ``pyproj.Geod`` on strips densified along the
parallels, i.e. the exact lat/lon cell).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from affine import Affine
from pyproj import CRS, Geod, Transformer

from geoseg.units import ground_scale, local_metric_crs

US_FOOT = 1200 / 3937


def exact_row_areas(crs: str, transform: Affine, width: int, height: int, ellps: str = "WGS84", n: int = 64) -> np.ndarray:
    """Area of one pixel per row: the row's full-width strip, edges densified, on ``ellps``, / width."""
    geod = Geod(ellps=ellps)
    crs_obj = CRS.from_user_input(crs)
    to_ll = Transformer.from_crs(crs_obj, crs_obj.geodetic_crs, always_xy=True)
    cols = np.linspace(0, width, n * width + 1)
    out = np.empty(height)
    for r in range(height):
        c = np.concatenate([cols, cols[::-1]])
        rr = np.concatenate([np.full_like(cols, r), np.full_like(cols, r + 1)])
        x = transform.c + transform.a * c + transform.b * rr
        y = transform.f + transform.d * c + transform.e * rr
        lon, lat = to_ll.transform(x, y)
        out[r] = abs(geod.polygon_area_perimeter(lon, lat)[0]) / width
    return out


@pytest.mark.parametrize(
    "crs, pixel, unit",
    [
        ("EPSG:32618", 10.0, 1.0),  # UTM 18N, metres
        ("EPSG:32616", 0.5, 1.0),  # UTM 16N (the SpaceNet sample's CRS)
        ("EPSG:3035", 100.0, 1.0),  # ETRS89 LAEA Europe: equal-area, planar
        ("EPSG:2264", 3.0, US_FOOT),  # NAD83 / North Carolina (ftUS): US survey feet
        ("EPSG:32119", 28.5, 1.0),  # NAD83 / North Carolina, metres (the Landsat NC sample's CRS)
    ],
)
def test_planar_crs_gives_planar_area_in_square_metres(crs, pixel, unit):
    t = Affine(pixel, 0, 400000.0, 0, -pixel, 4000000.0)
    s = ground_scale(crs, t, 50, 40)
    assert s.row_area_m2.shape == (40,)
    np.testing.assert_allclose(s.row_area_m2, (pixel * unit) ** 2, rtol=1e-12)
    assert s.metres_per_unit == pytest.approx(unit, rel=1e-12)


def test_rectangular_pixels_and_area_of_rows():
    t = Affine(30.0, 0, 500000.0, 0, -20.0, 4300000.0)
    s = ground_scale("EPSG:32618", t, 10, 5)
    np.testing.assert_allclose(s.row_area_m2, 600.0)
    assert s.area_of_rows(np.array([0, 1, 4])) == pytest.approx(1800.0)
    assert s.area_of_rows(np.array([0, 3]), np.array([7, 2])) == pytest.approx(9 * 600.0)


@pytest.mark.parametrize(
    "pixel, lon0, lat0, rtol",
    [
        (1e-5, -77.0, 38.9, 1e-7),  # the synthetic EPSG:4326 scene
        (8.333e-5, 10.0, 50.0, 1e-7),  # ESA WorldCover's grid
        (0.01, 150.0, -33.0, 1e-7),  # southern hemisphere
        (0.25, -10.0, 61.0, 1e-5),  # coarse: geodesic vs parallel edges differ by ~1e-6
    ],
)
def test_geographic_rows_match_geod(pixel, lon0, lat0, rtol):
    t = Affine(pixel, 0, lon0, 0, -pixel, lat0)
    s = ground_scale("EPSG:4326", t, 20, 12)
    np.testing.assert_allclose(s.row_area_m2, exact_row_areas("EPSG:4326", t, 20, 12), rtol=rtol)
    # North-up: in the northern hemisphere rows get larger going south, in the southern smaller.
    d = np.diff(s.row_area_m2)
    assert (d > 0).all() if lat0 - 12 * pixel >= 0 else (d < 0).all()
    # Metres per degree along the parallel through the centre row.
    mid = 12 // 2
    lat = lat0 - mid * pixel
    _, _, dist = Geod(ellps="WGS84").inv(lon0 + 10 * pixel, lat, lon0 + 11 * pixel, lat)
    assert s.metres_per_unit == pytest.approx(dist / pixel, rel=1e-6)


def test_geographic_uses_the_crs_ellipsoid():
    """NAD27 (Clarke 1866): areas on Clarke 1866, not WGS84."""
    t = Affine(0.001, 0, -90.0, 0, -0.001, 40.0)
    s = ground_scale("EPSG:4267", t, 5, 4)
    np.testing.assert_allclose(s.row_area_m2, exact_row_areas("EPSG:4267", t, 5, 4, ellps="clrk66"), rtol=1e-7)
    wgs = exact_row_areas("EPSG:4267", t, 5, 4, ellps="WGS84")
    assert not np.allclose(s.row_area_m2, wgs, rtol=1e-6)


def test_south_up_grid_has_positive_areas():
    """A bottom-up (positive y pixel size) grid: same cells, rows in reverse order."""
    n = Affine(0.01, 0, 0.0, 0, -0.01, 45.0)
    s_ = Affine(0.01, 0, 0.0, 0, 0.01, 45.0 - 0.01 * 8)
    a = ground_scale("EPSG:4326", n, 4, 8).row_area_m2
    b = ground_scale("EPSG:4326", s_, 4, 8).row_area_m2
    assert (a > 0).all() and (b > 0).all()
    np.testing.assert_allclose(a, b[::-1], rtol=1e-9)


@pytest.mark.parametrize("crs", ["EPSG:3857", "EPSG:3395"])  # Web Mercator, World Mercator
@pytest.mark.parametrize("lon0, lat0", [(-157.9, 21.3), (14.3, 60.0), (-58.4, -34.6)])
def test_mercator_rows_are_true_ground_areas(crs, lon0, lat0):
    fwd = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    x0, y0 = fwd.transform(lon0, lat0)
    t = Affine(10.0, 0, x0, 0, -10.0, y0)
    s = ground_scale(crs, t, 30, 20)
    np.testing.assert_allclose(s.row_area_m2, exact_row_areas(crs, t, 30, 20), rtol=1e-7)
    # Mercator scale is about 1/cos(lat): a 10 m CRS pixel is ~(10 cos lat)^2 m^2 on the ground.
    k = math.cos(math.radians(lat0))
    assert s.row_area_m2.mean() == pytest.approx((10 * k) ** 2, rel=0.01)
    assert s.metres_per_unit == pytest.approx(k, rel=0.01)


def test_local_metric_crs():
    assert local_metric_crs("EPSG:32618", (500000, 4300000, 501000, 4301000)) is None
    assert local_metric_crs("EPSG:3035", (4e6, 3e6, 4.1e6, 3.1e6)) is None
    assert local_metric_crs("EPSG:4326", (-77.01, 38.88, -77.0, 38.9)) == CRS.from_epsg(32618)
    assert local_metric_crs("EPSG:4326", (151.0, -34.0, 151.2, -33.8)) == CRS.from_epsg(32756)
    # Web Mercator over Honolulu: UTM 4N.
    fwd = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    x0, y0 = fwd.transform(-157.95, 21.28)
    x1, y1 = fwd.transform(-157.90, 21.32)
    assert local_metric_crs("EPSG:3857", (x0, y0, x1, y1)) == CRS.from_epsg(32604)
    # A planar CRS in feet: lengths must still come out in metres, so it gets a UTM zone.
    fwd = Transformer.from_crs("EPSG:4326", "EPSG:2264", always_xy=True)
    x0, y0 = fwd.transform(-78.7, 35.7)
    assert local_metric_crs("EPSG:2264", (x0, y0, x0 + 1000, y0 + 1000)) == CRS.from_epsg(32617)
