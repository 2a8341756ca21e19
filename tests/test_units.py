"""``geoseg.core.units`` (ground pixel areas, metres per unit, ground frames) against independent
pyproj computations.

Rule under test: every area is the true area on the CRS's own ellipsoid, whatever the projection
(UTM, state planes in feet, LAEA, geographic, Mercator...), checked against ``pyproj.Geod`` on the
pixel's outline densified in the CRS (the exact cell). ``geoseg/core/units.py`` says how.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from affine import Affine
from pyproj import CRS, Geod, Proj, Transformer

from geoseg.core.units import ground_frames, ground_scale

US_FOOT = 1200 / 3937


def exact_row_areas(
    crs: str, transform: Affine, width: int, height: int, ellps: str = "WGS84", n: int = 64
) -> np.ndarray:
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


def xy(t: Affine, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CRS coordinates of grid positions (col, row)."""
    return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


def geod_pixel_area(crs: str, transform: Affine, row: int, col: int, n: int = 16) -> float:
    """Area of pixel (row, col) on the CRS's ellipsoid: its outline densified in the CRS, pyproj.Geod."""
    crs_obj = CRS.from_user_input(crs)
    to_ll = Transformer.from_crs(crs_obj, crs_obj.geodetic_crs, always_xy=True)
    s = np.linspace(0, 1, n + 1)[:-1]
    cc = np.concatenate([col + s, np.full(n, col + 1.0), col + 1 - s, np.full(n, float(col))])
    rr = np.concatenate([np.full(n, float(row)), row + s, np.full(n, row + 1.0), row + 1 - s])
    lon, lat = to_ll.transform(*xy(transform, cc, rr))
    return abs(crs_obj.get_geod().polygon_area_perimeter(lon, lat)[0])


def geod_block_area(crs: str, transform: Affine, height: int, width: int, n: int = 64) -> float:
    """Area of the block of pixels [0, height) x [0, width): its outline densified, pyproj.Geod
    (pixels of a metre or less are too small for Geod's own precision, so tests add them up)."""
    crs_obj = CRS.from_user_input(crs)
    to_ll = Transformer.from_crs(crs_obj, crs_obj.geodetic_crs, always_xy=True)
    s = np.linspace(0, 1, n + 1)[:-1]
    cc = np.concatenate([s * width, np.full(n, float(width)), (1 - s) * width, np.zeros(n)])
    rr = np.concatenate([np.zeros(n), s * height, np.full(n, float(height)), (1 - s) * height])
    lon, lat = to_ll.transform(*xy(transform, cc, rr))
    return abs(crs_obj.get_geod().polygon_area_perimeter(lon, lat)[0])


@pytest.mark.parametrize(
    "crs, pixel, unit, lon, lat",
    [
        ("EPSG:32618", 10.0, 1.0, -76.0, 40.0),  # UTM 18N, metres, 170 km off its central meridian
        ("EPSG:32616", 0.5, 1.0, -84.4, 33.7),  # UTM 16N (the SpaceNet sample's CRS)
        ("EPSG:3035", 100.0, 1.0, 20.0, 60.0),  # ETRS89 LAEA Europe: equal-area
        ("EPSG:2264", 3.0, US_FOOT, -78.7, 35.7),  # NAD83 / North Carolina (ftUS): US survey feet
        ("EPSG:32119", 28.5, 1.0, -77.0, 35.0),  # NAD83 / North Carolina, metres (the Landsat NC sample's CRS)
    ],
)
def test_projected_crs_gives_ellipsoidal_area_in_square_metres(crs, pixel, unit, lon, lat):
    """Not the planar area: a UTM zone's scale is 0.9996 on its central meridian (ground areas
    0.08 % larger than planar ones there) and grows away from it; an equal-area CRS keeps its areas."""
    x0, y0 = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    t = Affine(pixel, 0, x0, 0, -pixel, y0)
    s = ground_scale(crs, t, 50, 40)
    a = s.pixel_areas.window(0, 0, 40, 50)
    assert a.shape == (40, 50)
    assert a.sum() == pytest.approx(geod_block_area(crs, t, 40, 50), rel=1e-7)
    if pixel >= 10:
        for r, c in ((0, 0), (39, 49), (20, 10)):
            assert a[r, c] == pytest.approx(geod_pixel_area(crs, t, r, c), rel=1e-7)
    # Planar area over the projection's areal scale (PROJ's own factors), not the planar area.
    planar = (pixel * unit) ** 2
    to_ll = Transformer.from_crs(crs, CRS.from_user_input(crs).geodetic_crs, always_xy=True)
    factors = Proj(crs).get_factors(*to_ll.transform(*xy(t, np.array([25.5]), np.array([20.5]))))
    assert a[20, 25] == pytest.approx(planar / factors.areal_scale[0], rel=1e-6)
    if crs == "EPSG:3035":
        assert a.mean() == pytest.approx(planar, rel=1e-9)
    else:
        assert abs(a.mean() / planar - 1) > 5e-5
    # Metres per CRS unit along x at the centre, on the ground (Geod over one pixel).
    (lon0, lon1), (lat0, lat1) = to_ll.transform(*xy(t, np.array([24.5, 25.5]), np.array([20, 20])))
    dist = CRS.from_user_input(crs).get_geod().inv(lon0, lat0, lon1, lat1)[2]
    assert s.metres_per_unit == pytest.approx(dist / pixel, rel=1e-6)


