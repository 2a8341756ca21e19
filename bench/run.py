"""``make bench``: measure geoseg and write ``bench/results.json`` and ``bench/RESULTS.md``.

Three benchmarks, each in subprocesses so that peak memory is that of one run:

- ``memory``: the full pipeline (trivial model) on synthetic rasters of two sizes (default
  10000^2 and 20000^2); the driver's peak RSS must stay under 1.5 GB and not grow with size;
- ``throughput``: the pipeline with a real network (smp U-Net/ResNet-18, random weights) against
  the same network alone in a loop (same batch, same padded tile side, same thread count), and
  the pipeline with the trivial model on the same tiles (its own ceiling);
- ``instances``: instance decoding + vectorising + seam merging (+ GeoPackage export) on
  planted scenes of two sizes (the larger with >= 50,000 objects): time, memory, linearity.

Usage: ``python -m bench.run --out bench/results.json [--only memory,throughput] [--quick]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procmon import Monitor
from bench.rasters import write_raster
from bench.report import write_markdown

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / "bench" / "scratch"
TRIVIAL = "bench/models.py:trivial_semantic"
UNET_FILE, UNET_MODULE = "bench/models.py:unet_resnet18", "bench.models:unet_resnet18"
BOUND_MB = 1500.0  # 1.5 GB (decimal), the driver's budget
PIXEL_SIZE_M = 10.0  # synthetic rasters: 10 m pixels (Sentinel-2 class), planar UTM -> 100 m^2 per pixel
SECTIONS = ("memory", "throughput", "instances")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Cores, RAM, versions, device. Heavy imports (torch, GDAL) run in a throw-away subprocess so
    this process stays small: a child forked from a big parent reports the parent's size in ru_maxrss."""
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    probe = ("import json, torch, rasterio; print(json.dumps({'device': torch.cuda.get_device_name(0) "
             "if torch.cuda.is_available() else 'cpu', 'torch_threads_default': torch.get_num_threads(), "
             "'gdal': rasterio.__gdal_version__}))")
    try:
        extra = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                          timeout=300).stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        extra = {}
    status = subprocess.run(["git", "status", "--porcelain", "geoseg"], cwd=REPO, capture_output=True, text=True).stdout
    return {
        "cpu_cores": os.cpu_count(),
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name")), platform.processor()),
        "ram_gib": round(mem_kb / 1024**2, 1),
        "device": extra.get("device"),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torch_threads_default": extra.get("torch_threads_default"),
        "ray": _version("ray"),
        "rasterio": _version("rasterio"),
        "gdal": extra.get("gdal"),
        "numpy": _version("numpy"),
        "shapely": _version("shapely"),
        "segmentation_models_pytorch": _version("segmentation-models-pytorch"),
        "os": platform.platform(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "geoseg_uncommitted_files": [ln[3:] for ln in status.splitlines() if ln.strip()],
        "GDAL_CACHEMAX_env": os.environ.get("GDAL_CACHEMAX"),
    }


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _child(module: str, args: list[str], monitor: bool = False, timeout: int = 1200) -> dict[str, Any]:
    """Run ``python -m module args --json tmp``; returns its JSON (plus the monitor's figures)."""
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=SCRATCH)
    os.close(fd)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", module, *args, "--json", tmp]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mon = Monitor(proc.pid) if monitor else None
    try:
        if mon:
            mon.__enter__()
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            return {"error": f"timed out after {timeout} s", "stderr_tail": (err or "")[-2000:]}
    finally:
        if mon:
            mon.__exit__(None, None, None)
    out: dict[str, Any]
    try:
        out = json.loads(Path(tmp).read_text())
    except (OSError, ValueError):
        out = {"error": f"exit code {proc.returncode}", "stderr_tail": (err or "")[-3000:]}
    finally:
        Path(tmp).unlink(missing_ok=True)
    out["process_wall_s"] = round(time.monotonic() - started, 2)
    if mon:
        out.update(mon.figures())
    return out


