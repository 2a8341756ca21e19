"""Metric areas and lengths for a raster grid in any CRS.

Rules (documented in the README):
- projected CRS whose unit is linear and whose scale is near-true (UTM, state planes, LAEA...):
  planar area in that CRS, converted to metres (what a GIS shows for such a layer);
- geographic CRS (EPSG:4326) and Mercator-family CRS (EPSG:3857), where a CRS unit is not a
  ground length: the true area of each pixel row on the CRS's ellipsoid. Pixel area depends on the
  row only for north-up grids in these CRSs, so one value per row is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from affine import Affine
from pyproj import CRS, Geod, Transformer


def _is_planar_metric(crs: CRS) -> bool:
    if crs.is_geographic:
        return False
    method = (crs.coordinate_operation.method_name if crs.coordinate_operation else "").lower()
    return "mercator" not in method or "transverse" in method


@dataclass(frozen=True)
class GroundScale:
    """Ground measures of one raster grid: pixel areas per row, and metres per CRS unit."""

    row_area_m2: np.ndarray  # float64, one entry per raster row
    metres_per_unit: float  # at the raster's centre, for lengths and tolerances

    def area_of_rows(self, rows: np.ndarray, counts: np.ndarray | None = None) -> float:
        """Sum of pixel areas for pixels in ``rows`` (optionally ``counts`` pixels per row)."""
        a = self.row_area_m2[rows]
        return float(a.sum() if counts is None else (a * counts).sum())


def ground_scale(crs: CRS | str, transform: Affine, width: int, height: int) -> GroundScale:
    """Compute pixel areas (m^2) per row and metres per CRS unit for a north-up grid."""
    crs = CRS.from_user_input(crs)
    if _is_planar_metric(crs):
        unit = crs.axis_info[0].unit_conversion_factor or 1.0
        area = abs(transform.a * transform.e - transform.b * transform.d) * unit * unit
        return GroundScale(np.full(height, area), unit)
    geod = crs.get_geod() or Geod(ellps="WGS84")
    to_lonlat = Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)
    col = width / 2.0
    rows = np.arange(height + 1, dtype=np.float64)
    # Affine applied by hand: the pixel corners (col, row) and (col + 1, row) of each row.
    xs_l = transform.a * col + transform.b * rows + transform.c
    xs_r = transform.a * (col + 1) + transform.b * rows + transform.c
    ys = transform.d * col + transform.e * rows + transform.f
    lon_l, lat = to_lonlat.transform(xs_l, ys)
    lon_r, _ = to_lonlat.transform(xs_r, ys)
    areas = np.empty(height)
    for i in range(height):
        lons = [lon_l[i], lon_r[i], lon_r[i], lon_l[i + 1]]
        lats = [lat[i], lat[i], lat[i + 1], lat[i + 1]]
        areas[i] = abs(geod.polygon_area_perimeter(lons, lats)[0])
    mid = height // 2
    _, _, dist = geod.inv(lon_l[mid], lat[mid], lon_r[mid], lat[mid])
    metres_per_unit = dist / math.hypot(transform.a, transform.d)
    return GroundScale(areas, metres_per_unit)


def local_metric_crs(crs: CRS | str, bounds: tuple[float, float, float, float]) -> CRS | None:
    """A CRS in which shape measures (length, width) are in metres: the CRS itself when planar
    metric, else the UTM zone of the raster's centre."""
    crs = CRS.from_user_input(crs)
    if _is_planar_metric(crs) and (crs.axis_info[0].unit_conversion_factor or 1.0) == 1.0:
        return None
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    lon, lat = to_lonlat.transform((bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2)
    zone = int((lon + 180) // 6) + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + min(max(zone, 1), 60))
