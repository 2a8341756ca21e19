"""How visible a tiling is in a class mask: the seam index.

For each pair of adjacent columns, the fraction of rows whose class differs across it (likewise for
adjacent rows); the mean of that rate over the lines of a grid (multiples of ``spacing`` from the
raster's origin) divided by its mean over all lines, pixels equal to ``nodata`` left out. 1 means
the grid leaves no trace; rectangular tile seams score far above it (22-54 for a real cloud network
cut into 256-512 px tiles without blending).
"""

from __future__ import annotations

import numpy as np


def change_rates(mask: np.ndarray, nodata: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of pixel pairs that differ across each vertical line (between columns c-1 and c,
    index c-1) and each horizontal line (between rows r-1 and r), nodata pairs left out (NaN where
    a line has no valid pair)."""
    valid = np.ones(mask.shape, bool) if nodata is None else mask != nodata
    rates = []
    for a, b, va, vb, axis in (
        (mask[:, :-1], mask[:, 1:], valid[:, :-1], valid[:, 1:], 0),
        (mask[:-1], mask[1:], valid[:-1], valid[1:], 1),
    ):
        both = va & vb
        pairs = both.sum(axis=axis)
        diff = ((a != b) & both).sum(axis=axis)
        with np.errstate(invalid="ignore", divide="ignore"):
            rates.append(np.where(pairs > 0, diff / np.maximum(pairs, 1), np.nan))
    return rates[0], rates[1]


def seam_index(mask: np.ndarray, spacing: int, nodata: int | None = None) -> float:
    """The seam index of ``mask`` against a grid of lines every ``spacing`` pixels (see the module
    docstring); NaN when the grid crosses the mask nowhere or the mask never changes class."""
    cols, rows = change_rates(mask, nodata)
    grid = np.concatenate([cols[spacing - 1 :: spacing], rows[spacing - 1 :: spacing]])
    every = np.concatenate([cols, rows])
    grid, every = grid[np.isfinite(grid)], every[np.isfinite(every)]
    if grid.size == 0 or every.size == 0 or every.mean() == 0:
        return float("nan")
    return float(grid.mean() / every.mean())
