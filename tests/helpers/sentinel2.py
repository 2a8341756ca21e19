"""Sentinel-2 stacks for tests: the sen2ships band files (B02 B03 B04 B08, one file each) stacked
into one 4-band GeoTIFF, as a user would before geoseg reads STAC Items, at 10 m or averaged to 30 m."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

BANDS = ("B02", "B03", "B04", "B08")  # blue, green, red, nir


def band_files(shared_data: Path, city: str) -> list[Path]:
    folder = shared_data / "sen2ships" / city
    return [next(folder.glob(f"*L2A_{band}_*.tif*")) for band in BANDS]


def stack(shared_data: Path, city: str, out: Path, factor: int = 1) -> Path:
    """``out``: the city's four bands in one uint16 GeoTIFF; ``factor`` > 1 averages factor x factor
    pixels (10 m -> 30 m for 3), dropping the rows and columns that do not fill a block."""
    files = band_files(shared_data, city)
    with rasterio.open(files[0]) as first:
        profile = first.profile
        width, height = first.width // factor, first.height // factor
        transform = first.transform * first.transform.scale(factor, factor)
    profile.update(
        count=len(files),
        width=width,
        height=height,
        transform=transform,
        compress="deflate",
        tiled=True,
        blockxsize=256,
        blockysize=256,
    )
    with rasterio.open(out, "w", **profile) as dst:
        for i, path in enumerate(files, start=1):
            with rasterio.open(path) as src:
                window = Window(0, 0, width * factor, height * factor)
                band = src.read(1, window=window, out_shape=(height, width), resampling=Resampling.average)
                dst.write(band.astype(np.uint16), i)
    return out
