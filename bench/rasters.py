"""Cheap synthetic rasters for the benchmarks, written window by window (memory independent of size).

3-band uint8, deflate-compressed 512 x 512 tiles, nodata 0 (never used: every value is >= 1, so
all pixels are valid and every tile goes through the model). The content is a blocky pattern plus
a faint texture: it compresses well, so writing 20000^2 takes seconds, not minutes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

WINDOW = 2048
CRS = "EPSG:32632"  # UTM 32N: planar metres, so pixel area = pixel_size^2


def write_raster(path: str | Path, width: int, height: int | None = None, pixel_size: float = 10.0) -> Path:
    """Write (or reuse, if it already has this size) a synthetic 3-band scene at ``path``."""
    path = Path(path)
    height = height or width
    if path.exists():
        with rasterio.open(path) as ds:
            if (ds.width, ds.height, ds.count, ds.res[0]) == (width, height, 3, pixel_size):
                return path
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=3,
        dtype="uint8",
        nodata=0,
        crs=CRS,
        transform=Affine(pixel_size, 0, 300000.0, 0, -pixel_size, 5500000.0),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        zlevel=1,
        BIGTIFF="IF_SAFER",
    )
    tmp = path.with_name(f".{path.name}.partial")
    with rasterio.open(tmp, "w", **profile) as ds:
        for r0 in range(0, height, WINDOW):
            for c0 in range(0, width, WINDOW):
                h, w = min(WINDOW, height - r0), min(WINDOW, width - c0)
                rows = np.arange(r0, r0 + h, dtype=np.int64)[:, None]
                cols = np.arange(c0, c0 + w, dtype=np.int64)[None, :]
                block = ((rows // 97) * 7 + (cols // 131) * 13) % 11
                texture = (rows + 2 * cols) % 5
                bands = np.stack([(block * (23 + 9 * k) + texture * (k + 1)) % 200 + 20 for k in range(3)])
                ds.write(bands.astype(np.uint8), window=Window(c0, r0, w, h))
    os.replace(tmp, path)
    return path