def test_utm_area_away_from_the_central_meridian():
    """UTM 18N 300 km east of its central meridian: scale ~1.0007, planar areas 0.14 % too large."""
    t = Affine(30.0, 0, 800000.0, 0, -20.0, 4300000.0)
    a = ground_scale("EPSG:32618", t, 10, 5).pixel_areas.window(0, 0, 5, 10)
    exact = geod_pixel_area("EPSG:32618", t, 2, 5)
    assert a[2, 5] == pytest.approx(exact, rel=1e-7)
    assert 600.0 / exact - 1 == pytest.approx(0.0014, abs=0.0002)


@pytest.mark.parametrize(
    "pixel, lon0, lat0, rtol",
    [
        (1e-5, -77.0, 38.9, 1e-7),  # the synthetic EPSG:4326 scene
        (8.333e-5, 10.0, 50.0, 1e-7),  # ESA WorldCover's grid
        (0.01, 150.0, -33.0, 1e-7),  # southern hemisphere
        (0.25, -10.0, 61.0, 1e-7),  # coarse: the exact cell between two parallels
    ],
)
def test_geographic_rows_match_geod(pixel, lon0, lat0, rtol):
    t = Affine(pixel, 0, lon0, 0, -pixel, lat0)
    s = ground_scale("EPSG:4326", t, 20, 12)
    a = s.pixel_areas.window(0, 0, 12, 20)
    assert (a == a[:, :1]).all()  # one area per row
    np.testing.assert_allclose(a[:, 0], exact_row_areas("EPSG:4326", t, 20, 12), rtol=rtol)
    np.testing.assert_allclose(s.pixel_areas.window(5, 7, 3, 2)[:, 0], a[5:8, 0], rtol=1e-12)  # windows agree
    # North-up: in the northern hemisphere rows get larger going south, in the southern smaller.
    d = np.diff(a[:, 0])
    assert (d > 0).all() if lat0 - 12 * pixel >= 0 else (d < 0).all()
    # Metres per degree along the parallel through the centre row.
    mid = 12 // 2
    lat = lat0 - mid * pixel
    _, _, dist = Geod(ellps="WGS84").inv(lon0 + 10 * pixel, lat, lon0 + 11 * pixel, lat)
    assert s.metres_per_unit == pytest.approx(dist / pixel, rel=1e-6)


def test_geographic_uses_the_crs_ellipsoid():
    """NAD27 (Clarke 1866): areas on Clarke 1866, not WGS84."""
    t = Affine(0.001, 0, -90.0, 0, -0.001, 40.0)
    a = ground_scale("EPSG:4267", t, 5, 4).pixel_areas.window(0, 0, 4, 5)[:, 0]
    np.testing.assert_allclose(a, exact_row_areas("EPSG:4267", t, 5, 4, ellps="clrk66"), rtol=1e-7)
    wgs = exact_row_areas("EPSG:4267", t, 5, 4, ellps="WGS84")
    assert not np.allclose(a, wgs, rtol=1e-6)


def test_south_up_grid_has_positive_areas():
    """A bottom-up (positive y pixel size) grid: same cells, rows in reverse order."""
    n = Affine(0.01, 0, 0.0, 0, -0.01, 45.0)
    s_ = Affine(0.01, 0, 0.0, 0, 0.01, 45.0 - 0.01 * 8)
    a = ground_scale("EPSG:4326", n, 4, 8).pixel_areas.window(0, 0, 8, 4)
    b = ground_scale("EPSG:4326", s_, 4, 8).pixel_areas.window(0, 0, 8, 4)
    assert (a > 0).all() and (b > 0).all()
    np.testing.assert_allclose(a, b[::-1], rtol=1e-9)


