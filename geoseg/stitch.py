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
final when their tile arrives and stream out at once; memory grows with seam-touching objects only.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import shapely

from geoseg.postprocess import HeadTile
from geoseg.vectorize import merge_parts

# emit(class_index, pixels, area_m2, score_sum, polygon in pixel coordinates) -> final id (0: dropped)
Emit = Callable[[int, int, float, float, shapely.Geometry], int]

_NEIGHBOURS_4 = ((0, 1), (1, 0), (0, -1), (-1, 0))
_NEIGHBOURS_8 = _NEIGHBOURS_4 + ((1, 1), (1, -1), (-1, 1), (-1, -1))


class UnionFind:
    """Disjoint sets over integer ids, created on first use."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class _Ring:
    __slots__ = ("base", "inner", "outer", "label_class", "waiting")

    def __init__(self, base: int, head: HeadTile, waiting: int) -> None:
        self.base, self.inner, self.outer, self.label_class = base, head.inner, head.outer, head.label_class
        self.waiting = waiting


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


class HeadStitcher:
    """Joins one head's tiles of one scene and emits each final object exactly once."""

    def __init__(self, grid_shape: tuple[int, int], instance: bool, emit: Emit) -> None:
        self.grid_shape, self.instance, self.emit = grid_shape, instance, emit
        self.neighbours = _NEIGHBOURS_8 if instance else _NEIGHBOURS_4
        self.rings: dict[tuple[int, int], _Ring] = {}
        self.uf = UnionFind()
        self.pending: dict[int, list] = {}  # gid -> [class, pixels, area, score_sum, parts]
        self.offset = 0  # provisional ids used so far: a tile's labels 1..n become offset+1..offset+n
        self.lut = np.zeros(1024, dtype=np.uint32)  # provisional id -> final id (instances)

    def _grow_lut(self, size: int) -> None:
        if size > self.lut.shape[0]:
            new = np.zeros(max(size, 2 * self.lut.shape[0]), dtype=np.uint32)
            new[: self.lut.shape[0]] = self.lut
            self.lut = new

    def add(self, row: int, col: int, head: HeadTile) -> int:
        """Take one tile's result; returns the base of its provisional ids."""
        base = self.offset
        self.offset += head.n_labels
        self._grow_lut(self.offset + 1)
        parts: dict[int, list[bytes]] = {}
        for label, wkb in zip(head.frag_labels.tolist(), head.frag_wkb):
            parts.setdefault(label, []).append(wkb)
        seam = set(head.seam_labels.tolist())
        for label, label_parts in parts.items():
            stats = [int(head.label_class[label]), int(head.label_pixels[label]), float(head.label_area_m2[label]),
                     float(head.label_score_sum[label]), label_parts]
            if label in seam:
                self.pending[base + label] = stats
            else:
                self.lut[base + label] = self.emit(stats[0], stats[1], stats[2], stats[3], merge_parts(label_parts))
        self._join(row, col, _Ring(base, head, self._count_neighbours(row, col)))
        return base

    def _count_neighbours(self, row: int, col: int) -> int:
        rows, cols = self.grid_shape
        return sum(0 <= row + dr < rows and 0 <= col + dc < cols for dr, dc in self.neighbours)

    def _join(self, row: int, col: int, ring: _Ring) -> None:
        self.rings[(row, col)] = ring
        for dr, dc in self.neighbours:
            other = self.rings.get((row + dr, col + dc))
            if other is None:
                continue
            # Order the pair so that 'a' is above (or left of) 'b'.
            a, b, odr, odc = (ring, other, dr, dc) if (dr, dc) > (0, 0) else (other, ring, -dr, -dc)
            self._join_pair(a, b, odr, odc)
            for r in (ring, other):
                r.waiting -= 1
            if other.waiting == 0:
                del self.rings[(row + dr, col + dc)]
        if ring.waiting == 0:
            del self.rings[(row, col)]

    def _join_pair(self, a: _Ring, b: _Ring, dr: int, dc: int) -> None:
        la_p, lb_q, la_q, lb_p = _pairs(a, b, dr, dc, self.instance)
        fg = (la_p > 0) & (lb_q > 0)
        if self.instance:
            seen = (la_q != -1) & (lb_p != -1)
            join = fg & (~seen | (la_q == la_p) | (lb_p == lb_q))
        else:
            join = fg & (a.label_class[np.maximum(la_p, 0)] == b.label_class[np.maximum(lb_q, 0)])
        for x, y in set(zip((la_p[join] + a.base).tolist(), (lb_q[join] + b.base).tolist())):
            self.uf.union(x, y)

    def finish(self) -> np.ndarray:
        """Emit the seam-crossing objects; returns the provisional -> final id lookup table."""
        groups: dict[int, list[int]] = {}
        for gid in self.pending:
            groups.setdefault(self.uf.find(gid), []).append(gid)
        for gids in groups.values():
            stats = [self.pending[g] for g in gids]
            parts = [p for s in stats for p in s[4]]
            final = self.emit(stats[0][0], sum(s[1] for s in stats), sum(s[2] for s in stats),
                              sum(s[3] for s in stats), merge_parts(parts))
            self.lut[gids] = final
        self.pending.clear()
        return self.lut[: self.offset + 1]
