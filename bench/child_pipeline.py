"""One ``geoseg.runner.pipeline.run`` in this process (a subprocess of ``bench.run``); writes a JSON report.

Only the public API is used: ``run(inputs, out_dir, config, progress=False)`` and its
``RunReport`` (``progress`` = (unix time, core pixels) each time tile results reached their scene
writer, ``started_unix``, ``megapixels``). Nothing in geoseg is wrapped or patched.

- wall: ``time.perf_counter()`` around ``run``; end to end Mpx/s = core Mpx / that wall;
- steady Mpx/s: core pixels of the progress entries after the first / time from the first entry
  to the last (excludes Ray start, the model check, actor start and what happens after the last
  tile: finishing the scene);
- driver CPU: ``resource.getrusage(RUSAGE_SELF)`` (user + sys, every thread of this process)
  around ``run``; the Ray processes are other processes and do not count;
- driver peak RSS: VmHWM of this process right after ``run`` (the parent also polls the whole job).

Ray: ``run`` starts the local Ray itself (as ``geoseg run`` does) unless ``--ray-up`` is given or
``--num-cpus`` asks for another CPU count than this machine has; then Ray is started here first
(with that count), and the start is outside the timed ``run`` (recorded as ``ray_started_by: bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

from bench.procmon import hwm_kb, process_start_unix, rss_kb, rss_parts_kb


def _start_ray(num_cpus: int) -> None:
    import ray

    import geoseg.runner.pipeline as pipeline

    ensure = getattr(pipeline, "ensure_ray", None)
    try:
        if ensure is not None:
            ensure(num_cpus=num_cpus)
            return
    except TypeError:
        pass
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=getattr(pipeline, "LOCAL_OBJECT_STORE_BYTES", None),
    )


def progress_figures(progress: list[tuple[float, int]], started_unix: float) -> dict[str, object]:
    """First tile, steady rate and spread of the tile arrivals, from ``RunReport.progress``."""
    entries = sorted((float(t), int(px)) for t, px in progress)
    if not entries:
        return {"progress_entries": 0}
    t_first, t_last = entries[0][0], entries[-1][0]
    px_after_first = sum(px for _, px in entries[1:])
    span = t_last - t_first
    return {
        "progress_entries": len(entries),
        "core_megapixels_progress": round(sum(px for _, px in entries) / 1e6, 3),
        "first_tile_s": round(t_first - started_unix, 3),
        "first_to_last_tile_s": round(span, 3),
        "mpx_per_s_steady": round(px_after_first / span / 1e6, 4) if len(entries) > 1 and span > 0 else None,
        "first_tile_unix": round(t_first, 3),
        "last_tile_unix": round(t_last, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", action="append", required=True, help="raster (repeat for several)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", required=True, help="JSON file: the config dict (config_from_dict)")
    ap.add_argument("--base-dir", default=os.getcwd(), help="what relative factory paths are resolved against")
    ap.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs (default: run() decides)")
    ap.add_argument("--ray-up", action="store_true", help="start the local Ray before run() (not timed)")
    ap.add_argument(
        "--idle-seconds",
        type=float,
        default=0.0,
        help="after run(), measure the driver's CPU while Ray is up and idle for this long",
    )
    ap.add_argument("--json", required=True)
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    process_start = process_start_unix()
    import ray

    from geoseg.core.config import config_from_dict
    from geoseg.runner.pipeline import run

    with open(args.config) as fh:
        config = config_from_dict(json.load(fh), "<bench>", base_dir=args.base_dir)
    ray_started_by = "run"
    ray_start_s = None
    if args.ray_up or (args.num_cpus is not None and args.num_cpus != os.cpu_count()):
        t = time.perf_counter()
        _start_ray(args.num_cpus or os.cpu_count() or 1)
        ray_start_s, ray_started_by = round(time.perf_counter() - t, 2), "bench"
    rss_before_kb = rss_kb(os.getpid())
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0_unix = time.time()
    t0 = time.perf_counter()
    report = run(args.input, args.out, config, progress=False)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    peak_kb = hwm_kb(os.getpid())
    parts_end = rss_parts_kb(os.getpid())
    idle_cpu_per_s = None
    if args.idle_seconds > 0:  # Ray's own threads in the driver: a cost per second, not per pixel
        before = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(args.idle_seconds)
        after = resource.getrusage(resource.RUSAGE_SELF)
        idle_cpu_per_s = round(
            (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / args.idle_seconds, 5
        )
    up = ray.is_initialized()  # run() leaves the Ray it started up until the process exits
    cpus = ray.cluster_resources().get("CPU") if up else float(os.cpu_count() or 1)
    gpus = ray.cluster_resources().get("GPU", 0) if up else None
    ray.shutdown()

    started_unix = report.started_unix or t0_unix
    core_mpx = report.megapixels or sum(px for _, px in report.progress) / 1e6
    user, sys_ = cpu1.ru_utime - cpu0.ru_utime, cpu1.ru_stime - cpu0.ru_stime
    out: dict[str, object] = {
        "ok": report.ok,
        "failures": [[str(p), str(e)[:500]] for p, e in report.failures][:10],
        "tiles": report.tiles,
        "core_megapixels": round(core_mpx, 3),
        "wall_s": round(wall, 3),
        "report_seconds": round(report.seconds, 3),
        "mpx_per_s_end_to_end": round(core_mpx / wall, 4) if wall > 0 else None,
        **progress_figures(report.progress, started_unix),
        "run_started_unix": round(started_unix, 3),
        "run_returned_unix": round(t0_unix + wall, 3),
        "process_start_unix": round(process_start, 3),
        "driver_cpu_s": round(user + sys_, 3),
        "driver_cpu_user_s": round(user, 3),
        "driver_cpu_sys_s": round(sys_, 3),
        "driver_idle_cpu_s_per_s": idle_cpu_per_s,
        "driver_rss_before_run_mib": round(rss_before_kb / 1024, 1),
        "driver_peak_rss_mib": round(peak_kb / 1024, 1),
        "driver_rss_parts_end_mib": {k: round(v / 1024, 1) for k, v in parts_end.items()},
        "ray_started_by": ray_started_by,
        "ray_start_s": ray_start_s,
        "ray_cpus": cpus,
        "ray_gpus": gpus,
    }
    if out["progress_entries"]:
        out["after_last_tile_s"] = round(t0_unix + wall - float(out["last_tile_unix"]), 3)  # type: ignore[arg-type]
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
