"""The I/O floor of the trivial benchmark, in one process on one core: read every block of the
input (all bands, window by window, as the read tasks do) and write a one-band uint8 class mask
as a deflate COG (as the published output). No model, no Ray: what the pipeline cannot beat per core.

``python -m bench.child_io_floor --input RASTER --out MASK --json OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

WINDOW = 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    raw = args.out + ".raw.tif"
    t0 = time.perf_counter()
    with rasterio.Env(GDAL_NUM_THREADS="1"), rasterio.open(args.input) as src:
        profile = dict(
            driver="GTiff",
            width=src.width,
            height=src.height,
            count=1,
            dtype="uint8",
            crs=src.crs,
            transform=src.transform,
            tiled=True,
            blockxsize=512,
            blockysize=512,
            compress="zstd",
            zstd_level=1,
        )
        read_s = 0.0
        with rasterio.open(raw, "w", **profile) as dst:
            for r in range(0, src.height, WINDOW):
                for c in range(0, src.width, WINDOW):
                    w = Window(c, r, min(WINDOW, src.width - c), min(WINDOW, src.height - r))
                    t = time.perf_counter()
                    image = src.read(window=w)
                    read_s += time.perf_counter() - t
                    dst.write(np.zeros(image.shape[1:], np.uint8), 1, window=w)
        t1 = time.perf_counter()
        rasterio.shutil.copy(
            raw,
            args.out,
            driver="COG",
            compress="DEFLATE",
            blocksize=512,
            overview_resampling="NEAREST",
            num_threads="1",
        )
        t2 = time.perf_counter()
        mpx = src.width * src.height / 1e6
    os.unlink(raw)
    os.unlink(args.out)
    with open(args.json, "w") as fh:
        json.dump(
            {
                "megapixels": round(mpx, 3),
                "read_s": round(read_s, 3),
                "read_and_raw_write_s": round(t1 - t0, 3),
                "cog_s": round(t2 - t1, 3),
                "total_s": round(t2 - t0, 3),
                "mpx_per_s_one_core": round(mpx / (t2 - t0), 3),
                "read_mpx_per_s": round(mpx / read_s, 3),
            },
            fh,
            indent=2,
        )


if __name__ == "__main__":
    main()
