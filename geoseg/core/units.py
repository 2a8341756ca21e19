"""Ground areas and lengths for a raster grid in any CRS: square metres and metres on the CRS's
ellipsoid, whatever the projection (docs/outputs.md, "Areas and lengths").

The CRS is related to the ellipsoid point by point: around a point (x, y) the inverse projection's
derivatives, taken on the ellipsoid's surface in 3D (earth-centred) coordinates, give the ground
vectors of one CRS unit along x and along y. Their cross product is the ground area of one CRS
unit squared there (the inverse of the projection's areal scale, unit conversion included); their
components east and north map small CRS offsets to ground metres. Working in 3D keeps this exact
at the poles, where longitude degenerates.

- Pixel areas: for a window of the grid, that area density on a coarse lattice of pixel centres
  (every ``step`` pixels of the grid, nodes at most ~40 km apart, and the grid's last row and
  column: the same nodes whatever the tiling), interpolated bilinearly to every pixel, times the
  pixel's planar area. The density varies over distances of the order of the earth's radius, so
  this is within ~2e-5 of the pixel's exact ellipsoidal area (checked against ``pyproj.Geod`` in
  the tests). North-up grids in a geographic CRS use the exact area of each cell between its two
  parallels instead (it depends on the row only).
- Lengths: ``ground_frames`` gives the 2x2 map from CRS offsets to metres east and north at any
  point; ``geoseg.outputs.export`` measures each object's rectangle in the frame of its centroid.
- A local (engineering) CRS, which has no ellipsoid, is its own ground: planar measures in metres.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
from affine import Affine
from pyproj import CRS, Geod, Transformer

LATTICE_M = 40_000.0  # largest lattice spacing (m): interpolation errors below ~2e-5 (they grow as its square)
LATTICE_MAX_STEP = 128  # pixels


class _Metric:
    """Ground vectors of the CRS's unit steps at any points (one per CRS and thread: pyproj
    transformers are not shared between threads)."""

    def __init__(self, crs: CRS | str) -> None:
        crs = CRS.from_user_input(crs)
        self.geod = geod = crs.get_geod() or Geod(ellps="WGS84")
        self.a, self.es = float(geod.a), float(geod.es)
        self.b = float(geod.b)
        self.geographic = bool(crs.is_geographic)
        unit = float(crs.axis_info[0].unit_conversion_factor or 1.0) if crs.axis_info else 1.0
        geodetic = crs.geodetic_crs
        # A local (engineering) CRS has no ellipsoid: its plane is the ground.
        self.to_lonlat = None if geodetic is None else Transformer.from_crs(crs, geodetic, always_xy=True)
        # Radians per unit of the geodetic CRS's angles (degrees almost always).
        self.rad = float(geodetic.axis_info[0].unit_conversion_factor or math.pi / 180) if geodetic else math.pi / 180
        # Metres per CRS unit at scale 1 (a radian is ``a`` metres): sizes the finite differences
        # (about 100 m: exact to ~1e-9 whatever the inverse projection's rounding).
        self.unit_m = unit * self.a if self.geographic else unit
        self.delta = 100.0 / self.unit_m

    def _ecef(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        sl, cl = np.sin(lat), np.cos(lat)
        n = self.a / np.sqrt(1.0 - self.es * sl * sl)
        return np.stack([n * cl * np.cos(lon), n * cl * np.sin(lon), n * (1.0 - self.es) * sl], axis=-1)

    def tangents(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """At points (x, y): ground vectors (metres, 3D) of one CRS unit along x and along y, and
        the unit vectors east and north (3D); arrays of shape (n, 3)."""
        x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
        if self.to_lonlat is None:
            one = np.ones((x.shape[0], 1))
            return one * [self.unit_m, 0, 0], one * [0, self.unit_m, 0], one * [1.0, 0, 0], one * [0, 1.0, 0]
        d = self.delta
        xs = np.concatenate([x, x + d, x - d, x, x])
        ys = np.concatenate([y, y, y, y + d, y - d])
        lon, lat = self.to_lonlat.transform(xs, ys)  # inf outside the projection's domain: NaN below
        with np.errstate(invalid="ignore"):
            lon, lat = np.asarray(lon) * self.rad, np.asarray(lat) * self.rad
            p = self._ecef(lon, lat).reshape(5, -1, 3)
            tx, ty = (p[1] - p[2]) / (2 * d), (p[3] - p[4]) / (2 * d)
            n = x.shape[0]
            lon0, lat0 = lon[:n], lat[:n]
            east = np.stack([-np.sin(lon0), np.cos(lon0), np.zeros(n)], axis=-1)
            north = np.stack([-np.sin(lat0) * np.cos(lon0), -np.sin(lat0) * np.sin(lon0), np.cos(lat0)], axis=-1)
        return tx, ty, east, north

    def density(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Ground area (m^2) of one square CRS unit at each point."""
        tx, ty, _, _ = self.tangents(x, y)
        return np.linalg.norm(np.cross(tx, ty), axis=-1)

    def frames(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n, 2, 2): maps an offset (dx, dy) in CRS units at each point to metres (east, north)."""
        tx, ty, east, north = self.tangents(x, y)
        out = np.empty((tx.shape[0], 2, 2))
        out[:, 0, 0], out[:, 0, 1] = (tx * east).sum(-1), (ty * east).sum(-1)
        out[:, 1, 0], out[:, 1, 1] = (tx * north).sum(-1), (ty * north).sum(-1)
        return out

    def band_area(self, lat1: np.ndarray, lat2: np.ndarray, dlon: float) -> np.ndarray:
        """Exact area (m^2) of the cells between parallels lat1 and lat2 (radians), ``dlon`` wide."""
        e = math.sqrt(self.es)

        def q(lat: np.ndarray) -> np.ndarray:  # authalic latitude function
            s = np.sin(lat)
            if e == 0.0:
                return 2.0 * s
            return s / (1.0 - self.es * s * s) + np.arctanh(e * s) / e

        return np.abs(0.5 * self.b * self.b * dlon * (q(lat2) - q(lat1)))


_local = threading.local()


def _metric(crs: CRS | str) -> _Metric:
    key = crs if isinstance(crs, str) else crs.to_wkt()
    cache = _local.__dict__.setdefault("metrics", {})
    m = cache.get(key)
    if m is None:
        if len(cache) > 16:
            cache.clear()
        m = cache[key] = _Metric(key)
    return m


def lonlat_tools(crs: CRS | str) -> tuple[Geod, Transformer | None]:
    """The CRS's ellipsoid (WGS84 where it has none) and its transformer to longitude and latitude
    (None for a local CRS), made once per thread and CRS."""
    m = _metric(crs)
    return m.geod, m.to_lonlat


def ground_frames(crs: CRS | str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, 2, 2) maps from CRS offsets at points (x, y) to metres east and north on the ellipsoid."""
    return _metric(crs).frames(x, y)


