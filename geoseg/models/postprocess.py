"""Per-tile CPU work after the actor: decode, measure, vectorise, and cut the seam rings.

Runs in Ray tasks so the GPU never waits for it. Everything here is local to one tile; the
driver (``geoseg.outputs.stitch``) joins tiles across seams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from geoseg.core.config import SEMANTIC_NODATA, Config
from geoseg.core.heads import ModelConfig
from geoseg.models.decode import decode_instances, label_regions
from geoseg.raster.grid import Tile
from geoseg.raster.vectorize import label_polygons

SIDES = ("top", "bottom", "left", "right")


@dataclass
class HeadTile:
    """One head's result on one tile; label ids are local to the tile (1..n_labels)."""

    raster: np.ndarray  # core: uint8 classes (255 nodata) or int32 local instance labels
    n_labels: int
    label_class: np.ndarray  # int32 (n+1,), class index per label
    label_pixels: np.ndarray  # int64 (n+1,)
    label_area_m2: np.ndarray  # float64 (n+1,)
    label_score_sum: np.ndarray  # float64 (n+1,), sum of body probability (instances)
    inner: dict[str, np.ndarray]  # side -> labels on the core's edge row/column
    outer: dict[str, np.ndarray]  # side -> this tile's labels one pixel outside the core (-1 unseen), with corners
    seam_labels: np.ndarray  # labels touching a core edge shared with another tile
    frag_labels: np.ndarray  # label per polygon part
    frag_wkb: list[bytes] = field(default_factory=list)  # polygon parts, global pixel coordinates


@dataclass
class TileResult:
    """Everything the driver receives for one tile."""

    tile: Tile
    status: str  # ok | empty (all nodata) | error
    error: str | None = None
    valid_pixels: int = 0
    heads: dict[str, HeadTile] = field(default_factory=dict)


def _line(labels: np.ndarray, rows: slice | int, cols: slice | int) -> np.ndarray:
    """``labels[rows, cols]`` for one row or column that may reach one pixel outside ``labels``;
    pixels outside read -1 (unseen). Saves padding the whole tile for four thin lines."""
    H, W = labels.shape
    if isinstance(rows, int):
        assert isinstance(cols, slice)
        if not 0 <= rows < H:
            return np.full(cols.stop - cols.start, -1, dtype=np.int32)
        out = np.full(cols.stop - cols.start, -1, dtype=np.int32)
        lo, hi = max(cols.start, 0), min(cols.stop, W)
        out[lo - cols.start : hi - cols.start] = labels[rows, lo:hi]
        return out
    assert isinstance(cols, int)
    return _line(labels.T, cols, rows)


