"""Instance post-processing alone, in this process (a subprocess of ``bench.run``); writes a JSON report.

A scene of planted rectangular objects (a jittered grid, 3+ pixels apart, ~2% of them 100-320 px
long so they cross one or more seams) is cut into the pipeline's tiles. For each tile the body
probability the model would return is rendered directly (no raster file, no model), then:

- ``geoseg.models.postprocess.postprocess_tile``: instance decoding (connected components of body >
  threshold), per-object stats, vectorising (GDAL polygonize) and seam rings: the Ray-task side;
- ``geoseg.outputs.stitch.HeadStitcher.add`` / ``finish``: seam merging (union-find) on the driver side;
- ``geoseg.outputs.export.ObjectSink`` + ``LayerWriter``: measuring and writing each final object to a
  GeoPackage (timed apart, as "export").

The emitted object count must equal the planted count: every object crossing seams is merged.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from bench.procmon import hwm_kb, rss_kb

STEP = 40  # grid cell (px); objects stay 3 px inside their cell(s), so they never touch


def plan(size: int, seed: int = 0) -> np.ndarray:
    """Objects as int64 rows (r0, c0, r1, c1), half-open pixel boxes."""
    rng = np.random.default_rng(seed)
    n = size // STEP
    occupied = np.zeros((n, n), dtype=bool)
    boxes: list[tuple[int, int, int, int]] = []
    for i in range(n):
        for j in range(n):
            if occupied[i, j]:
                continue
            u = rng.random()
            if u < 0.35:
                continue
            k = int(rng.integers(3, 9))
            thick = int(rng.integers(6, 11))
            if u > 0.99 and j + k <= n and not occupied[i, j : j + k].any():  # long, horizontal
                occupied[i, j : j + k] = True
                r0 = i * STEP + int(rng.integers(3, STEP - 3 - thick + 1))
                boxes.append((r0, j * STEP + 3, r0 + thick, (j + k) * STEP - 3))
            elif u > 0.98 and i + k <= n and not occupied[i : i + k, j].any():  # long, vertical
                occupied[i : i + k, j] = True
                c0 = j * STEP + int(rng.integers(3, STEP - 3 - thick + 1))
                boxes.append((i * STEP + 3, c0, (i + k) * STEP - 3, c0 + thick))
            else:
                occupied[i, j] = True
                h, w = (int(v) for v in rng.integers(6, 25, 2))
                r0 = i * STEP + int(rng.integers(3, STEP - 3 - h + 1))
                c0 = j * STEP + int(rng.integers(3, STEP - 3 - w + 1))
                boxes.append((r0, c0, r0 + h, c0 + w))
    arr = np.asarray(boxes, dtype=np.int64)
    return arr[np.argsort(arr[:, 0], kind="stable")]


def render(boxes: np.ndarray, r0: int, c0: int, h: int, w: int, max_len: int) -> np.ndarray:
    """Body probability (uint8, p * 255) over one read window: 240 on objects, 5 elsewhere."""
    probs = np.full((1, h, w), 5, dtype=np.uint8)
    lo, hi = np.searchsorted(boxes[:, 0], [r0 - max_len, r0 + h])
    cand = boxes[lo:hi]
    hit = cand[(cand[:, 2] > r0) & (cand[:, 1] < c0 + w) & (cand[:, 3] > c0)]
    for a, b, c, d in hit.tolist():
        probs[0, max(a - r0, 0) : min(c - r0, h), max(b - c0, 0) : min(d - c0, w)] = 240
    return probs


def _open_objects(stitcher: object) -> int:
    """Seam objects the stitcher holds (the attribute's name differs between versions)."""
    for name in ("groups", "pending"):
        held = getattr(stitcher, name, None)
        if held is not None:
            return len(held)
    return -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--pixel-size", type=float, default=0.5)
    ap.add_argument("--gpkg", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    from affine import Affine
    from rasterio.crs import CRS

    from geoseg.core.config import config_from_dict
    from geoseg.core.units import ground_scale
    from geoseg.models.postprocess import postprocess_tile
    from geoseg.outputs.export import INSTANCE_FIELDS, LayerWriter, ObjectSink
    from geoseg.outputs.stitch import HeadStitcher
    from geoseg.raster.grid import plan_tiles, tile_grid_shape

    size, ts = args.size, args.tile_size
    config = config_from_dict(
        {
            "tiling": {"tile_size": ts, "halo": args.halo},
            "models": {
                "buildings": {
                    "task": "instance",
                    "classes": ["building"],
                    "channels": ["body"],
                    "bands": [1, 2, 3],
                    "factory": "geoseg.train.synth:oracle_buildings",
                }
            },
        },
        "<bench>",
    )
    spec = config.models["buildings"]
    crs_wkt = CRS.from_epsg(32632).to_wkt()
    transform = Affine(args.pixel_size, 0, 300000.0, 0, -args.pixel_size, 5500000.0)
    scale = ground_scale(crs_wkt, transform, size, size)
    bounds = (transform.c, transform.f - size * args.pixel_size, transform.c + size * args.pixel_size, transform.f)
    if os.path.exists(args.gpkg):
        os.unlink(args.gpkg)
    sink = ObjectSink(
        spec, LayerWriter(args.gpkg, "buildings", crs_wkt, INSTANCE_FIELDS), transform, crs_wkt, bounds, scale
    )
    export_s = [0.0]

    def emit(*batch):  # type: ignore[no-untyped-def]  # arrays: classes, pixels, areas, scores, geometries
        t = time.perf_counter()
        try:
            return sink(*batch)
        finally:
            export_s[0] += time.perf_counter() - t

    t = time.perf_counter()
    boxes = plan(size)
    plan_s = time.perf_counter() - t
    max_len = int((boxes[:, 2] - boxes[:, 0]).max())
    planted_pixels = int(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum())
    grid = tile_grid_shape(size, size, ts)
    stitcher = HeadStitcher(grid, True, emit)
    rss_start_kb = rss_kb(os.getpid())
    render_s = post_s = stitch_s = 0.0
    max_pending = max_rings = fragments = 0
    for tile in plan_tiles(size, size, ts, args.halo):
        rd = tile.read
        t = time.perf_counter()
        probs = render(boxes, int(rd.row_off), int(rd.col_off), int(rd.height), int(rd.width), max_len)
        pred = {
            "tile": tile,
            "status": "ok",
            "valid": np.ones(probs.shape[1:], dtype=bool),
            "heads": {"buildings": probs},
        }
        core = tile.core
        pixel_area = scale.pixel_areas.window(int(core.row_off), int(core.col_off), int(core.height), int(core.width))
        t1 = time.perf_counter()
        result = postprocess_tile(pred, config, pixel_area, grid)
        t2 = time.perf_counter()
        head = result.heads["buildings"]
        fragments += len(head.frag_wkb)
        stitcher.add(tile.row, tile.col, head)
        t3 = time.perf_counter()
        render_s, post_s, stitch_s = render_s + t1 - t, post_s + t2 - t1, stitch_s + t3 - t2
        max_pending, max_rings = max(max_pending, _open_objects(stitcher)), max(max_rings, len(stitcher.rings))
    t = time.perf_counter()
    stitcher.finish()
    sink.layer.flush()
    stitch_s += time.perf_counter() - t
    stitch_only = stitch_s - export_s[0]
    peak_kb = hwm_kb(os.getpid())
    n = len(boxes)
    out = {
        "size": size,
        "tiles": grid[0] * grid[1],
        "objects_planted": n,
        "objects_crossing_seams": int(
            ((boxes[:, 0] // ts) != ((boxes[:, 2] - 1) // ts)).sum()
            + ((boxes[:, 1] // ts) != ((boxes[:, 3] - 1) // ts)).sum()
        ),
        "objects_emitted": int(sink.count[0]),
        "pixels_planted": planted_pixels,
        "pixels_emitted": int(sink.pixels[0]),
        "polygon_fragments": fragments,
        "seconds": {
            "plan_and_render_not_counted": round(plan_s + render_s, 2),
            "decode_vectorise": round(post_s, 2),
            "seam_merge": round(stitch_only, 2),
            "export_gpkg": round(export_s[0], 2),
            "total": round(post_s + stitch_s, 2),
        },
        "us_per_object": {
            "decode_vectorise": round(post_s / n * 1e6, 1),
            "seam_merge": round(stitch_only / n * 1e6, 1),
            "export_gpkg": round(export_s[0] / n * 1e6, 1),
            "total": round((post_s + stitch_s) / n * 1e6, 1),
        },
        "max_pending_seam_objects": max_pending,
        "max_open_tile_rings": max_rings,
        "rss_start_mib": round(rss_start_kb / 1024, 1),
        "peak_rss_mib": round(peak_kb / 1024, 1),
        "peak_rss_growth_mib": round((peak_kb - rss_start_kb) / 1024, 1),
    }
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
