"""Tile planning on a raster's pixel grid. Pure functions: no file is opened here.

Invariants (tested): the cores of ``plan_tiles`` partition the raster exactly, each core lies
inside its read window, and every read window lies inside the raster. Context beyond the raster
edge does not exist; the reader pads it (see ``geoseg.raster.read``) and marks it invalid.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window


@dataclass(frozen=True, slots=True)
class Tile:
    """One unit of work: ``core`` pixels are written, ``read`` = core + halo (clipped to the raster)
    is what its objects are decoded over, and ``context`` (when the models run on blended windows,
    ``geoseg.raster.windows``) the pixels those windows need: what is read from the raster."""

    scene: int
    index: int
    row: int
    col: int
    core: Window
    read: Window
    context: Window | None = None

    @property
    def source(self) -> Window:
        """The window read from the raster: the context when there is one, else the read window."""
        return self.context if self.context is not None else self.read

    @property
    def read_in_source(self) -> tuple[slice, slice]:
        """Slices that crop the array read (``source``) to the read window."""
        src = self.source
        r0 = int(self.read.row_off - src.row_off)
        c0 = int(self.read.col_off - src.col_off)
        return slice(r0, r0 + int(self.read.height)), slice(c0, c0 + int(self.read.width))

    @property
    def core_in_read(self) -> tuple[slice, slice]:
        """Slices that crop the read array to the core."""
        r0 = int(self.core.row_off - self.read.row_off)
        c0 = int(self.core.col_off - self.read.col_off)
        return slice(r0, r0 + int(self.core.height)), slice(c0, c0 + int(self.core.width))


def tile_grid_shape(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """Number of tile (rows, cols): ceil division, the last row/column holds the remainder."""
    return -(-height // tile_size), -(-width // tile_size)


def plan_tiles(width: int, height: int, tile_size: int, halo: int, scene: int = 0) -> Iterator[Tile]:
    """Yield tiles row-major. Cores are ``tile_size`` squares, shorter in the last row/column.

    >>> [(t.core.width, t.read.width) for t in plan_tiles(10, 4, 4, 1)]
    [(4, 5), (4, 6), (2, 3)]
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"raster has no pixels: {width} x {height}")
    rows, cols = tile_grid_shape(width, height, tile_size)
    for r in range(rows):
        for c in range(cols):
            y0, x0 = r * tile_size, c * tile_size
            h, w = min(tile_size, height - y0), min(tile_size, width - x0)
            ry0, rx0 = max(0, y0 - halo), max(0, x0 - halo)
            ry1, rx1 = min(height, y0 + h + halo), min(width, x0 + w + halo)
            yield Tile(
                scene=scene,
                index=r * cols + c,
                row=r,
                col=c,
                core=Window(x0, y0, w, h),
                read=Window(rx0, ry0, rx1 - rx0, ry1 - ry0),
            )


def padded_size(tile_size: int, halo: int, multiple: int = 32) -> int:
    """Side of the square every tile is padded to before the model: core + 2 halo, up to ``multiple``.

    U-Net style encoders downsample by 32, so inputs must be a multiple of it.
    """
    side = tile_size + 2 * halo
    return -(-side // multiple) * multiple


def read_offset(tile: Tile, halo: int) -> tuple[int, int]:
    """(row, col) where the read window starts in the padded square whose core starts at ``(halo, halo)``."""
    return halo - int(tile.core.row_off - tile.read.row_off), halo - int(tile.core.col_off - tile.read.col_off)


def pad_to_square(arr: np.ndarray, tile: Tile, halo: int, side: int, mode: str = "reflect") -> np.ndarray:
    """Place a read array (``... x h x w``) in a ``side`` square with the core at ``(halo, halo)``.

    ``reflect`` fills the context missing beyond the raster edge (predictor and training alike);
    ``constant`` fills it with zeros (validity masks).
    """
    r0, c0 = read_offset(tile, halo)
    h, w = arr.shape[-2:]
    pads = [(0, 0)] * (arr.ndim - 2) + [(r0, side - r0 - h), (c0, side - c0 - w)]
    if mode == "reflect" and min(h, w) <= 1:
        mode = "edge"
    return np.pad(arr, pads, mode=mode)  # type: ignore[call-overload]
