"""Label rasters -> polygons, in global pixel coordinates (integers), streamed per window.

Polygons stay in pixel space until export: unions of fragments from neighbouring tiles are then
exact on integer coordinates, and one affine transform places them in the CRS.
"""

from __future__ import annotations

import numpy as np
import shapely
from affine import Affine
from rasterio.features import shapes
from shapely.geometry import shape


def label_polygons(labels: np.ndarray, row_off: int, col_off: int) -> tuple[np.ndarray, list[bytes]]:
    """Polygonise every nonzero label of ``labels`` (a window at ``row_off, col_off``).

    Returns ``(label_ids, wkb)``. Parts are always 4-connected (an 8-connected object whose pixels
    touch only at corners yields several parts), so merging parts by label gives one geometry
    whatever the tiling: a MultiPolygon where parts meet at a corner only.
    """
    if not labels.any():
        return np.zeros(0, dtype=np.int64), []
    transform = Affine.translation(col_off, row_off)
    ids: list[int] = []
    geoms: list[bytes] = []
    for geom, value in shapes(labels.astype(np.int32, copy=False), mask=labels > 0, connectivity=4, transform=transform):
        ids.append(int(value))
        geoms.append(shapely.to_wkb(shape(geom)))
    return np.asarray(ids, dtype=np.int64), geoms


def merge_parts(parts: list[bytes]) -> shapely.Geometry:
    """Union polygon parts of one object (exact on integer pixel coordinates) and drop collinear vertices."""
    geoms = shapely.from_wkb(parts)
    merged = geoms[0] if len(geoms) == 1 else shapely.union_all(geoms)
    return shapely.simplify(merged, 0.0)


def to_multipolygon(geom: shapely.Geometry) -> shapely.Geometry:
    """GeoPackage layers are typed MultiPolygon, so every row is one."""
    if geom.geom_type == "Polygon":
        return shapely.multipolygons([geom])
    if geom.geom_type == "MultiPolygon":
        return geom
    polys = [g for g in shapely.get_parts(geom) if g.geom_type == "Polygon"]
    return shapely.multipolygons(polys)


def pixel_to_crs(geom: shapely.Geometry, transform: Affine) -> shapely.Geometry:
    """Apply a raster's affine transform to a geometry in pixel (col, row) coordinates."""
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    return shapely.transform(geom, lambda xy: np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f]))