def _pipeline(raster: Path, factory: str, tile: int, halo: int, batch: int, tag: str) -> dict[str, Any]:
    out_dir = SCRATCH / f"out-{tag}"
    shutil.rmtree(out_dir, ignore_errors=True)
    res = _child("bench.child_pipeline", ["--input", str(raster), "--out", str(out_dir), "--factory", factory,
                                          "--tile-size", str(tile), "--halo", str(halo), "--batch-size", str(batch)],
                 monitor=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    if "error" not in res and not res.get("ok"):
        res["error"] = "; ".join(f"{p}: {e}" for p, e in res.get("failures", [])) or "run not ok"
    return res


def bench_memory(sizes: list[int], tile: int, halo: int, batch: int) -> dict[str, Any]:
    runs = []
    for size in sizes:
        raster = write_raster(SCRATCH / f"mem-{size}.tif", size, pixel_size=PIXEL_SIZE_M)
        log(f"memory: pipeline, trivial model, {size} x {size} ({(-(-size // tile)) ** 2} tiles)")
        load = _load()
        res = _pipeline(raster, TRIVIAL, tile, halo, batch, f"mem-{size}")
        res.update(size=size, megapixels=size * size / 1e6, load_avg_before=load, load_avg_after=_load())
        runs.append(res)
        log(f"memory: {size}^2 -> driver peak {res.get('driver_peak_rss_mib')} MiB, {res.get('wall_s')} s")
        raster.unlink(missing_ok=True)
    mib = 1e6 / 2**20
    ok = [r for r in runs if "error" not in r]
    figures: dict[str, Any] = {"bound_mib": round(BOUND_MB * mib, 1)}
    if ok:
        peaks = [r["driver_peak_rss_mib"] for r in ok]
        figures["driver_peak_rss_mib"] = {str(r["size"]): r["driver_peak_rss_mib"] for r in ok}
        figures["driver_peak_under_bound"] = max(peaks) < BOUND_MB * mib
        figures["ray_workers_peak_pss_sum_mib"] = {str(r["size"]): r.get("ray_workers_peak_pss_sum_mib") for r in ok}
    if len(ok) >= 2:
        small, big = ok[0], ok[-1]
        growth = big["driver_peak_rss_mib"] - small["driver_peak_rss_mib"]
        figures["peak_growth_mib"] = round(growth, 1)
        figures["pixels_ratio"] = round(big["megapixels"] / small["megapixels"], 2)
        # Flat: the bigger raster adds less than 10% of the smaller run's peak.
        figures["flat_in_raster_size"] = growth < 0.1 * small["driver_peak_rss_mib"]
    return {"parameters": {"sizes": sizes, "tile_size": tile, "halo": halo, "batch_size": batch, "model": TRIVIAL,
                           "pixel_size_m": PIXEL_SIZE_M, "raster": "synthetic 3-band uint8, deflate, 512 tiles"},
            "runs": runs, "figures": figures}


def bench_throughput(width: int, height: int, tile: int, halo: int, batch: int, batches: int) -> dict[str, Any]:
    raster = write_raster(SCRATCH / f"tp-{width}x{height}.tif", width, height, pixel_size=PIXEL_SIZE_M)
    tiles = (-(-width // tile)) * (-(-height // tile))
    margs = ["--factory", UNET_MODULE, "--tile-size", str(tile), "--halo", str(halo), "--batch-size", str(batch)]
    load = _load()
    log(f"throughput: U-Net alone, 1 thread, {batches} batches of {batch}")
    alone_before = _child("bench.child_model", [*margs, "--threads", "1", "--batches", str(batches)])
    log(f"throughput: pipeline, U-Net, {width} x {height} ({tiles} tiles)")
    pipe_unet = _pipeline(raster, UNET_FILE, tile, halo, batch, "tp-unet")
    log("throughput: pipeline, trivial model, same tiles")
    pipe_trivial = _pipeline(raster, TRIVIAL, tile, halo, batch, "tp-trivial")
    log("throughput: U-Net alone again (1 thread), and with 2 threads")
    alone_after = _child("bench.child_model", [*margs, "--threads", "1", "--batches", "1"])
    alone_2t = _child("bench.child_model", [*margs, "--threads", "2", "--batches", "1"])
    raster.unlink(missing_ok=True)
    batch_times = alone_before.get("batch_seconds", []) + alone_after.get("batch_seconds", [])
    figures: dict[str, Any] = {}
    px_area = PIXEL_SIZE_M**2
    if batch_times:
        alone = batch * tile**2 / statistics.median(batch_times) / 1e6
        figures["model_alone_1thread_mpx_s"] = round(alone, 4)
        if "mpx_per_s" in alone_2t:
            figures["model_alone_2threads_mpx_s"] = alone_2t["mpx_per_s"]
        if "error" not in pipe_unet:
            figures["pipeline_unet_mpx_s_steady"] = pipe_unet["mpx_per_s_steady"]
            figures["pipeline_unet_mpx_s_end_to_end"] = pipe_unet["mpx_per_s_end_to_end"]
            figures["ratio_pipeline_to_model_alone_steady"] = round(pipe_unet["mpx_per_s_steady"] / alone, 3)
            figures["ratio_pipeline_to_model_alone_end_to_end"] = round(pipe_unet["mpx_per_s_end_to_end"] / alone, 3)
            figures["pipeline_unet_km2_h_steady"] = round(pipe_unet["mpx_per_s_steady"] * 1e6 * px_area * 3600 / 1e6, 1)
    if "error" not in pipe_trivial:
        figures["pipeline_trivial_mpx_s_steady"] = pipe_trivial["mpx_per_s_steady"]
        figures["pipeline_trivial_mpx_s_end_to_end"] = pipe_trivial["mpx_per_s_end_to_end"]
        figures["pipeline_trivial_km2_h_steady"] = round(pipe_trivial["mpx_per_s_steady"] * px_area * 3600, 1)
    return {
        "parameters": {"width": width, "height": height, "tiles": tiles, "tile_size": tile, "halo": halo,
                       "batch_size": batch, "model": "smp.Unet('resnet18', encoder_weights=None, in_channels=3, classes=5)",
                       "actor_torch_threads": 1, "pixel_size_m": PIXEL_SIZE_M,
                       "steady": "core Mpx of tiles after the first batch / time from the first batch's arrival to the last tile",
                       "end_to_end": "core Mpx / wall time of geoseg.pipeline.run (model check, actor start, COG finish included)"},
        "load_avg_before": load, "load_avg_after": _load(),
        "model_alone_1thread": [alone_before, alone_after], "model_alone_2threads": alone_2t,
        "pipeline_unet": pipe_unet, "pipeline_trivial": pipe_trivial, "figures": figures,
    }


def bench_instances(sizes: list[int], tile: int, halo: int) -> dict[str, Any]:
    runs = []
    for size in sizes:
        log(f"instances: {size} x {size}, tile {tile}")
        gpkg = SCRATCH / f"inst-{size}.gpkg"
        load = _load()
        res = _child("bench.child_instances", ["--size", str(size), "--tile-size", str(tile), "--halo", str(halo),
                                               "--gpkg", str(gpkg)])
        res.update(load_avg_before=load, load_avg_after=_load())
        gpkg.unlink(missing_ok=True)
        runs.append(res)
        log(f"instances: {size}^2 -> {res.get('objects_emitted')} objects, {res.get('seconds', {}).get('total')} s")
    ok = [r for r in runs if "error" not in r]
    figures: dict[str, Any] = {}
    if ok:
        figures["all_objects_recovered"] = all(r["objects_emitted"] == r["objects_planted"]
                                               and r["pixels_emitted"] == r["pixels_planted"] for r in ok)
    if len(ok) >= 2:
        small, big = ok[0], ok[-1]
        figures["objects_ratio"] = round(big["objects_planted"] / small["objects_planted"], 2)
        figures["time_ratio"] = round(big["seconds"]["total"] / small["seconds"]["total"], 2)
        figures["us_per_object_ratio"] = round(big["us_per_object"]["total"] / small["us_per_object"]["total"], 2)
        figures["roughly_linear"] = figures["us_per_object_ratio"] < 1.5
    return {"parameters": {"sizes": sizes, "tile_size": tile, "halo": halo, "channels": ["body"],
                           "objects": "jittered 40 px grid, 65% filled, 6-24 px boxes, ~2% 100-320 px long",
                           "pixel_size_m": 0.5},
            "runs": runs, "figures": figures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results.json")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the harness, not figures")
    ap.add_argument("--keep-scratch", action="store_true")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s): {sorted(unknown)}")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    results: dict[str, Any] = {}
    if out_path.exists() and set(only) != set(SECTIONS):
        results = json.loads(out_path.read_text())  # keep the sections not re-run
    started = time.monotonic()
    machine = machine_info()
    results["machine"] = machine
    results["quick"] = args.quick
    q = args.quick
    for section in only:
        t = time.monotonic()
        if section == "memory":
            res = bench_memory([2048, 4096] if q else [10000, 20000], 1024, 64, 8)
        elif section == "throughput":
            res = bench_throughput(2048 if q else 4096, 1024 if q else 3072, 1024, 64, 2 if q else 4, 1 if q else 2)
        else:
            res = bench_instances([1500, 3000] if q else [6000, 12000], 512, 64)
        res["machine"] = machine
        res["seconds"] = round(time.monotonic() - t, 1)
        results[section] = res
        out_path.write_text(json.dumps(results, indent=2))
    results["total_seconds"] = round(time.monotonic() - started, 1)
    results["generated"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out_path.write_text(json.dumps(results, indent=2))
    md = out_path.with_name("RESULTS.md")
    write_markdown(results, md)
    if not args.keep_scratch:
        shutil.rmtree(SCRATCH, ignore_errors=True)
    log(f"wrote {out_path} and {md} in {results['total_seconds']} s")


if __name__ == "__main__":
    main()