def _rings(labels: np.ndarray, ro: int, co: int, h: int, w: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inner edge labels of the core at (ro, co, h, w) inside ``labels``, and the ring just outside."""
    inner = {
        "top": labels[ro, co : co + w].copy(),
        "bottom": labels[ro + h - 1, co : co + w].copy(),
        "left": labels[ro : ro + h, co].copy(),
        "right": labels[ro : ro + h, co + w - 1].copy(),
    }
    outer = {
        "top": _line(labels, ro - 1, slice(co - 1, co + w + 1)),
        "bottom": _line(labels, ro + h, slice(co - 1, co + w + 1)),
        "left": _line(labels, slice(ro - 1, ro + h + 1), co - 1),
        "right": _line(labels, slice(ro - 1, ro + h + 1), co + w),
    }
    return inner, outer


def _seam_labels(inner: dict[str, np.ndarray], tile: Tile, grid_shape: tuple[int, int]) -> np.ndarray:
    rows, cols = grid_shape
    has_neighbour = {
        "top": tile.row > 0,
        "bottom": tile.row < rows - 1,
        "left": tile.col > 0,
        "right": tile.col < cols - 1,
    }
    edge = [inner[s] for s in SIDES if has_neighbour[s]]
    if not edge:
        return np.zeros(0, dtype=np.int64)
    u = np.unique(np.concatenate(edge))
    return u[u > 0].astype(np.int64)


def _head(
    spec: ModelConfig,
    output: np.ndarray,
    valid: np.ndarray,
    tile: Tile,
    pixel_area: np.ndarray,
    grid_shape: tuple[int, int],
) -> HeadTile:
    h, w = int(tile.core.height), int(tile.core.width)
    (rs, cs) = tile.core_in_read
    score_sum: np.ndarray  # float64 (numpy's stub says bincount returns intp even with weights)
    if spec.task == "semantic":
        core_valid = valid[rs, cs]
        labels, label_class = label_regions(output, core_valid, len(spec.classes))
        raster = np.where(core_valid, output, SEMANTIC_NODATA).astype(np.uint8)
        inner, outer = _rings(labels, 0, 0, h, w)
        core_labels, score_sum = labels, np.zeros(label_class.shape[0])
    else:
        read_labels = decode_instances(output, valid, spec)
        core_labels = read_labels[rs, cs]
        # Keep only labels present in the core; renumber them 1..n so ids stay dense.
        present, core_labels = np.unique(core_labels, return_inverse=True)
        core_labels = core_labels.reshape(h, w).astype(np.int32)
        if present[0] != 0:
            core_labels += 1
            present = np.concatenate([[0], present])
        remap = np.full(int(read_labels.max()) + 1, -2, dtype=np.int32)
        remap[present] = np.arange(present.shape[0], dtype=np.int32)
        # Labels seen only in the halo get -2: foreground that is not one of this core's objects.
        outer_read = remap[read_labels]
        inner, outer = _rings(outer_read, rs.start, cs.start, h, w)
        label_class = np.zeros(present.shape[0], dtype=np.int32)
        body = output[0][rs, cs].astype(np.float64) / 255.0
        score_sum = np.bincount(core_labels.ravel(), weights=body.ravel(), minlength=present.shape[0])
        raster = core_labels
    n = label_class.shape[0] - 1
    flat = core_labels.ravel()
    pixels = np.bincount(flat, minlength=n + 1).astype(np.int64)
    # Ground area: the sum of the label's pixels' own areas (they vary across the grid).
    areas = np.bincount(flat, weights=pixel_area.ravel(), minlength=n + 1)
    pixels[0], areas[0] = 0, 0.0
    frag_labels, frag_wkb = label_polygons(core_labels, int(tile.core.row_off), int(tile.core.col_off))
    return HeadTile(
        raster=raster,
        n_labels=n,
        label_class=label_class,
        label_pixels=pixels,
        label_area_m2=areas,
        label_score_sum=score_sum,
        inner=inner,
        outer=outer,
        seam_labels=_seam_labels(inner, tile, grid_shape),
        frag_labels=frag_labels,
        frag_wkb=frag_wkb,
    )


def empty_head(height: int, width: int) -> HeadTile:
    """A head result with no labels, for a tile whose pixels are all nodata (nothing to decode).

    The stitcher still needs it: neighbours wait for every tile they touch before closing objects.
    """
    zeros = np.zeros(0, dtype=np.int64)
    inner = {
        "top": np.zeros(width, np.int32),
        "bottom": np.zeros(width, np.int32),
        "left": np.zeros(height, np.int32),
        "right": np.zeros(height, np.int32),
    }
    outer = {k: np.zeros(v.shape[0] + 2, np.int32) for k, v in inner.items()}
    return HeadTile(
        raster=np.zeros((height, width), np.int32),
        n_labels=0,
        label_class=np.zeros(1, np.int32),
        label_pixels=zeros,
        label_area_m2=np.zeros(1),
        label_score_sum=np.zeros(1),
        inner=inner,
        outer=outer,
        seam_labels=zeros,
        frag_labels=zeros,
        frag_wkb=[],
    )


def postprocess_tile(
    pred: dict[str, Any], config: Config, pixel_area: np.ndarray | None, grid_shape: tuple[int, int]
) -> TileResult:
    """Turn the actor's output for one tile into a TileResult. ``pixel_area``: the ground area (m^2)
    of each core pixel, (height, width) (``geoseg.core.units.PixelAreas.window``), or one per core row."""
    tile: Tile = pred["tile"]
    if pred["status"] != "ok":
        return TileResult(tile=tile, status=pred["status"], error=pred.get("error"))
    valid = pred["valid"]
    rs, cs = tile.core_in_read
    shape = (int(tile.core.height), int(tile.core.width))
    area = np.asarray(pixel_area, dtype=np.float64)
    area = np.broadcast_to(area[:, None] if area.ndim == 1 else area, shape)
    heads = {
        name: _head(spec, pred["heads"][name], valid, tile, area, grid_shape) for name, spec in config.models.items()
    }
    return TileResult(tile=tile, status="ok", valid_pixels=int(valid[rs, cs].sum()), heads=heads)
