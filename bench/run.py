"""``make bench``: measure geoseg and write ``bench/results.json`` and ``bench/RESULTS.md``.

Sections (each measurement in its own subprocess, so a peak is one run's; see ``bench/README.md``):

- ``trivial``: the pipeline's own ceiling (1x1-conv model, 8192^2, 2 CPUs): Mpx/s steady and end
  to end, whole-job peak memory (driver RSS + PSS of every Ray process), blended windows (the
  default) and core crop (``blend: none``);
- ``floor``: the whole-job memory before the first tile (Ray's own processes; every geoseg process
  started and ready), for the trivial model and the default config: what per-pixel work cannot lower;
- ``unet``: U-Net ResNet-18 on 4096^2: the model alone on all cores, the pipeline with core crop
  (Ray started by the run, and already up) and with blended windows (``BLEND_SETTINGS``), ratios, the
  job's CPU seconds against the model's, and the peer
  (geoai-py ``predict_geotiff``, same network and weights) in a throw-away venv;
- ``driver_cpu``: three trivial heads (semantic + two instance) at 2048^2 and 4096^2: driver CPU
  seconds per extra megapixel;
- ``start``: first tile and end to end of ``geoseg run`` on a 1024^2 image with the default config;
- ``worldcover``: the 36000^2 ESA WorldCover tile (trivial model): memory against the 8192^2 run;
- ``instances``: instance decoding + vectorising + seam merging + export on planted scenes;
- ``small_scenes``: seconds per scene for 200 rasters of 64^2 (default config), this version
  against commit ``SMALL_SCENES_BEFORE`` (a git worktree);
- ``precision``: bf16 against float32 (``runtime.precision``) for the shipped configs on inputs
  they are for: pixel agreement, object counts, run wall.

``bench/gpu.py`` writes a ``gpu`` section into the same JSON (on a CUDA machine).

Usage: ``python -m bench.run --out bench/results.json [--only trivial,unet] [--quick] [--keep-scratch]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.procmon import Monitor, descendants
from bench.rasters import write_raster
from bench.report import write_markdown

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / "bench" / "scratch"
PEER_VENV = SCRATCH / "peer-venv"
# The synthetic-scene models (the default config until 2026-12): the start, floor, small_scenes and
# precision figures stay comparable with earlier runs, and the bench's rasters are synthetic.
DEFAULT_CONFIG = REPO / "configs" / "synthetic.yaml"
WORLDCOVER_DIR = REPO.parent / "shared" / "data" / "esa_worldcover"
TRIVIAL = "bench/models.py:trivial_semantic"
UNET_FILE, UNET_MODULE = "bench/models.py:unet_resnet18", "bench.models:unet_resnet18"
BOUND_MIB = round(1.5e9 / 2**20, 1)  # 1.5 GB (decimal) = 1430.5 MiB
PIXEL_SIZE_M = 10.0  # synthetic rasters: 10 m pixels, planar UTM
SECTIONS = ("trivial", "floor", "unet", "driver_cpu", "start", "worldcover", "instances", "small_scenes", "precision")
SHARED = REPO.parent / "shared" / "data"
# The last commit before incremental runs and per-tile model squares: "before" of small_scenes.
SMALL_SCENES_BEFORE = "2a64f10"
KEPT = (*SECTIONS, "gpu")  # sections of results.json kept when not re-run (others are superseded: dropped)
CLASSES5 = ["c0", "c1", "c2", "c3", "c4"]
# Blended U-Net runs of the unet section: (window, overlap) in model pixels, precision; tiles of BLEND_TILE.
BLEND_SETTINGS = ((512, 128, "fp32"), (512, 64, "fp32"), (512, 128, "bf16"), (1024, 128, "bf16"))
BLEND_TILE = 1024


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
    this process stays small."""
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    probe = (
        "import json, torch, rasterio; print(json.dumps({'device': torch.cuda.get_device_name(0) "
        "if torch.cuda.is_available() else 'cpu', 'torch_threads_default': torch.get_num_threads(), "
        "'gdal': rasterio.__gdal_version__}))"
    )
    try:
        extra = json.loads(
            subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
            .stdout.strip()
            .splitlines()[-1]
        )
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        extra = {}
    status = subprocess.run(["git", "status", "--porcelain", "geoseg"], cwd=REPO, capture_output=True, text=True).stdout
    return {
        "cpu_cores": os.cpu_count(),
        "cpu_model": next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        ),
        "ram_gib": round(mem_kb / 1024**2, 1),
        "device": extra.get("device"),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torch_threads_default": extra.get("torch_threads_default"),
        "ray": _version("ray"),
        "rasterio": _version("rasterio"),
        "gdal": extra.get("gdal"),
        "numpy": _version("numpy"),
        "segmentation_models_pytorch": _version("segmentation-models-pytorch"),
        "os": platform.platform(),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "geoseg_uncommitted_files": [ln[3:] for ln in status.splitlines() if ln.strip()],
        "load_avg_at_start": _load(),
    }


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _kill_tree(pid: int) -> None:
    """Kill a child and everything it started (by pid: Ray's processes included)."""
    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def _child(
    module: str,
    args: list[str],
    monitor: bool = False,
    timeout: int = 1500,
    python: str | None = None,
    repo: Path = REPO,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python -m module args --json tmp`` in ``repo`` (another checkout measures another
    version of geoseg), with ``extra_env`` added to the environment; returns its JSON (plus the
    monitor's figures)."""
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=SCRATCH)
    os.close(fd)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"}
    env.update(extra_env or {})
    cmd = [python or sys.executable, "-m", module, *args, "--json", tmp]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mon = Monitor(proc.pid) if monitor else None
    err = ""
    try:
        if mon:
            mon.__enter__()
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
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


def semantic_config(
    factory: str,
    tile: int,
    halo: int,
    batch: int,
    bands: list[int] | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    **tiling: Any,
) -> dict[str, Any]:
    """One semantic head, float32 unless told (as the model-alone timings); ``tiling``: further
    tiling keys (blend, window, overlap; else the defaults)."""
    return {
        "tiling": {"tile_size": tile, "halo": halo, **tiling},
        "runtime": {"batch_size": batch, "device": device, "precision": precision},
        "models": {
            "landuse": {
                "task": "semantic",
                "classes": CLASSES5,
                "bands": bands or [1, 2, 3],
                "normalize": {"scale": 255.0},
                "factory": factory,
            }
        },
    }


def three_heads_config() -> dict[str, Any]:
    """Land use (semantic, 5 classes) + buildings (instance, body/border/contact) + ships (instance, body);
    1x1-convolution heads of bench/models.py; default tiling (512 + 64) and batch size."""
    common = {"bands": [1, 2, 3], "normalize": {"scale": 255.0}}
    return {
        "runtime": {"device": "cpu"},
        "models": {
            "landuse": {
                "task": "semantic",
                "classes": ["water", "forest", "cropland", "urban", "bare"],
                "factory": "bench/models.py:landuse_blocks",
                **common,
            },
            "buildings": {
                "task": "instance",
                "classes": ["building"],
                "channels": ["body", "border", "contact"],
                "factory": "bench/models.py:buildings_blocks",
                **common,
            },
            "ships": {
                "task": "instance",
                "classes": ["ship"],
                "channels": ["body"],
                "factory": "bench/models.py:ships_blocks",
                **common,
            },
        },
    }


def pipeline(
    rasters: list[Path],
    config: dict[str, Any],
    tag: str,
    num_cpus: int | None = None,
    monitor: bool = True,
    timeout: int = 1500,
    extra: list[str] | None = None,
    repo: Path = REPO,
    ray_up: bool = False,
) -> dict[str, Any]:
    """One ``geoseg.runner.pipeline.run`` in a child process (``bench/child_pipeline.py`` of ``repo``);
    ``ray_up``: the child starts the local Ray before the timed ``run`` (as on a cluster, or a
    notebook's Ray), else ``run`` starts it (as ``geoseg run`` on a laptop)."""
    out_dir = SCRATCH / f"out-{tag}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = SCRATCH / f"config-{tag}.json"
    cfg.write_text(json.dumps(config, indent=2))
    args = ["--out", str(out_dir), "--config", str(cfg), "--base-dir", str(repo)]
    for r in rasters:
        args += ["--input", str(r)]
    if num_cpus is not None:
        args += ["--num-cpus", str(num_cpus)]
    if ray_up:
        args += ["--ray-up"]
    args += extra or []
    load = _load()
    res = _child("bench.child_pipeline", args, monitor=monitor, timeout=timeout, repo=repo)
    res.update(load_avg_before=load, load_avg_after=_load())
    summaries = sorted(out_dir.glob("*/summary.json"))
    if summaries:
        try:
            first = json.loads(summaries[0].read_text())
            res["device"] = first.get("device")  # where the models ran and their number format: "cpu bf16"
            models = first.get("models", {})
            res["outputs"] = {
                m: {c: v.get("count", v.get("pixels")) for c, v in d.get("classes", {}).items()}
                for m, d in models.items()
            }
        except (OSError, ValueError, AttributeError):
            pass
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg.unlink(missing_ok=True)
    if "error" not in res and not res.get("ok"):
        res["error"] = "; ".join(f"{p}: {e}" for p, e in res.get("failures", [])) or "run not ok"
    return res


def check(what: str, figure: Any, unit: str = "", target: str | None = None) -> dict[str, Any]:
    """One row of a section's table: ``target`` like ``">= 8"`` or ``"<= 1430.5"`` (None: information)."""
    ok = None
    if target is not None and isinstance(figure, (int, float)) and not isinstance(figure, bool):
        op, bound = target.split()
        ok = figure >= float(bound) if op == ">=" else figure <= float(bound)
    elif target is not None and isinstance(figure, bool):
        ok = figure
    return {"what": what, "figure": figure, "unit": unit, "target": target, "pass": ok}


def ratio(a: Any, b: Any, nd: int = 3) -> float | None:
    """a / b when both are numbers and b is not 0, else None."""
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool) and b:
        return round(a / b, nd)
    return None