@pytest.mark.parametrize("crs", ["EPSG:3857", "EPSG:3395"])  # Web Mercator, World Mercator
@pytest.mark.parametrize("lon0, lat0", [(-157.9, 21.3), (14.3, 60.0), (-58.4, -34.6)])
def test_mercator_rows_are_true_ground_areas(crs, lon0, lat0):
    fwd = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    x0, y0 = fwd.transform(lon0, lat0)
    t = Affine(10.0, 0, x0, 0, -10.0, y0)
    s = ground_scale(crs, t, 30, 20)
    a = s.pixel_areas.window(0, 0, 20, 30)
    np.testing.assert_allclose(a, np.repeat(exact_row_areas(crs, t, 30, 20)[:, None], 30, axis=1), rtol=1e-7)
    # Mercator scale is about 1/cos(lat): a 10 m CRS pixel is ~(10 cos lat)^2 m^2 on the ground.
    k = math.cos(math.radians(lat0))
    assert a.mean() == pytest.approx((10 * k) ** 2, rel=0.01)
    assert s.metres_per_unit == pytest.approx(k, rel=0.01)


@pytest.mark.parametrize(
    "crs, lon, lat",
    [
        ("EPSG:32618", -72.0, 40.0),  # UTM 18N, 300 km off its central meridian
        ("EPSG:2264", -78.7, 35.7),  # US survey feet
        ("EPSG:3857", 20.0, 70.0),  # Web Mercator at high latitude (not conformal on the ellipsoid)
        ("EPSG:3031", 60.0, -70.0),  # Antarctic polar stereographic
        ("EPSG:3031", 0.0, -90.0),  # at the pole itself
        ("EPSG:4326", 10.0, 60.0),  # degrees
    ],
)
def test_ground_frames_give_geodesic_lengths_and_azimuths(crs, lon, lat):
    """A short CRS offset mapped by the frame has the Geod length and azimuth of its two ends."""
    crs_obj = CRS.from_user_input(crs)
    fwd = Transformer.from_crs(crs_obj.geodetic_crs, crs_obj, always_xy=True)
    inv = Transformer.from_crs(crs_obj, crs_obj.geodetic_crs, always_xy=True)
    geod = crs_obj.get_geod()
    x, y = fwd.transform(lon, lat)
    frame = ground_frames(crs, np.array([x]), np.array([y]))[0]
    step = 1e-4 if crs_obj.is_geographic else 200.0
    for dx, dy in ((1, 0), (0, 1), (1, 1), (3, -2)):
        d = np.array([dx, dy]) * step
        (la, lb), (pa, pb) = inv.transform([x - d[0] / 2, x + d[0] / 2], [y - d[1] / 2, y + d[1] / 2])
        az12, az21, dist = geod.inv(la, pa, lb, pb)
        az = az12 + ((az21 + 180 - az12 + 180) % 360 - 180) / 2  # the geodesic's azimuth at its middle
        e, n = frame @ d
        assert math.hypot(e, n) == pytest.approx(dist, rel=1e-6)
        if lat > -89.9:  # (no north at the pole)
            assert (math.degrees(math.atan2(e, n)) - az + 180) % 360 - 180 == pytest.approx(0, abs=1e-5)


def test_local_crs_is_its_own_ground():
    """An engineering CRS (no ellipsoid): planar areas and lengths in its unit, converted to metres."""
    wkt = 'LOCAL_CS["site",UNIT["US survey foot",0.304800609601219],AXIS["X",EAST],AXIS["Y",NORTH]]'
    s = ground_scale(wkt, Affine(2.0, 0, 0, 0, -2.0, 100.0), 50, 40)
    np.testing.assert_allclose(s.pixel_areas.window(3, 4, 5, 6), (2 * US_FOOT) ** 2, rtol=1e-9)
    assert s.metres_per_unit == pytest.approx(US_FOOT)
    np.testing.assert_allclose(ground_frames(wkt, np.array([1.0]), np.array([2.0]))[0], np.eye(2) * US_FOOT)


def test_world_raster_with_corners_outside_the_projection():
    """Mollweide world grid: the corners lie outside the ellipse (no ground there); areas stay
    finite and the pixels inside keep their own areas (no NaN spreading through the lattice)."""
    t = Affine(50000.0, 0, -18100000.0, 0, -50000.0, 9100000.0)
    a = ground_scale("ESRI:54009", t, 724, 364).pixel_areas.window(0, 0, 364, 724)
    assert np.isfinite(a).all() and (a > 0).all()
    assert a[182, 362] == pytest.approx(geod_pixel_area("ESRI:54009", t, 182, 362), rel=1e-4)