def _lattice(start: int, n: int, size: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Lattice nodes (pixel indices: multiples of ``step`` and the grid's last index ``size - 1``)
    around pixels ``start .. start + n - 1``, and the (n, nodes) weights of linear interpolation at
    those pixels. The nodes belong to the grid, not to the window: a pixel's area does not depend
    on the tiling."""
    last = start + n - 1
    hi = min(-(-last // step) * step, size - 1)  # first node at or after the window's last pixel
    nodes = np.unique(np.r_[np.arange((start // step) * step, hi + 1, step), hi]).astype(np.float64)
    w = np.zeros((n, nodes.shape[0]))
    if nodes.shape[0] == 1:
        w[:, 0] = 1.0
        return nodes, w
    t = np.arange(start, start + n, dtype=np.float64)
    j = np.clip(np.searchsorted(nodes, t, side="right") - 1, 0, nodes.shape[0] - 2)
    f = (t - nodes[j]) / (nodes[j + 1] - nodes[j])
    rows = np.arange(n)
    w[rows, j] = 1.0 - f
    w[rows, j + 1] += f
    return nodes, w


def _fill_invalid(nodes: np.ndarray, fallback: float) -> np.ndarray:
    """Nodes outside the projection's domain (a world raster's corners) take the nearest valid
    node's value: a NaN would spread along the interpolation's rows and columns."""
    bad = ~np.isfinite(nodes)
    if not bad.any():
        return nodes
    if bad.all():
        return np.full(nodes.shape, fallback)
    from scipy import ndimage

    idx = ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
    return nodes[tuple(idx)]


@dataclass(frozen=True)
class PixelAreas:
    """Ground area of each pixel of one raster grid, computed window by window (small, picklable:
    the driver sends it once per scene, each post-processing task builds its tiles' areas)."""

    crs_wkt: str  # (or any string pyproj reads)
    transform: Affine
    width: int
    height: int
    step: int  # lattice step in pixels; 0: north-up geographic grid, exact areas per row

    def window(self, row_off: int, col_off: int, height: int, width: int) -> np.ndarray:
        """float64 (height, width): each pixel's area in square metres on the ellipsoid."""
        m, t = _metric(self.crs_wkt), self.transform
        if self.step == 0:
            lat = (t.f + t.e * np.arange(row_off, row_off + height + 1, dtype=np.float64)) * m.rad
            rows = m.band_area(lat[:-1], lat[1:], abs(t.a) * m.rad)
            return np.repeat(rows[:, None], width, axis=1)
        rn, wr = _lattice(row_off, height, max(self.height, row_off + height), self.step)
        cn, wc = _lattice(col_off, width, max(self.width, col_off + width), self.step)
        rr, cc = np.meshgrid(rn + 0.5, cn + 0.5, indexing="ij")  # pixel centres
        x, y = t.a * cc + t.b * rr + t.c, t.d * cc + t.e * rr + t.f
        nodes = _fill_invalid(m.density(x, y).reshape(rr.shape), m.unit_m**2) * abs(t.determinant)
        return wr @ nodes @ wc.T


@dataclass(frozen=True)
class GroundScale:
    """Ground measures of one raster grid: pixel areas (by window) and metres per CRS unit."""

    pixel_areas: PixelAreas
    metres_per_unit: float  # on the ground along the CRS's x axis at the raster's centre: for tolerances


def ground_scale(crs: CRS | str, transform: Affine, width: int, height: int) -> GroundScale:
    """Ground measures of a grid; cheap (a few projected points), whatever the raster's size."""
    wkt = crs if isinstance(crs, str) else crs.to_wkt()
    m = _metric(wkt)
    t = transform
    cx, cy = t.c + (t.a * width + t.b * height) / 2.0, t.f + (t.d * width + t.e * height) / 2.0
    tx, ty, _, _ = m.tangents(np.array([cx]), np.array([cy]))
    metres_per_unit = float(np.linalg.norm(tx[0]))
    if not math.isfinite(metres_per_unit) or metres_per_unit <= 0:  # the centre outside the projection
        metres_per_unit = m.unit_m
    if m.geographic and transform.b == 0 and transform.d == 0:
        return GroundScale(PixelAreas(wkt, transform, width, height, 0), metres_per_unit)
    pixel = math.sqrt(abs(transform.determinant))
    ground = pixel * math.sqrt(float(np.linalg.norm(np.cross(tx[0], ty[0]))))
    ground = ground if math.isfinite(ground) else 0.0
    # Spacing limited in ground metres and in CRS units (in metres at scale 1): the density varies
    # over ~an earth radius in either, whichever is stretched (Mercator at high latitude).
    spacing = max(ground, pixel * m.unit_m, 1e-9)
    step = int(min(max(LATTICE_M // spacing, 2), LATTICE_MAX_STEP))
    return GroundScale(PixelAreas(wkt, transform, width, height, step), metres_per_unit)
