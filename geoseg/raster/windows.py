"""Where a model looks: overlapping windows on one grid per scene and head, and their blending weights.

Pure functions (numpy only). A network with global context (squeeze-and-excitation, attention)
answers for a pixel with its whole window in view, so two windows that meet disagree along their
shared edge whatever the halo. geoseg therefore runs each head on windows of ``window`` model pixels
laid on a fixed grid over the whole scene, ``overlap`` model pixels shared by neighbours, and
averages their probabilities with weights that fade in and out over the overlap (squared-sine
ramps: in a shared band the two weights add up to exactly 1, and a window's weight is 1 elsewhere).

The grid belongs to the scene, not to the tiles: a tile (the unit of work) computes the windows that
cover its read window and blends them, so the blended probabilities of a pixel are the same whatever
the tile size, halo or batch, for any model. Windows live on the input's pixel grid; when the
raster's pixel size differs from the model's, a window of ``side`` input pixels is resampled to the
model's ``model_side`` pixels and its probabilities back (``HeadWindows.scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rasterio.windows import Window

# Resample only when the raster's pixel size is off the model's by more than this factor: a 9.8 m
# Sentinel-2 pixel is a 10 m one.
RESAMPLE_ABOVE = 1.25


def padded32(n: int) -> int:
    """``n`` rounded up to a multiple of 32 (encoders downsample by 32)."""
    return -(-n // 32) * 32


@dataclass(frozen=True)
class HeadWindows:
    """One head's window grid on one scene, in input pixels (``model_side`` in model pixels)."""

    model_side: int  # window side the network sees (multiple of 32)
    side: int  # the same window on the input grid
    stride: int  # distance between window origins on the input grid
    scale: float = 1.0  # input pixels per model pixel (side / model_side): 1 when not resampled

    @property
    def overlap(self) -> int:
        """Input pixels shared by two neighbouring windows (the width of a fade)."""
        return self.side - self.stride

    @property
    def resampled(self) -> bool:
        return self.side != self.model_side

    def starts(self, extent: int) -> list[int]:
        """Origins of the windows along an axis of ``extent`` pixels. The first starts half an
        overlap before the raster (the raster's edge pixels then sit mid-fade, over reflected
        context); the last ends at or past the raster's end. One window, centred, covers an axis
        shorter than a window."""
        if extent <= self.side:
            return [-((self.side - extent) // 2)]
        first = -(self.overlap // 2)
        n = -(-(extent - first - self.side) // self.stride) + 1
        return [first + j * self.stride for j in range(n)]

    def covering(self, lo: int, hi: int, extent: int) -> list[int]:
        """Origins of the windows along an axis that overlap the pixels ``[lo, hi)``."""
        return [s for s in self.starts(extent) if s < hi and s + self.side > lo]

    def ramp(self) -> np.ndarray:
        """Weights along one axis of a window (``side`` values): squared-sine fades over the
        overlap at both ends, 1 between, never 0 (every pixel a window covers counts)."""
        w = np.ones(self.side, np.float32)
        o = self.overlap
        if o > 0:
            fade = np.sin(0.5 * np.pi * (np.arange(o, dtype=np.float64) + 0.5) / o) ** 2
            w[:o] = np.minimum(w[:o], fade)
            w[self.side - o :] = np.minimum(w[self.side - o :], fade[::-1])
        return w


@dataclass(frozen=True)
class BlendPlan:
    """A scene's window grids, one per head; ``key`` names the scene for the model actor's cache
    of window outputs (unique per run and scene attempt)."""

    key: str
    width: int
    height: int
    heads: dict[str, HeadWindows] = field(default_factory=dict)
    # Per head, the (scale, offset) from raw values to physical ones that the input itself gives
    # (a STAC Item's raster:bands): they replace the head's own normalize.scale and offset.
    scale_offsets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def windows(self, head: str, read: Window) -> list[tuple[int, int]]:
        """(row, col) origins of the head's windows that overlap the window ``read``."""
        hw = self.heads[head]
        r0, c0 = int(read.row_off), int(read.col_off)
        rows = hw.covering(r0, r0 + int(read.height), self.height)
        cols = hw.covering(c0, c0 + int(read.width), self.width)
        return [(r, c) for r in rows for c in cols]

    def context(self, read: Window) -> Window:
        """The pixels the windows over ``read`` need, clipped to the raster (beyond it they are
        reflected by the model actor)."""
        r0, c0 = int(read.row_off), int(read.col_off)
        r1, c1 = r0 + int(read.height), c0 + int(read.width)
        for name, hw in self.heads.items():
            wins = self.windows(name, read)
            r0, c0 = min(r0, *(r for r, _ in wins)), min(c0, *(c for _, c in wins))
            r1, c1 = max(r1, *(r + hw.side for r, _ in wins)), max(c1, *(c + hw.side for _, c in wins))
        r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, self.height), min(c1, self.width)
        return Window(c0, r0, c1 - c0, r1 - r0)


def head_windows(window: int, overlap: int, scale: float, width: int, height: int) -> HeadWindows:
    """A head's windows on a ``width`` x ``height`` raster: ``window`` and ``overlap`` in model
    pixels, ``scale`` input pixels per model pixel. A raster smaller than a window gets one window
    just big enough (small scenes cost what their pixels cost)."""
    extent = math.ceil(max(width, height) / scale)
    if extent <= window:
        model_side = padded32(extent)
        side = max(1, round(model_side * scale))
        return HeadWindows(model_side, side, side, scale=side / model_side)
    side = max(1, round(window * scale))
    stride = max(1, round((window - overlap) * scale))
    return HeadWindows(window, side, min(stride, side), scale=side / window)


def resample_scale(model_gsd_m: float | None, scene_gsd_m: float | None) -> float:
    """Input pixels per model pixel: 1 (no resampling) unless both pixel sizes are known and differ
    by more than ``RESAMPLE_ABOVE``."""
    if not model_gsd_m or not scene_gsd_m:
        return 1.0
    ratio = model_gsd_m / scene_gsd_m
    return ratio if (ratio > RESAMPLE_ABOVE or ratio < 1 / RESAMPLE_ABOVE) else 1.0


def blend_plan(config: Any, info: Any, key: str) -> BlendPlan | None:
    """The window grids of a scene (``geoseg.raster.read.SceneInfo``) for every head of ``config``; None
    with ``tiling.blend: none`` (each tile is then one window). A head whose contract gives its
    pixel size (``input.gsd_m``) is resampled to it when ``tiling.resample`` is on and the raster's
    differs by more than ``RESAMPLE_ABOVE``."""
    tiling = config.tiling
    if tiling.blend == "none":
        return None
    gsd: float | None = None
    heads = {}
    for name, spec in config.models.items():
        scale = 1.0
        if tiling.resample and spec.input.gsd_m:
            if gsd is None:
                from geoseg.core.contract import scene_gsd_m

                gsd = scene_gsd_m(info.crs_wkt, info.transform, info.width, info.height)
            scale = resample_scale(spec.input.gsd_m, gsd)
        heads[name] = head_windows(tiling.window, tiling.overlap, scale, info.width, info.height)
    return BlendPlan(key, info.width, info.height, heads, dict(getattr(info, "scale_offsets", None) or {}))
