"""Label rasters -> polygons, in global pixel coordinates (integers), streamed per window.

Polygons stay in pixel space until export: unions of fragments from neighbouring tiles are then
exact on integer coordinates, and one affine transform places them in the CRS.
"""

from __future__ import annotations

import numpy as np
import shapely
from affine import Affine
from rasterio.features import shapes


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
    coords: list[list[tuple[float, float]]] = []  # every ring of every part
    ring_part: list[int] = []  # the part each ring belongs to (its first ring is the shell)
    for part, (geom, value) in enumerate(
        shapes(labels.astype(np.int32, copy=False), mask=labels > 0, connectivity=4, transform=transform)
    ):
        ids.append(int(value))
        coords.extend(geom["coordinates"])
        ring_part.extend([part] * len(geom["coordinates"]))
    # All rings and polygons built in three vectorised calls, not one Python object per ring
    # (shapely.geometry.shape): 0.17 -> 0.08 s for a tile of 1,200 regions.
    lengths = np.fromiter((len(ring) for ring in coords), dtype=np.int64, count=len(coords))
    xy = np.concatenate([np.asarray(ring, dtype=np.float64) for ring in coords])
    rings = shapely.linearrings(xy, indices=np.repeat(np.arange(len(coords)), lengths))
    polygons = shapely.polygons(rings, indices=np.asarray(ring_part))
    return np.asarray(ids, dtype=np.int64), shapely.to_wkb(polygons).tolist()


def merge_parts(parts: list[bytes]) -> shapely.Geometry:
    """Union polygon parts of one object (exact on integer pixel coordinates) and drop collinear vertices.

    Only the parts' outer rings are unioned: a hole of a part lies strictly inside its tile's core
    (a hole reaching the core's edge would be open to the outside), where no other part can be, so
    it is a hole of the union as it is. A region that spans a scene with thousands of holes then
    costs a union of simple shells (a 4096^2 land-use region with 55,206 holes: 10 s -> well under one).
    """
    polygons = shapely.get_parts(shapely.from_wkb(parts))
    if len(polygons) == 1:
        return shapely.simplify(polygons[0], 0.0)
    holes = np.concatenate([shapely.get_rings(p)[1:] for p in polygons])
    merged = shapely.simplify(shapely.union_all(shapely.polygons(shapely.get_exterior_ring(polygons))), 0.0)
    if holes.size == 0:
        return merged
    pieces = shapely.get_parts(merged)
    if len(pieces) == 1:
        owner = np.zeros(len(holes), dtype=np.int64)
    else:  # which piece each hole lies in (8-connected objects can be MultiPolygons)
        tree = shapely.STRtree(pieces)
        hole_idx, piece_idx = tree.query(shapely.point_on_surface(shapely.polygons(holes)), predicate="within")
        owner = np.empty(len(holes), dtype=np.int64)
        owner[hole_idx] = piece_idx
    out = []
    for k, piece in enumerate(pieces):
        piece_holes = list(shapely.get_rings(piece)[1:]) + list(holes[owner == k])
        out.append(shapely.polygons(shapely.get_exterior_ring(piece), holes=piece_holes) if piece_holes else piece)
    return out[0] if len(out) == 1 else shapely.multipolygons(out)


def to_multipolygons(geoms: np.ndarray) -> np.ndarray:
    """GeoPackage layers are typed MultiPolygon, so every row is one (Polygon parts kept, others dropped)."""
    geoms = np.asarray(geoms, dtype=object)
    out = geoms.copy()
    types = shapely.get_type_id(geoms)
    polygons = np.flatnonzero(types == 3)
    if polygons.size:
        out[polygons] = shapely.multipolygons(geoms[polygons], indices=np.arange(polygons.size))
    for i in np.flatnonzero((types != 3) & (types != 6)):  # rare: collections from unions
        parts = [g for g in shapely.get_parts(geoms[i]) if g.geom_type == "Polygon"]
        out[i] = shapely.multipolygons(parts)
    return out


def pixel_to_crs(geom: shapely.Geometry, transform: Affine) -> shapely.Geometry:
    """Apply a raster's affine transform to a geometry in pixel (col, row) coordinates."""
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    return shapely.transform(
        geom, lambda xy: np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f])
    )
