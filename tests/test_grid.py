"""Tile planning: cores partition the raster exactly; reads contain cores and stay inside."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.raster.grid import padded_size, plan_tiles, tile_grid_shape


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 700), height=st.integers(1, 700), tile=st.integers(16, 300), halo=st.integers(0, 80))
def test_cores_partition_raster_and_reads_contain_cores(width, height, tile, halo):
    cover = np.zeros((height, width), dtype=np.int32)
    tiles = list(plan_tiles(width, height, tile, halo))
    assert len(tiles) == np.prod(tile_grid_shape(width, height, tile))
    for t in tiles:
        c, r = t.core, t.read
        cover[c.row_off : c.row_off + c.height, c.col_off : c.col_off + c.width] += 1
        assert 0 <= r.col_off <= c.col_off and c.col_off + c.width <= r.col_off + r.width <= width
        assert 0 <= r.row_off <= c.row_off and c.row_off + c.height <= r.row_off + r.height <= height
        # The read extends by exactly the halo wherever the raster allows it.
        assert c.col_off - r.col_off == min(halo, c.col_off)
        assert (r.row_off + r.height) - (c.row_off + c.height) == min(halo, height - c.row_off - c.height)
        rs, cs = t.core_in_read
        assert rs.stop - rs.start == c.height and cs.stop - cs.start == c.width
    assert (cover == 1).all()


def test_small_raster_is_one_tile():
    (t,) = plan_tiles(10, 7, 512, 64)
    assert (t.core.width, t.core.height, t.read.width, t.read.height) == (10, 7, 10, 7)


def test_last_row_and_column_are_shorter_not_snapped():
    tiles = list(plan_tiles(1000, 600, 512, 32))
    assert [(t.core.col_off, t.core.width) for t in tiles if t.row == 0] == [(0, 512), (512, 488)]
    assert [(t.core.row_off, t.core.height) for t in tiles if t.col == 0] == [(0, 512), (512, 88)]


def test_padded_size_is_a_multiple_of_32():
    assert padded_size(512, 64) == 640
    assert padded_size(500, 3) == 512
    assert padded_size(256, 0) == 256
