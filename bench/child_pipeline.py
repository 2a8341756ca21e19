"""One ``geoseg.pipeline.run`` in this process (a subprocess of ``bench.run``); writes a JSON report.

The driver's own peak RSS is VmHWM from /proc/self/status (not ``getrusage``'s ru_maxrss, which
after fork + exec can report the parent's size); the parent also polls /proc.
``SceneJob.add`` and ``SceneJob.finish`` are wrapped (not changed) to time each tile's arrival at
the driver and the final write, and to sample the driver's RSS as tiles arrive.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.procmon import hwm_kb, rss_kb, rss_parts_kb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--factory", required=True)
    ap.add_argument("--tile-size", type=int, default=1024)
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    import geoseg.scene
    from geoseg.config import config_from_dict
    from geoseg.pipeline import run

    config = config_from_dict({
        "tiling": {"tile_size": args.tile_size, "halo": args.halo},
        "runtime": {"batch_size": args.batch_size, "device": "cpu"},
        "models": {"landuse": {"task": "semantic", "classes": ["c0", "c1", "c2", "c3", "c4"], "bands": [1, 2, 3],
                               "normalize": {"scale": 255.0}, "factory": args.factory}},
    }, "<bench>", base_dir=os.getcwd())

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rss_start_kb = rss_kb(os.getpid())
    parts_start = rss_parts_kb(os.getpid())
    arrivals: list[tuple[float, int, int]] = []  # (t, core pixels, driver rss kB)
    parts_last: dict[str, int] = {}
    finish_s: list[float] = []
    orig_add, orig_finish = geoseg.scene.SceneJob.add, geoseg.scene.SceneJob.finish

    def add(self, result):  # type: ignore[no-untyped-def]
        orig_add(self, result)
        core = result.tile.core
        parts = rss_parts_kb(os.getpid())
        parts_last.update(parts)
        arrivals.append((time.monotonic(), int(core.width * core.height), parts.get("VmRSS", 0)))

    def finish(self):  # type: ignore[no-untyped-def]
        t = time.monotonic()
        try:
            return orig_finish(self)
        finally:
            finish_s.append(time.monotonic() - t)

    geoseg.scene.SceneJob.add, geoseg.scene.SceneJob.finish = add, finish
    t0 = time.monotonic()
    report = run([args.input], args.out, config, progress=False)
    wall = time.monotonic() - t0
    peak_kb = hwm_kb(os.getpid())
    ray.shutdown()

    n = len(arrivals)
    px = sum(a[1] for a in arrivals)
    b = min(args.batch_size, n - 1)
    steady = sum(a[1] for a in arrivals[b:]) / max(arrivals[-1][0] - arrivals[b - 1][0], 1e-9) / 1e6 if n > b > 0 else None
    quart = {f"{q}%": round(arrivals[max(0, n * q // 100 - 1)][2] / 1024, 1) for q in (10, 25, 50, 75, 100)} if n else {}
    out = {
        "ok": report.ok,
        "failures": report.failures,
        "tiles": report.tiles,
        "core_megapixels": round(px / 1e6, 3),
        "wall_s": round(wall, 2),
        "first_tile_s": round(arrivals[0][0] - t0, 2) if n else None,
        "tiles_s": round(arrivals[-1][0] - arrivals[0][0], 2) if n else None,
        "finish_s": round(sum(finish_s), 2),
        "mpx_per_s_end_to_end": round(px / wall / 1e6, 4),
        "mpx_per_s_steady": round(steady, 4) if steady else None,
        "driver_rss_start_mib": round(rss_start_kb / 1024, 1),
        "driver_rss_at_tile_fraction_mib": quart,
        "driver_peak_rss_mib": round(peak_kb / 1024, 1),
        "driver_rss_parts_start_mib": {k: round(v / 1024, 1) for k, v in parts_start.items()},
        "driver_rss_parts_last_tile_mib": {k: round(v / 1024, 1) for k, v in parts_last.items()},
    }
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