def _get(d: dict[str, Any], key: str) -> Any:
    return None if "error" in d else d.get(key)


# --------------------------------------------------------------------------------------------- sections


PEER_TILING = {"tile": 512, "overlap": 64, "batch": 4}  # geoai's predict_geotiff in both sections


def run_peer(raster: Path, tag: str, model_args: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """geoai-py's ``predict_geotiff`` on ``raster`` (``bench/child_peer.py`` with ``model_args``) in the
    peer environment, its process polled as geoseg's job is (the process tree's summed PSS); returns
    (its figures, the environment's)."""
    from bench.peer import ensure_peer_venv

    env = ensure_peer_venv(PEER_VENV)
    if "error" in env:
        return {"error": env["error"]}, env
    t = PEER_TILING
    log(f"{tag}: peer, geoai-py {env['geoai_version']} predict_geotiff, tile {t['tile']} overlap {t['overlap']}")
    out_tif = SCRATCH / f"peer-{tag}.tif"
    load = _load()
    args = ["--input", str(raster), "--output", str(out_tif), *model_args]
    args += ["--tile-size", str(t["tile"]), "--overlap", str(t["overlap"]), "--batch-size", str(t["batch"])]
    peer = _child("bench.child_peer", args, python=env["python"], monitor=True)
    peer.update(load_avg_before=load, load_avg_after=_load())
    out_tif.unlink(missing_ok=True)
    return peer, env


def against_peer(what: str, run: dict[str, Any], peer: dict[str, Any], speed_target: str | None) -> list[dict]:
    """A geoseg run against geoai's: speed by the call and by whole processes, and memory."""
    return [
        check(
            f"{what} / geoai speed (geoai call s / geoseg run() s)",
            ratio(_get(peer, "call_s"), _get(run, "wall_s")),
            "x",
        ),
        check(
            f"{what} / geoai speed, whole processes, Popen to exit",
            ratio(_get(peer, "process_wall_s"), _get(run, "process_wall_s")),
            "x",
            speed_target,
        ),
        check(
            f"{what}: whole-job peak / geoai's peak",
            ratio(_get(run, "whole_job_peak_mib"), _get(peer, "whole_job_peak_mib")),
            "",
            "<= 0.25",
        ),
    ]


def bench_trivial(size: int) -> dict[str, Any]:
    tile, halo, batch = 1024, 64, 4
    raster = write_raster(SCRATCH / f"syn-{size}.tif", size, pixel_size=PIXEL_SIZE_M)
    log(f"trivial: pipeline, 1x1-conv model, {size}^2, 2 CPUs, blended windows (the default tiling)")
    run = pipeline([raster], semantic_config(TRIVIAL, tile, halo, batch), f"trivial-{size}", num_cpus=2)
    log(
        f"trivial: {_get(run, 'mpx_per_s_steady')} Mpx/s steady, {_get(run, 'mpx_per_s_end_to_end')} end to end,"
        f" whole job peak {_get(run, 'whole_job_peak_mib')} MiB {run.get('error', '')}"
    )
    log("trivial: the same, core crop (blend none)")
    core = pipeline(
        [raster], semantic_config(TRIVIAL, tile, halo, batch, blend="none"), f"trivial-{size}-core", num_cpus=2
    )
    peer, _ = run_peer(raster, "trivial", ["--model", "trivial"])
    checks = [
        check(
            "Mpx/s steady (core px after the first progress entry / first to last entry)",
            _get(run, "mpx_per_s_steady"),
            "Mpx/s",
            ">= 8",
        ),
        check("Mpx/s end to end (core Mpx / run() wall)", _get(run, "mpx_per_s_end_to_end"), "Mpx/s", ">= 5"),
        check(
            "whole-job peak: driver RSS + PSS of every Ray process",
            _get(run, "whole_job_peak_mib"),
            "MiB",
            f"<= {BOUND_MIB}",
        ),
        check("driver peak RSS (VmHWM)", _get(run, "driver_peak_rss_mib"), "MiB"),
        check("Ray processes, peak PSS sum", _get(run, "ray_processes_peak_pss_sum_mib"), "MiB"),
        check("first tile after run() began", _get(run, "first_tile_s"), "s"),
        check("run() wall", _get(run, "wall_s"), "s"),
        check("core crop (blend none): Mpx/s end to end", _get(core, "mpx_per_s_end_to_end"), "Mpx/s"),
        check("core crop (blend none): whole-job peak", _get(core, "whole_job_peak_mib"), "MiB"),
        check(
            "blended / core crop: whole-job peak",
            ratio(_get(run, "whole_job_peak_mib"), _get(core, "whole_job_peak_mib")),
            "x",
        ),
        check("blended / core crop: run() wall", ratio(_get(run, "wall_s"), _get(core, "wall_s")), "x"),
        check("geoai-py predict_geotiff, same 1x1 convolution: the call", _get(peer, "call_s"), "s"),
        check("geoai-py peak memory (summed PSS, as for geoseg)", _get(peer, "whole_job_peak_mib"), "MiB"),
        *against_peer("geoseg blended (default tiling)", run, peer, ">= 1.2"),
    ]
    log("trivial: I/O floor (read every block, write a deflate COG mask), one process, one core")
    floor = _child("bench.child_io_floor", ["--input", str(raster), "--out", str(SCRATCH / "io-floor.tif")])
    checks += [
        check(
            "I/O floor on one core: read all blocks + write the mask COG", _get(floor, "mpx_per_s_one_core"), "Mpx/s"
        ),
        check(
            "pipeline steady / I/O floor on one core",
            ratio(_get(run, "mpx_per_s_steady"), _get(floor, "mpx_per_s_one_core")),
        ),
    ]
    return {
        "title": "Pipeline ceiling: trivial model",
        "checks": checks,
        "run": run,
        "core_crop": core,
        "peer": peer,
        "io_floor": floor,
        "parameters": {
            "size": size,
            "tile_size": tile,
            "halo": halo,
            "batch_size": batch,
            "model": TRIVIAL,
            "ray_cpus": 2,
            "device": "cpu",
            "raster": "synthetic 3-band uint8, deflate, 512 blocks, 10 m UTM (bench/rasters.py)",
        },
    }


def bench_floor(trivial: dict[str, Any] | None) -> dict[str, Any]:
    """Whole-job memory before the first tile (``bench/child_floor.py``), 2 CPUs as the trivial run."""
    tile, halo, batch = 1024, 64, 4
    configs = {"trivial": semantic_config(TRIVIAL, tile, halo, batch), "default": _default_config_dict()}
    rest: dict[str, dict[str, Any]] = {}
    for name, config in configs.items():
        cfg = SCRATCH / f"config-floor-{name}.json"
        cfg.write_text(json.dumps(config, indent=2))
        log(f"floor: {name} config, processes started and ready, no tile")
        rest[name] = _child("bench.child_floor", ["--config", str(cfg), "--base-dir", str(REPO), "--num-cpus", "2"])
        cfg.unlink(missing_ok=True)

    def whole(name: str, moment: str) -> Any:
        return (_get(rest[name], moment) or {}).get("whole_job_peak_mib")

    peak = _get((trivial or {}).get("run", {}), "whole_job_peak_mib") if trivial else None
    log(
        f"floor: Ray alone {whole('trivial', 'ray')} MiB; ready: trivial {whole('trivial', 'ready')} MiB,"
        f" default {whole('default', 'ready')} MiB"
    )
    checks = [
        check(
            "driver with geoseg imported, before Ray (RSS)",
            (_get(rest["trivial"], "driver") or {}).get("driver_rss_mib"),
            "MiB",
        ),
        check(
            "whole job, local Ray started, nothing of geoseg's in it (Ray's processes and idle workers)",
            whole("trivial", "ray"),
            "MiB",
        ),
        check(
            "whole job, every geoseg process ready, no tile sent: trivial model (as the trivial section)",
            whole("trivial", "ready"),
            "MiB",
        ),
        check(
            "whole job, every geoseg process ready, no tile sent: configs/synthetic.yaml (three smp U-Nets)",
            whole("default", "ready"),
            "MiB",
        ),
        check(
            f"share of the {BOUND_MIB} MiB bound taken before the first tile (trivial model)",
            ratio(whole("trivial", "ready"), BOUND_MIB),
            "",
        ),
        check(
            "what the pixels add: trivial section's whole-job peak - the ready figure (trivial model)",
            round(peak - whole("trivial", "ready"), 1)
            if isinstance(peak, (int, float)) and isinstance(whole("trivial", "ready"), (int, float))
            else None,
            "MiB",
        ),
    ]
    return {
        "title": "Memory before the first tile: the floor of the whole-job figure",
        "checks": checks,
        "at_rest": rest,
        "parameters": {
            "ray_cpus": 2,
            "settle_s": 2.0,
            "trivial": TRIVIAL,
            "default": str(DEFAULT_CONFIG.relative_to(REPO)),
            "figure": "driver RSS + PSS of every Ray process, one sample",
        },
    }


def bench_unet(size: int, batches: int) -> dict[str, Any]:
    tile, halo, batch, overlap = 512, 32, 4, 64
    raster = write_raster(SCRATCH / f"syn-{size}.tif", size, pixel_size=PIXEL_SIZE_M)
    state = SCRATCH / "unet-resnet18-state.pt"
    threads = os.cpu_count() or 1
    log(f"unet: model alone, {threads} threads, {batches} batches of {batch} at the padded side")
    alone = _child(
        "bench.child_model",
        [
            "--factory",
            UNET_MODULE,
            "--tile-size",
            str(tile),
            "--halo",
            str(halo),
            "--batch-size",
            str(batch),
            "--threads",
            str(threads),
            "--batches",
            str(batches),
            "--save-state",
            str(state),
        ],
    )
    # Blended windows are the default; "core crop" (blend none: one window per tile, its core kept)
    # is what the pipeline did before and what the model-alone figure times.
    log(f"unet: pipeline, {size}^2, core crop (blend none, tile {tile} halo {halo})")
    pipe = pipeline([raster], semantic_config(UNET_FILE, tile, halo, batch, blend="none"), f"unet-{size}")
    log(f"unet: pipeline, {size}^2, Ray already up, core crop")
    pipe_up = pipeline(
        [raster], semantic_config(UNET_FILE, tile, halo, batch, blend="none"), f"unet-{size}-up", ray_up=True
    )
    blended: dict[str, dict[str, Any]] = {}
    for w, o, precision in BLEND_SETTINGS:
        log(f"unet: pipeline, {size}^2, blended windows {w} overlap {o}, tile {BLEND_TILE} halo {halo}, {precision}")
        blended[f"{w}/{o} {precision}"] = pipeline(
            [raster],
            semantic_config(UNET_FILE, BLEND_TILE, halo, batch, precision=precision, window=w, overlap=o),
            f"unet-{size}-blend-{w}-{o}-{precision}",
        )
    log("unet: peer environment (geoai-py)")
    peer: dict[str, Any]
    env: dict[str, Any]
    if state.exists():
        peer, env = run_peer(raster, f"unet-{size}", ["--state", str(state)])
    else:
        peer, env = {"error": "no saved U-Net state_dict (the model-alone run failed)"}, {}
    alone_mpx = _get(alone, "mpx_per_s")
    e2e, steady = _get(pipe, "mpx_per_s_end_to_end"), _get(pipe, "mpx_per_s_steady")
    geoai_s, geoseg_s = _get(peer, "call_s"), _get(pipe, "wall_s")
    same_weights = (
        None if "error" in alone or "error" in peer else alone.get("weights_digest") == peer.get("weights_digest")
    )
    budget = cpu_budget(pipe, alone, threads)
    checks = [
        check(
            f"U-Net alone, {threads} threads (all cores), forward + argmax, median batch, fastest layout and call size",
            alone_mpx,
            "Mpx/s",
        ),
        check("pipeline, core crop, end to end (core Mpx / run() wall)", e2e, "Mpx/s"),
        check("pipeline, core crop, steady", steady, "Mpx/s"),
        check("pipeline, core crop / model alone, end to end", ratio(e2e, alone_mpx), "", ">= 0.65"),
        check("pipeline, core crop / model alone, steady", ratio(steady, alone_mpx), ""),
        check(
            "pipeline / model alone, end to end, Ray already up (started before run(), as on a cluster)",
            ratio(_get(pipe_up, "mpx_per_s_end_to_end"), alone_mpx),
            "",
        ),
        check("job CPU: every process of the run, driver included", budget.get("job_cpu_s"), "core-s"),
        check("of which the model actor", budget.get("model_actor_cpu_s"), "core-s"),
        check(
            f"model alone for the same tiles (median batch wall x batches x {threads} threads)",
            budget.get("model_alone_cpu_s"),
            "core-s",
        ),
        check(
            f"shortest wall that job CPU allows on {threads} cores (job CPU / cores)", budget.get("wall_floor_s"), "s"
        ),
        check(
            "highest end-to-end ratio that job CPU allows (model-alone wall / that floor)",
            budget.get("ratio_ceiling"),
            "",
        ),
        check("geoseg run() wall, core crop", geoseg_s, "s"),
        check(f"geoai-py {env.get('geoai_version', '?')} predict_geotiff wall (the call)", geoai_s, "s"),
        check("geoseg core crop / geoai speed (geoai call s / geoseg run() s)", ratio(geoai_s, geoseg_s), "x"),
        check(
            "geoseg / geoai speed, whole processes, Popen to exit (imports, Ray start/stop included)",
            ratio(_get(peer, "process_wall_s"), _get(pipe, "process_wall_s")),
            "x",
        ),
        check("same weights in the model-alone and the peer run (state_dict digest)", same_weights, "", "yes"),
        check("geoai-py peak memory (summed PSS, as for geoseg)", _get(peer, "whole_job_peak_mib"), "MiB"),
    ]
    for key, run in blended.items():
        wo, precision = key.split()
        w, o = (int(v) for v in wo.split("/"))
        work = round((w / (w - o)) ** 2, 2)
        checks += [
            check(f"blended {key} (networks on {work}x the pixels): run() wall", _get(run, "wall_s"), "s"),
            check(f"blended {key} / core crop fp32, run() wall", ratio(_get(run, "wall_s"), geoseg_s), "x"),
            check(f"blended {key}: whole-job peak memory", _get(run, "whole_job_peak_mib"), "MiB"),
            *against_peer(f"geoseg blended {key}", run, peer, ">= 1.5" if precision == "bf16" else None),
        ]
    return {
        "title": "U-Net ResNet-18: pipeline vs the model alone vs geoai-py",
        "checks": checks,
        "model_alone": alone,
        "pipeline": pipe,
        "pipeline_ray_up": pipe_up,
        "pipeline_blended": blended,
        "cpu_budget": budget,
        "peer": peer,
        "peer_env": env,
        "parameters": {
            "size": size,
            "tile_size": tile,
            "halo": halo,
            "batch_size": batch,
            "padded_side": alone.get("padded_side"),
            "model_alone_threads": threads,
            "model": "smp.Unet('resnet18', encoder_weights=None, in_channels=3, classes=5), seed 0",
            "pipeline_ray_cpus": "all (run() starts Ray; the Ray-up run starts it first)",
            "device": "cpu",
            "peer": f"geoai-py predict_geotiff, tile {tile}, overlap {overlap}, batch {batch}, "
            "spline blending (default), argmax postprocess, uint8 out",
            "peer_call": peer.get("call"),
        },
    }


def cpu_budget(pipe: dict[str, Any], alone: dict[str, Any], threads: int) -> dict[str, Any]:
    """The run's CPU seconds (every process, from the monitor, plus the driver's own) against the
    model's: on a machine whose cores are all busy, wall >= job CPU / cores whatever the overlap."""
    by_process = _get(pipe, "cpu_s_by_process") or {}
    tiles, batch_s, batch = _get(pipe, "tiles"), _get(alone, "median_batch_s"), _get(alone, "batch_size")
    if not by_process or not all(isinstance(v, (int, float)) for v in (tiles, batch_s, batch)):
        return {}
    job = sum(by_process.values()) + (_get(pipe, "driver_cpu_s") or 0.0)
    alone_wall = tiles / batch * batch_s
    floor = job / threads
    return {
        "job_cpu_s": round(job, 1),
        "model_actor_cpu_s": round(sum(v for k, v in by_process.items() if "PredictorWorker" in k), 1),
        "model_alone_wall_s": round(alone_wall, 2),
        "model_alone_cpu_s": round(alone_wall * threads, 1),
        "wall_floor_s": round(floor, 1),
        "ratio_ceiling": round(alone_wall / floor, 3),
    }


def bench_driver_cpu(sizes: list[int]) -> dict[str, Any]:
    runs = []
    for size in sizes:
        raster = write_raster(SCRATCH / f"syn-{size}.tif", size, pixel_size=PIXEL_SIZE_M)
        log(f"driver_cpu: three heads, {size}^2")
        res = pipeline([raster], three_heads_config(), f"cpu-{size}", monitor=False, extra=["--idle-seconds", "5"])
        res["size"] = size
        runs.append(res)
        log(
            f"driver_cpu: {size}^2 -> driver CPU {_get(res, 'driver_cpu_s')} s, wall {_get(res, 'wall_s')} s"
            f" {res.get('error', '')}"
        )
    ok = [r for r in runs if "error" not in r]
    per_mpx = None
    if len(ok) == 2:
        small, big = ok
        per_mpx = round(
            (big["driver_cpu_s"] - small["driver_cpu_s"]) / (big["core_megapixels"] - small["core_megapixels"]), 5
        )
    net = None
    if per_mpx is not None and isinstance(ok[1].get("driver_idle_cpu_s_per_s"), float):
        small, big = ok
        idle = big["driver_idle_cpu_s_per_s"]
        net = round(
            (big["driver_cpu_s"] - small["driver_cpu_s"] - idle * (big["wall_s"] - small["wall_s"]))
            / (big["core_megapixels"] - small["core_megapixels"]),
            5,
        )
    checks = [
        check("driver CPU per extra Mpx: (cpu_big - cpu_small) / (Mpx_big - Mpx_small)", per_mpx, "s/Mpx", "<= 0.01"),
        check(
            "driver CPU of Ray's own threads while idle (a cost per second, not per pixel)",
            _get(ok[-1], "driver_idle_cpu_s_per_s") if ok else None,
            "s/s",
        ),
        check("driver CPU per extra Mpx less that idle cost over the extra wall time", net, "s/Mpx"),
    ]
    for r in runs:
        checks.append(check(f"driver CPU (user + sys) around run(), {r['size']}^2", _get(r, "driver_cpu_s"), "s"))
        checks.append(check(f"run() wall, {r['size']}^2", _get(r, "wall_s"), "s"))
    return {
        "title": "Driver CPU per megapixel (three heads)",
        "checks": checks,
        "runs": runs,
        "parameters": {
            "sizes": sizes,
            "tile_size": 512,
            "halo": 64,
            "batch_size": "default (8)",
            "heads": "landuse semantic 5 classes (landuse_blocks), buildings instance "
            "[body, border, contact] (buildings_blocks), ships instance [body] (ships_blocks)",
            "device": "cpu",
            "ray_cpus": "all (run() starts Ray)",
        },
    }


# The default config's models (configs/default.yaml, the aerial heads) read 0.3 m (buildings) and
# 2.4 m (land use): a 1024^2 image at 0.3 m is 1024^2 pixels for the buildings network, not resampled.
START_PIXEL_M = 0.3
START_RUNS = 5  # timed runs of the command in the start section (the median is its figure)


def bench_start() -> dict[str, Any]:
    img = SCRATCH / "start-1024.tif"
    geoseg_exe = Path(sys.executable).parent / "geoseg"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t = time.monotonic()
    synth = subprocess.run(
        [str(geoseg_exe), "synth", str(img), "--size", "1024", "--seed", "1", "--pixel-size", str(START_PIXEL_M)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    synth_s = round(time.monotonic() - t, 2)
    if synth.returncode:
        return {"title": "Start-up", "error": f"geoseg synth failed: {synth.stderr[-1500:]}", "checks": []}
    # The model actors' traced networks (geoseg.models.traced) in a folder of the bench's own: the
    # first command finds it empty, as on a new machine, and writes them; the timed runs find them.
    cache = SCRATCH / "network-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env["GEOSEG_CACHE_DIR"] = str(cache)
    log("start: the real command on a new machine (no traced networks yet), Popen to exit")
    cold = _start_command(geoseg_exe, img, SCRATCH / "out-start-cold", env)
    log("start: the CLI's run, in a child that reads its own start time")
    out_a = SCRATCH / "out-start-child"
    shutil.rmtree(out_a, ignore_errors=True)
    load = _load()
    default = REPO / "configs" / "default.yaml"  # what `geoseg run` runs without --config
    child = _child(
        "bench.child_start",
        ["--input", str(img), "--out", str(out_a), "--config", str(default)],
        extra_env={"GEOSEG_CACHE_DIR": str(cache)},
    )
    child.update(load_avg_before=load, load_avg_after=_load())
    shutil.rmtree(out_a, ignore_errors=True)
    log("start: the real command, Popen to exit")
    # Five times: one start on 2 cores moves by 10-20 % from run to run; the figure is the median.
    clis = [_start_command(geoseg_exe, img, SCRATCH / "out-start-cli", env) for _ in range(START_RUNS)]
    walls = [c["wall_s"] for c in clis]
    cli = {**clis[0], "wall_s": round(statistics.median(walls), 3), "runs_wall_s": walls}
    cli["exit_code"] = max(c["exit_code"] for c in clis)
    log(
        f"start: first tile {_get(child, 'first_tile_s')} s from process start; CLI {cli['wall_s']} s"
        f" (exit {cli['exit_code']}); on a new machine {cold['wall_s']} s"
    )
    checks = [
        check(
            "first tile, from process start (geoseg run's code path, default config)",
            _get(child, "first_tile_s"),
            "s",
            "<= 10",
        ),
        check(
            f"the real command (below), Popen to exit, median of {START_RUNS}",
            cli["wall_s"] if cli["exit_code"] == 0 else None,
            "s",
            "<= 7",
        ),
        check(
            f"the same, fastest and slowest of {START_RUNS}",
            f"{min(cli['runs_wall_s'])}-{max(cli['runs_wall_s'])}",
            "s",
        ),
        check("command timed", cli["command"], ""),
        check(
            "the same command on a new machine (traced networks written first), Popen to exit",
            cold["wall_s"] if cold["exit_code"] == 0 else None,
            "s",
        ),
        check("same code path: process start to run() returned", _get(child, "total_s"), "s"),
        check("process start to run() began (interpreter, imports, config)", _get(child, "imports_s"), "s"),
    ]
    return {
        "title": "Start-up: first tile and end to end from the command",
        "checks": checks,
        "child": child,
        "cli": cli,
        "cli_new_machine": cold,
        "synth_s": synth_s,
        "parameters": {
            "image": f"geoseg synth --size 1024 --seed 1 --pixel-size {START_PIXEL_M}",
            "config": "configs/default.yaml (the aerial models; the command gives no --config)",
            "order": "the CLI with no traced networks, the child, then the CLI again (warm file caches after"
            " the other sections); the traced networks in a folder of the bench's own (GEOSEG_CACHE_DIR)",
        },
    }


def _start_command(geoseg_exe: Path, img: Path, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """``geoseg -q run IMAGE --out OUT`` from Popen to exit."""
    shutil.rmtree(out, ignore_errors=True)
    load = _load()
    # `geoseg run IMAGE --out DIR -q`; where -q is only an option of the `geoseg` group (it is at
    # 19b7d18), click refuses it at once (exit 2) and the command is `geoseg -q run IMAGE --out DIR`.
    for args in (["run", str(img), "--out", str(out), "-q"], ["-q", "run", str(img), "--out", str(out)]):
        t = time.monotonic()
        proc = subprocess.run([str(geoseg_exe), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        wall = round(time.monotonic() - t, 3)
        if not (proc.returncode == 2 and "No such option" in proc.stderr):
            break
    shutil.rmtree(out, ignore_errors=True)
    return {
        "command": " ".join(["geoseg", *args]).replace(str(img), img.name).replace(str(out), out.name),
        "wall_s": wall,
        "exit_code": proc.returncode,
        "stdout_tail": proc.stdout[-500:],
        "stderr_tail": proc.stderr[-1500:],
        "load_avg_before": load,
        "load_avg_after": _load(),
    }


def bench_small_scenes(count: int, size: int, before_count: int, alone_count: int) -> dict[str, Any]:
    """Fixed cost per scene: ``count`` rasters of ``size``^2 through the synthetic config, this
    version against (on the first ``before_count``) the commit before the per-scene work (a git
    worktree of it, same machine), and against itself with ``batch_size: 1`` (on the first
    ``alone_count``: no scene shares a model call)."""
    folder = SCRATCH / f"small-{count}x{size}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    first = write_raster(folder / "s0000.tif", size, pixel_size=1.0)
    rasters = [first] + [Path(shutil.copy(first, folder / f"s{i:04d}.tif")) for i in range(1, count)]
    base = _default_config_dict()
    runs: dict[str, Any] = {}
    before = SCRATCH / "worktree-before"
    shutil.rmtree(before, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)
    made = subprocess.run(
        ["git", "worktree", "add", "--detach", str(before), SMALL_SCENES_BEFORE],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    # "alone": this version with batch_size 1, so each scene's tiles go through the model alone
    # (no model call, read or post-processing task shared between scenes).
    versions = [("after", REPO), ("alone", REPO)] + ([("before", before)] if made.returncode == 0 else [])
    alone = {**base, "runtime": {**base.get("runtime", {}), "batch_size": 1}}
    try:
        for tag, repo in versions:
            n = {"after": count, "alone": alone_count, "before": before_count}[tag]
            log(f"small_scenes: {n} x {size}^2, synthetic config, {tag} ({repo})")
            config = alone if tag == "alone" else base
            res = pipeline(rasters[:n], config, f"small-{tag}", monitor=False, timeout=3000, repo=repo)
            if "error" not in res:
                res["scenes"] = n
                res["seconds_per_scene"] = round(res["wall_s"] / n, 3)
                span = res.get("first_to_last_tile_s")
                res["seconds_per_scene_steady"] = round(span / (n - 1), 3) if span else None
            runs[tag] = res
    finally:
        if made.returncode == 0:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
    after, old = runs.get("after", {}), runs.get("before", {})
    checks = [
        check(
            f"seconds per scene, run() wall / {count} (Ray start included), after",
            after.get("seconds_per_scene"),
            "s",
            "<= 0.03",
        ),
        check(
            f"seconds per scene, run() wall / {before_count}, before ({SMALL_SCENES_BEFORE})",
            old.get("seconds_per_scene"),
            "s",
        ),
        check("seconds per scene between first and last tile, after", after.get("seconds_per_scene_steady"), "s"),
        check("seconds per scene between first and last tile, before", old.get("seconds_per_scene_steady"), "s"),
        check(
            f"seconds per scene between first and last tile, batch_size 1 (no shared calls), {alone_count} scenes",
            runs.get("alone", {}).get("seconds_per_scene_steady"),
            "s",
        ),
        check(
            "batch_size 1 / shared calls, seconds per scene between first and last tile",
            ratio(runs.get("alone", {}).get("seconds_per_scene_steady"), after.get("seconds_per_scene_steady"), 2),
            "x",
        ),
        check("precision (summary.json device)", after.get("device"), ""),
        check(
            "before / after, seconds per scene",
            ratio(old.get("seconds_per_scene"), after.get("seconds_per_scene"), 2),
            "x",
        ),
    ]
    if made.returncode != 0:
        checks.append(check("before: git worktree failed", made.stderr.strip()[:200], ""))
    return {
        "title": f"Fixed cost per scene: {count} rasters of {size} x {size}, synthetic config",
        "checks": checks,
        "runs": runs,
        "parameters": {
            "count": count,
            "before_count": before_count,
            "alone_count": alone_count,
            "size": size,
            "config": "configs/synthetic.yaml",
            "before": SMALL_SCENES_BEFORE,
            "ray_cpus": "all (run() starts Ray)",
        },
    }


def _default_config_dict() -> dict[str, Any]:
    """configs/synthetic.yaml with its model paths made absolute (both versions load the same weights)."""
    import yaml

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for spec in config["models"].values():
        spec["weights"] = str((DEFAULT_CONFIG.resolve().parent / spec["weights"]).resolve())
    return config


def _worldcover_input(quick: bool) -> Path | None:
    found = sorted(WORLDCOVER_DIR.glob("*.tif"))
    if not found:
        return None
    if not quick:
        return found[0]
    import numpy as np  # noqa: F401
    import rasterio
    from rasterio.windows import Window

    crop = SCRATCH / "worldcover-crop-4096.tif"
    if not crop.exists():
        with rasterio.open(found[0]) as src:
            win = Window(11000, 12000, 4096, 4096)  # a window with land in N00E006
            profile = {**src.profile, "width": 4096, "height": 4096, "transform": src.window_transform(win)}
            with rasterio.open(crop, "w", **profile) as dst:
                dst.write(src.read(window=win))
    return crop


def bench_worldcover(quick: bool, reference: dict[str, Any] | None) -> dict[str, Any]:
    tile, halo, batch = 1024, 64, 4
    src = _worldcover_input(quick)
    if src is None:
        return {"title": "ESA WorldCover 36000^2", "skipped": f"not found: no .tif in {WORLDCOVER_DIR}", "checks": []}
    import rasterio

    with rasterio.open(src) as ds:
        shape = (ds.width, ds.height, ds.count, str(ds.dtypes[0]), ds.nodata, str(ds.crs))
    log(f"worldcover: {src.name} ({shape[0]} x {shape[1]}), trivial model, bands [1, 1, 1], 2 CPUs")
    run = pipeline(
        [src], semantic_config(TRIVIAL, tile, halo, batch, bands=[1, 1, 1]), "worldcover", num_cpus=2, timeout=2400
    )
    log(
        f"worldcover: whole job peak {_get(run, 'whole_job_peak_mib')} MiB, driver peak"
        f" {_get(run, 'driver_peak_rss_mib')} MiB, wall {_get(run, 'wall_s')} s {run.get('error', '')}"
    )
    ref_run = (reference or {}).get("run", {}) if reference else {}
    ref_size = (reference or {}).get("parameters", {}).get("size")

    def vs(key: str) -> Any:
        return ratio(_get(run, key), _get(ref_run, key) if ref_run else None)

    ref = f"the {ref_size}^2 trivial run" if ref_size else "the trivial run (not available)"
    checks = [
        check(
            "whole-job peak: driver RSS + PSS of every Ray process",
            _get(run, "whole_job_peak_mib"),
            "MiB",
            f"<= {BOUND_MIB}",
        ),
        check(f"whole-job peak / that of {ref}", vs("whole_job_peak_mib"), "x", "<= 1.1"),
        check("driver peak RSS (VmHWM)", _get(run, "driver_peak_rss_mib"), "MiB"),
        check(f"driver peak RSS / that of {ref}", vs("driver_peak_rss_mib"), "x", "<= 1.1"),
        check("run() wall", _get(run, "wall_s"), "s"),
        check(
            "tiles in the raster / tile results that reached the writer (all-nodata tiles skipped)",
            f"{_get(run, 'tiles')} / {_get(run, 'progress_entries')} entries, "
            f"{_get(run, 'core_megapixels_progress')} Mpx",
            "",
        ),
        check("Mpx/s end to end (all core pixels, nodata included)", _get(run, "mpx_per_s_end_to_end"), "Mpx/s"),
    ]
    return {
        "title": "Memory on the 36000^2 ESA WorldCover tile",
        "checks": checks,
        "run": run,
        "reference": {
            "size": ref_size,
            "whole_job_peak_mib": ref_run.get("whole_job_peak_mib"),
            "driver_peak_rss_mib": ref_run.get("driver_peak_rss_mib"),
        },
        "parameters": {
            "input": str(src.relative_to(REPO.parent)) if src.is_relative_to(REPO.parent) else str(src),
            "width": shape[0],
            "height": shape[1],
            "count": shape[2],
            "dtype": shape[3],
            "nodata": shape[4],
            "crs": shape[5],
            "bands": [1, 1, 1],
            "tile_size": tile,
            "halo": halo,
            "batch_size": batch,
            "model": TRIVIAL,
            "ray_cpus": 2,
        },
    }


def bench_instances(sizes: list[int], tile: int, halo: int) -> dict[str, Any]:
    runs = []
    for size in sizes:
        log(f"instances: {size} x {size}, tile {tile}")
        gpkg = SCRATCH / f"inst-{size}.gpkg"
        load = _load()
        res = _child(
            "bench.child_instances",
            ["--size", str(size), "--tile-size", str(tile), "--halo", str(halo), "--gpkg", str(gpkg)],
        )
        res.update(load_avg_before=load, load_avg_after=_load())
        gpkg.unlink(missing_ok=True)
        runs.append(res)
        log(
            f"instances: {size}^2 -> {res.get('objects_emitted')} objects, {res.get('seconds', {}).get('total')} s"
            f" {res.get('error', '')}"
        )
    ok = [r for r in runs if "error" not in r]
    figures: dict[str, Any] = {}
    if ok:
        figures["all_objects_recovered"] = all(
            r["objects_emitted"] == r["objects_planted"] and r["pixels_emitted"] == r["pixels_planted"] for r in ok
        )
    if len(ok) >= 2:
        small, big = ok[0], ok[-1]
        figures["objects_ratio"] = round(big["objects_planted"] / small["objects_planted"], 2)
        figures["time_ratio"] = round(big["seconds"]["total"] / small["seconds"]["total"], 2)
        figures["us_per_object_ratio"] = round(big["us_per_object"]["total"] / small["us_per_object"]["total"], 2)
        figures["roughly_linear"] = figures["us_per_object_ratio"] < 1.5
    checks = [
        check("every planted object emitted once, exact pixel count", figures.get("all_objects_recovered"), "", "yes"),
        check("per-object cost, larger / smaller scene", figures.get("us_per_object_ratio"), "x", "<= 1.5"),
    ]
    for r in ok:
        checks.append(check(f"{r['size']}^2: {r['objects_planted']:,} objects, total", r["seconds"]["total"], "s"))
    return {
        "title": "Instance decoding + vectorising + seam merging + export",
        "checks": checks,
        "parameters": {
            "sizes": sizes,
            "tile_size": tile,
            "halo": halo,
            "channels": ["body"],
            "objects": "jittered 40 px grid, 65% filled, 6-24 px boxes, ~2% 100-320 px long",
            "pixel_size_m": 0.5,
        },
        "runs": runs,
        "figures": figures,
    }


# --------------------------------------------------------------------------------------------- main


def _cloud_stack() -> Path | None:
    """Cartagena's Sentinel-2 L2A bands B02 B03 B04 B08 stacked (10 m), for the cloud network."""
    try:
        sys.path.insert(0, str(REPO))
        from tests.helpers.sentinel2 import stack
    except ImportError:
        return None
    if not (SHARED / "sen2ships" / "cartagena").is_dir():
        return None
    return stack(SHARED, "cartagena", SCRATCH / "cartagena-10m.tif")


def bench_precision() -> dict[str, Any]:
    """bf16 against float32 (``runtime.precision``) for each shipped config on an input it is for."""
    from geoseg.train.synth import write_scene

    synth = SCRATCH / "precision-synth-1024.tif"
    write_scene(synth, size=1024, seed=31)
    cases = [f"synthetic={DEFAULT_CONFIG}={synth}"]
    from geoseg.demo import _real_scene

    aerial = _real_scene(SCRATCH / "precision-aerial")  # the demo's held-out Nairobi crop at 0.3 m
    if aerial is not None:
        cases.append(f"aerial={REPO / 'configs' / 'aerial.yaml'}={aerial}")
    clouds = _cloud_stack()
    if clouds is not None:
        cases.append(f"sentinel2-clouds={REPO / 'configs' / 'sentinel2-clouds.yaml'}={clouds}")
        # Cartagena is a training port of the ship model; the clouds and ships heads as users run them
        cases.append(f"sentinel2={REPO / 'configs' / 'sentinel2.yaml'}={clouds}")
    log(f"precision: {len(cases)} configs, fp32 and bf16 each")
    args = ["--out", str(SCRATCH / "precision")]
    for case in cases:
        args += ["--case", case]
    res = _child("bench.child_precision", args, timeout=1800)
    checks = []
    for case in res.get("cases", []):
        if "error" in case:
            checks.append(check(f"{case['case']}: failed", case["error"], ""))
            continue
        for head, h in case["heads"].items():
            figure = h.get("agreement", h.get("object_pixels_agree"))
            what = "pixels of the same class" if h["task"] == "semantic" else "object pixels in both runs"
            checks.append(check(f"{case['case']} / {head}: bf16 vs fp32, {what}", figure, ""))
        counts = case["runs"]
        for model, classes in counts["fp32"].get("counts", {}).items():
            for cls, n in classes.items():
                checks.append(
                    check(
                        f"{case['case']} / {model}: objects fp32 -> bf16",
                        f"{n} -> {counts['bf16']['counts'][model][cls]}",
                        "",
                    )
                )
        checks.append(
            check(
                f"{case['case']}: run() wall fp32 / bf16 (device {counts['bf16'].get('device')})",
                case.get("speedup_bf16"),
                "x",
            )
        )
    return {
        "title": "Number format: bf16 against float32 for the shipped configs",
        "checks": checks,
        "runs": res,
        "parameters": {"cases": cases, "device": "cpu"},
    }


def load_results(path: Path) -> dict[str, Any]:
    """The JSON so far, without superseded sections (kept: this run's sections and ``gpu``)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in old.items() if k in KEPT or k in ("machine", "generated", "total_seconds")}


def write_results(results: dict[str, Any], out_path: Path) -> None:
    """The JSON, run-level keys first, then the sections in their fixed order."""
    head = [k for k in ("machine", "generated", "total_seconds") if k in results]
    order = head + [k for k in KEPT if k in results] + [k for k in results if k not in head and k not in KEPT]
    out_path.write_text(json.dumps({k: results[k] for k in order}, indent=2))


def finish_results(results: dict[str, Any], out_path: Path) -> Path:
    results["generated"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write_results(results, out_path)
    md = out_path.with_name("RESULTS.md")
    write_markdown(results, md)
    return md


def clean_scratch(keep: bool) -> None:
    """Delete scratch rasters and outputs; the peer venv (and its install log) always stays."""
    if keep or not SCRATCH.exists():
        return
    for entry in SCRATCH.iterdir():
        if entry.name in ("peer-venv", "peer-venv-install.log"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results.json")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the harness, not figures")
    ap.add_argument(
        "--keep-scratch",
        action="store_true",
        help="keep scratch rasters and outputs (the peer venv under bench/scratch is always kept)",
    )
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s): {sorted(unknown)} (the gpu section is written by python -m bench.gpu)")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    results = load_results(out_path)
    started = time.monotonic()
    machine = machine_info()
    results["machine"] = machine
    q = args.quick
    plans: dict[str, Callable[[], dict[str, Any]]] = {
        "trivial": lambda: bench_trivial(2048 if q else 8192),
        "floor": lambda: bench_floor(results.get("trivial")),
        "unet": lambda: bench_unet(1024 if q else 4096, 2 if q else 5),
        "driver_cpu": lambda: bench_driver_cpu([1024, 2048] if q else [2048, 4096]),
        "start": bench_start,
        "worldcover": lambda: bench_worldcover(q, results.get("trivial")),
        "instances": lambda: bench_instances([1500, 3000] if q else [6000, 12000], 512, 64),
        "small_scenes": lambda: bench_small_scenes(20 if q else 1000, 64, 20 if q else 50, 20 if q else 200),
        "precision": bench_precision,
    }
    for section in [s for s in SECTIONS if s in only]:
        t = time.monotonic()
        load = _load()
        try:
            res = plans[section]()
        except Exception as exc:  # the harness records the error and goes on with the next section
            log(f"{section}: failed: {exc!r}")
            res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:], "checks": []}
        res.update(
            machine=machine,
            quick=q,
            load_avg_before=load,
            load_avg_after=_load(),
            seconds=round(time.monotonic() - t, 1),
            generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        )
        results[section] = res
        write_results(results, out_path)
    results["total_seconds"] = round(time.monotonic() - started, 1)
    md = finish_results(results, out_path)
    clean_scratch(args.keep_scratch)
    log(f"wrote {out_path} and {md} in {results['total_seconds']} s")


if __name__ == "__main__":
    main()
