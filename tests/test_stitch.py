"""Seam stitching without Ray: cut an image into tiles, stitch, compare with one pass over the whole.

The truth is independent of tiling: scipy's connected components over the whole image.
"""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from scipy import ndimage

from geoseg.core.config import config_from_dict
from geoseg.models.decode import CONNECTIVITY_8, label_regions
from geoseg.models.postprocess import postprocess_tile
from geoseg.outputs.stitch import HeadStitcher
from geoseg.raster.grid import plan_tiles, tile_grid_shape
from geoseg.raster.vectorize import label_polygons, merge_parts

HEAD = {"task": "instance", "classes": ["thing"], "bands": [1], "factory": "x:y"}


def _config(tile: int, halo: int, **head) -> object:
    return config_from_dict({"tiling": {"tile_size": tile, "halo": halo}, "models": {"h": {**HEAD, **head}}})


def _blobs(size: int, seed: int) -> np.ndarray:
    """Random blobs of many shapes and sizes, some much larger than a tile."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((size, size)), 3)
    mask = field > np.quantile(field, 0.6)
    mask[size // 3, 5 : size - 5] = True  # a long thin object crossing every column of tiles
    return mask


def _stitch(
    image: np.ndarray, valid: np.ndarray, tile: int, halo: int, row_major: bool = False, probe=None, **head
) -> tuple[list, np.ndarray]:
    config = _config(tile, halo, **head)
    size = image.shape[-1]
    grid = tile_grid_shape(size, size, tile)
    objects: list[tuple] = []

    def emit(cls, pixels, area, score, geoms):  # a batch of final objects -> their ids
        start = len(objects) + 1
        objects.extend(zip(cls.tolist(), pixels.tolist(), area.tolist(), geoms))
        return np.arange(start, len(objects) + 1)

    instance = config.models["h"].task == "instance"
    stitcher = HeadStitcher(grid, instance, emit)
    raster = np.zeros(image.shape[-2:], dtype=np.int64)
    tiles = list(plan_tiles(size, size, tile, halo))
    order = range(len(tiles)) if row_major else np.random.default_rng(0).permutation(len(tiles))  # any order
    for t in order:
        t = tiles[t]
        rsl = (
            slice(t.read.row_off, t.read.row_off + t.read.height),
            slice(t.read.col_off, t.read.col_off + t.read.width),
        )
        if instance:
            out = image[(slice(None),) + rsl]
        else:
            rs, cs = t.core_in_read
            out = image[rsl][rs, cs]
        pred = {"tile": t, "status": "ok", "valid": valid[rsl], "heads": {"h": out}}
        res = postprocess_tile(pred, config, np.ones(t.core.height), grid).heads["h"]
        base = stitcher.add(t.row, t.col, res)
        core = (
            slice(t.core.row_off, t.core.row_off + t.core.height),
            slice(t.core.col_off, t.core.col_off + t.core.width),
        )
        raster[core] = np.where(res.raster > 0, res.raster + base, 0) if instance else 0
        if probe:
            probe(stitcher)
    lut = stitcher.finish()
    return objects, (lut[raster] if instance else raster)


def _normalised(geoms) -> set[bytes]:
    return {shapely.to_wkb(shapely.normalize(g)) for g in geoms}


@pytest.mark.parametrize("tile,halo", [(32, 0), (32, 1), (40, 7), (64, 16), (200, 3)])
def test_instances_equal_one_pass_over_whole_image(tile, halo):
    mask = _blobs(160, seed=tile + halo)
    valid = np.ones(mask.shape, bool)
    valid[:20, :20] = False  # nodata: never an object
    objects, raster = _stitch((mask * 255).astype(np.uint8)[None], valid, tile, halo)
    truth, n = ndimage.label(mask & valid, structure=CONNECTIVITY_8)
    assert len(objects) == n
    ids, parts = label_polygons(truth.astype(np.int32), 0, 0)
    truth_geoms = [merge_parts([p for i, p in zip(ids, parts) if i == k]) for k in range(1, n + 1)]
    assert _normalised(o[3] for o in objects) == _normalised(truth_geoms)
    assert sorted(o[1] for o in objects) == sorted(np.bincount(truth.ravel())[1:].tolist())
    # The stitched raster is the truth up to renumbering: a bijection between ids.
    pairs = set(zip(truth.ravel().tolist(), raster.ravel().tolist()))
    assert all((a == 0) == (b == 0) for a, b in pairs)
    assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs)


@pytest.mark.parametrize("tile,halo", [(32, 0), (48, 5), (100, 20)])
def test_semantic_regions_equal_one_pass(tile, halo):
    rng = np.random.default_rng(tile)
    classes = (ndimage.zoom(rng.integers(0, 4, (12, 12)), 160 / 12, order=0)[:160, :160]).astype(np.uint8)
    valid = np.ones(classes.shape, bool)
    valid[100:, :30] = False
    objects, _ = _stitch(classes, valid, tile, halo, task="semantic", classes=list("abcd"))
    labels, label_class = label_regions(classes, valid, 4)
    ids, parts = label_polygons(labels, 0, 0)
    truth = {
        (int(label_class[k]), shapely.to_wkb(shapely.normalize(merge_parts([p for i, p in zip(ids, parts) if i == k]))))
        for k in range(1, labels.max() + 1)
    }
    got = {(o[0], shapely.to_wkb(shapely.normalize(o[3]))) for o in objects}
    assert got == truth


def _touching_pair(size: int, seam: int) -> np.ndarray:
    """Two 10x10 squares sharing the wall at column ``seam``; the wall pixels are 'contact'."""
    probs = np.zeros((3, size, size), dtype=np.uint8)
    probs[0, 20:30, seam - 10 : seam + 10] = 255
    probs[2, 20:30, seam - 1 : seam + 1] = 255
    return probs


@pytest.mark.parametrize("tile,halo", [(32, 2), (32, 16), (64, 8)])
def test_watershed_keeps_touching_objects_apart_across_a_seam(tile, halo):
    probs = _touching_pair(128, seam=tile)  # the shared wall lies exactly on a tile seam
    valid = np.ones((128, 128), bool)
    three = _stitch(probs, valid, tile, halo, channels=["body", "border", "contact"])[0]
    one = _stitch(probs[:1], valid, tile, halo)[0]
    assert len(three) == 2 and sorted(o[1] for o in three) == [100, 100]
    assert len(one) == 1


def test_watershed_with_zero_halo_merges_at_the_seam_as_documented():
    probs = _touching_pair(128, seam=32)
    objects = _stitch(probs, np.ones((128, 128), bool), 32, 0, channels=["body", "border", "contact"])[0]
    assert len(objects) == 1  # no tile saw across the seam: adjacency decides (see geoseg.outputs.stitch)


def test_seam_objects_are_released_as_their_tiles_arrive():
    """Row-major arrival holds only the front of open tiles, not every seam object of the scene."""
    mask = (_blobs(480, seed=1) * 255).astype(np.uint8)[None]
    valid = np.ones(mask.shape[1:], bool)
    held = {True: [], False: []}
    for row_major in held:
        objects, _ = _stitch(
            mask,
            valid,
            32,
            4,
            row_major=row_major,
            probe=lambda st, row_major=row_major: held[row_major].append(len(st.groups)),
        )
        assert len(objects) == ndimage.label(mask[0] > 0, structure=CONNECTIVITY_8)[1]
        assert held[row_major][-1] == 0
    # Random arrival keeps nearly every seam object open at some point; row-major keeps a front.
    assert max(held[True]) < 0.25 * max(held[False])


def test_merge_parts_keeps_every_hole_of_a_region_split_by_seams():
    """A region with holes inside tiles, on seams and at a four-tile corner, cut into 3 x 3 tiles:
    merging its parts (outer rings unioned, holes carried over) equals polygonising it whole."""
    rng = np.random.default_rng(5)
    region = np.ones((90, 90), dtype=np.int32)
    for _ in range(60):  # small holes everywhere, some across seams
        r, c = rng.integers(1, 85, 2)
        region[r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = 0
    region[28:33, 28:33] = 0  # across the corner of four tiles
    region[0, :] = region[-1, :] = region[:, 0] = region[:, -1] = 1  # the region stays one piece
    _, whole = label_polygons(region, 0, 0)
    parts = []
    for r in range(0, 90, 30):
        for c in range(0, 90, 30):
            _, wkb = label_polygons(region[r : r + 30, c : c + 30], r, c)
            parts += wkb
    merged = merge_parts(parts)
    expected = shapely.from_wkb(whole)
    assert len(expected) == 1 and shapely.get_num_interior_rings(expected[0]) > 30
    assert merged.is_valid and merged.equals(expected[0])
    assert shapely.get_num_interior_rings(merged) == shapely.get_num_interior_rings(expected[0])
