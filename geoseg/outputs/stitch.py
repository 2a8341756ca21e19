"""Seam-exact stitching on the driver: one object (or region) per physical object, at any size.

Each tile's labels get provisional global ids ``base + local``. For every pair of neighbouring
pixels that straddle a core border (p in tile A's core, q in tile B's core), the ids are joined:

- semantic regions (4-connected): when p and q have the same class;
- instances (8-connected, corners included): when ``labelA(p) == labelA(q)`` or
  ``labelB(p) == labelB(q)``, i.e. a tile that saw both pixels put them in one object. Two
  objects the model separated (watershed line, contact channel) stay apart. With ``halo == 0`` no
  tile sees its neighbour's pixels and the rule falls back to adjacency: exact for connected
  components, but touching objects that meet exactly on a seam merge there (keep halo >= 1).

A union-find over the seam-touching ids gives the final objects. Objects that touch no seam are
final when their tile arrives and stream out at once; a seam object is final once every tile it
touches has arrived. Memory grows with the objects on the front of arrived tiles, not the scene.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import shapely

from geoseg.models.postprocess import HeadTile
from geoseg.raster.vectorize import merge_parts

# emit(classes, pixels, areas_m2, score_sums, polygons in pixel coordinates) -> final ids (0: dropped),
# one entry per object: objects are handed over in batches so the sink can work on arrays.
Emit = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]

_NEIGHBOURS_4 = ((0, 1), (1, 0), (0, -1), (-1, 0))
_NEIGHBOURS_8 = _NEIGHBOURS_4 + ((1, 1), (1, -1), (-1, 1), (-1, -1))


class _Ring:
    """What a tile keeps until its neighbours have arrived: seam labels and who touches whom."""

    __slots__ = ("base", "inner", "outer", "label_class", "waiting", "touching")

    def __init__(self, base: int, head: HeadTile, waiting: int, touching: dict[tuple[int, int], set[int]]) -> None:
        self.base, self.inner, self.outer, self.label_class = base, head.inner, head.outer, head.label_class
        self.waiting, self.touching = waiting, touching


class _Group:
    """A seam-crossing object being assembled: member ids, tiles still to come, summed statistics."""

    __slots__ = ("members", "open", "cls", "pixels", "area", "score", "parts")

    def __init__(self, gid: int, open_sides: int, cls: int, pixels: int, area: float, score: float, parts: list[bytes]):
        self.members, self.open = [gid], open_sides
        self.cls, self.pixels, self.area, self.score, self.parts = cls, pixels, area, score, parts

    def absorb(self, other: _Group) -> None:
        self.members += other.members
        self.open += other.open
        self.pixels += other.pixels
        self.area += other.area
        self.score += other.score
        self.parts += other.parts


def _pairs(a: _Ring, b: _Ring, dr: int, dc: int, eight: bool) -> tuple[np.ndarray, ...]:
    """Pixel pairs across the seam between tile ``a`` and its neighbour ``b`` at offset (dr, dc).

    Returns ``(label_a_p, label_b_q, label_a_q, label_b_p)``: local labels of p (in a's core) and
    q (in b's core) as each tile saw them (-1: the tile did not see that pixel).
    """
    if dr == 0 or dc == 0:
        sa, sb = ("right", "left") if dr == 0 else ("bottom", "top")
        ia, ib, oa, ob = a.inner[sa], b.inner[sb], a.outer[sa], b.outer[sb]
        n = ia.shape[0]
        out: list[list[np.ndarray]] = [[], [], [], []]
        for d in (-1, 0, 1) if eight else (0,):
            p = np.arange(max(0, -d), min(n, n - d))
            q = p + d
            for lst, arr in zip(out, (ia[p], ib[q], oa[q + 1], ob[p + 1])):
                lst.append(arr)
        return tuple(np.concatenate(x) for x in out)
    # Diagonal neighbour (dr == 1): one pixel pair at the four-tile corner.
    ia, ib = a.inner["bottom"], b.inner["top"]
    oa, ob = a.outer["bottom"], b.outer["top"]
    if dc == 1:
        return ia[-1:], ib[:1], oa[-1:], ob[:1]
    return ia[:1], ib[-1:], oa[:1], ob[-1:]


def _merged(parts_per_object: list[list[bytes]]) -> np.ndarray:
    """One geometry per object: single-part objects in one vectorised call, the rest unioned."""
    single = [i for i, parts in enumerate(parts_per_object) if len(parts) == 1]
    out = np.empty(len(parts_per_object), dtype=object)
    if single:
        # GDAL's polygonize emits no collinear vertices: a single part is final as it is.
        out[single] = shapely.from_wkb([parts_per_object[i][0] for i in single])
    for i, parts in enumerate(parts_per_object):
        if len(parts) > 1:
            out[i] = merge_parts(parts)
    return out


class HeadStitcher:
    """Joins one head's tiles of one scene and emits each final object exactly once.

    A seam-crossing object is emitted as soon as every tile it touches has arrived, so what is
    held is the objects on the front of arrived tiles, not every seam object of the scene.
    """

    def __init__(self, grid_shape: tuple[int, int], instance: bool, emit: Emit) -> None:
        self.grid_shape, self.instance, self.emit = grid_shape, instance, emit
        self.neighbours = _NEIGHBOURS_8 if instance else _NEIGHBOURS_4
        self.rings: dict[tuple[int, int], _Ring] = {}
        self.parent: dict[int, int] = {}  # union-find over ids of open seam objects
        self.groups: dict[int, _Group] = {}  # root id -> object being assembled
        self.offset = 0  # provisional ids used so far: a tile's labels 1..n become offset+1..offset+n
        self.lut = np.zeros(1024, dtype=np.uint32)  # provisional id -> final id (instances)

    def _grow_lut(self, size: int) -> None:
        if size > self.lut.shape[0]:
            new = np.zeros(max(size, 2 * self.lut.shape[0]), dtype=np.uint32)
            new[: self.lut.shape[0]] = self.lut
            self.lut = new

    def _find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        if len(self.groups[ra].members) < len(self.groups[rb].members):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.groups[ra].absorb(self.groups.pop(rb))

    def _touching(self, row: int, col: int, head: HeadTile) -> dict[tuple[int, int], set[int]]:
        """Labels on the core edge facing each neighbour tile (corners for diagonal neighbours)."""
        rows, cols = self.grid_shape
        edge = {
            (-1, 0): head.inner["top"],
            (1, 0): head.inner["bottom"],
            (0, -1): head.inner["left"],
            (0, 1): head.inner["right"],
        }
        if self.instance:
            edge.update(
                {
                    (-1, -1): head.inner["top"][:1],
                    (-1, 1): head.inner["top"][-1:],
                    (1, -1): head.inner["bottom"][:1],
                    (1, 1): head.inner["bottom"][-1:],
                }
            )
        return {
            d: set(labels[labels > 0].tolist())
            for d, labels in edge.items()
            if 0 <= row + d[0] < rows and 0 <= col + d[1] < cols
        }

    def add(self, row: int, col: int, head: HeadTile) -> int:
        """Take one tile's result; returns the offset of its provisional ids."""
        base = self.offset
        self.offset += head.n_labels
        self._grow_lut(self.offset + 1)
        parts: dict[int, list[bytes]] = {}
        for label, wkb in zip(head.frag_labels.tolist(), head.frag_wkb):
            parts.setdefault(label, []).append(wkb)
        touching = self._touching(row, col, head)
        arrived = [d for d in touching if (row + d[0], col + d[1]) in self.rings]
        waiting = [d for d in touching if d not in arrived]
        candidates: list[int] = []
        interior: list[int] = []
        for label, label_parts in parts.items():
            if any(label in labels for labels in touching.values()):
                gid = base + label
                self.parent[gid] = gid
                self.groups[gid] = _Group(
                    gid,
                    sum(label in touching[d] for d in waiting),
                    int(head.label_class[label]),
                    int(head.label_pixels[label]),
                    float(head.label_area_m2[label]),
                    float(head.label_score_sum[label]),
                    label_parts,
                )
                candidates.append(gid)
            else:
                interior.append(label)
        if interior:  # objects that touch no seam are final now
            labels = np.asarray(interior)
            geoms = _merged([parts[label] for label in interior])
            self.lut[base + labels] = self.emit(
                head.label_class[labels],
                head.label_pixels[labels],
                head.label_area_m2[labels],
                head.label_score_sum[labels],
                geoms,
            )
        ring = _Ring(base, head, len(touching), touching)
        self.rings[(row, col)] = ring
        for dr, dc in arrived:
            other = self.rings[(row + dr, col + dc)]
            a, b, odr, odc = (ring, other, dr, dc) if (dr, dc) > (0, 0) else (other, ring, -dr, -dc)
            self._join_pair(a, b, odr, odc)
            # The neighbour was waiting for this tile on the side that faces it.
            for label in other.touching.get((-dr, -dc), ()):
                root = self._find(other.base + label)
                self.groups[root].open -= 1
                candidates.append(root)
            for r, key in ((ring, (row, col)), (other, (row + dr, col + dc))):
                r.waiting -= 1
                if r.waiting == 0:
                    del self.rings[key]
        self._emit_closed(candidates)
        return base

    def _join_pair(self, a: _Ring, b: _Ring, dr: int, dc: int) -> None:
        la_p, lb_q, la_q, lb_p = _pairs(a, b, dr, dc, self.instance)
        fg = (la_p > 0) & (lb_q > 0)
        if self.instance:
            seen = (la_q != -1) & (lb_p != -1)
            join = fg & (~seen | (la_q == la_p) | (lb_p == lb_q))
        else:
            join = fg & (a.label_class[np.maximum(la_p, 0)] == b.label_class[np.maximum(lb_q, 0)])
        for x, y in set(zip((la_p[join] + a.base).tolist(), (lb_q[join] + b.base).tolist())):
            self._union(x, y)

    def _emit_closed(self, ids: list[int]) -> None:
        closed: list[_Group] = []
        for gid in ids:
            if gid not in self.parent:
                continue  # already closed through another member
            root = self._find(gid)
            group = self.groups[root]
            if group.open == 0:
                closed.append(group)
                del self.groups[root]
                for member in group.members:
                    del self.parent[member]
        if not closed:
            return
        finals = self.emit(
            np.array([g.cls for g in closed]),
            np.array([g.pixels for g in closed]),
            np.array([g.area for g in closed]),
            np.array([g.score for g in closed]),
            _merged([g.parts for g in closed]),
        )
        for group, final in zip(closed, finals.tolist()):
            self.lut[group.members] = final

    def finish(self) -> np.ndarray:
        """Check every object was emitted; returns the provisional -> final id lookup table."""
        if self.groups:  # every tile arrived, so no object can still wait for one
            raise RuntimeError(f"{len(self.groups)} seam objects were never closed")
        return self.lut[: self.offset + 1]
