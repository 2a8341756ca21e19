"""``python -m bench.gpu --out bench/results.json``: the GPU section, on a machine with CUDA.

One command, under 8 minutes on one H100, nothing downloaded (random U-Net weights, synthetic
raster). Needs only the repo and its ``.venv`` (``make install``). Without a CUDA device it records
``{"skipped": "no CUDA device"}`` and exits 0. Each measurement runs in its own subprocess:

a. **model alone**: ``bench/models.py:unet_resnet18`` (smp U-Net, ResNet-18, 3 -> 5 classes) on
   the GPU, channels_last, bf16 autocast (fp16 where bf16 is missing, as geoseg's actor does),
   batch 16 at the padded side ``geoseg.raster.grid.padded_size(1024, 32)`` = 1088, input already on the
   GPU; forward + crop to the core + argmax to uint8 (the actor's own per-pixel step, left on the
   GPU); warm-up, then the median of timed iterations (``torch.cuda.synchronize`` around each).
   Mpx/s counts core pixels (16 x 1024^2 per batch);
b. **pipeline**: ``geoseg.runner.pipeline.run`` (local Ray started by ``run``: every core and the GPU,
   device auto) on a synthetic 16384^2 raster, tile 1024 + halo 32, batch 16, same network;
   Mpx/s steady and end to end as in ``bench.run`` (from ``RunReport.progress``), ratio to (a);
c. **GPU utilisation and memory** sampled every 0.5 s while (b) runs: pynvml when importable,
   else ``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits
   -lms 500``; mean / median / p10 of the utilisation between the first and the last tile result
   (the steady window), and over the whole ``run``.

Writes the ``gpu`` section of ``--out`` (other sections kept) and regenerates ``RESULTS.md`` beside it.
``--cpu-smoke`` runs the same code paths on the CPU at tiny sizes (to test the harness; not figures).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / "bench" / "scratch"
BUDGET_S = 450  # whole command, well under 8 minutes


def log(msg: str) -> None:
    print(f"[bench.gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- children


def child_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
        )
    return info


def child_model(tile: int, halo: int, batch: int, warmup: int, iters: int, device: str) -> dict[str, Any]:
    """(a) The U-Net alone on the device, as geoseg's actor runs it."""
    import torch

    from bench.models import unet_resnet18
    from geoseg.raster.grid import padded_size

    dev = torch.device(device)
    side = padded_size(tile, halo)
    model = unet_resnet18().to(dev).eval().to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, side, side, device=dev).contiguous(memory_format=torch.channels_last)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if (not cuda or torch.cuda.is_bf16_supported()) else torch.float16

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=dtype):
            logits = model(x)
        return logits[:, :, halo : halo + tile, halo : halo + tile].argmax(dim=1).to(torch.uint8)

    times = []
    with torch.inference_mode():
        t = time.perf_counter()
        for _ in range(warmup):
            step()
        sync()
        warm_s = time.perf_counter() - t
        for _ in range(iters):
            sync()
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "autocast_dtype": str(dtype).replace("torch.", ""),
        "channels_last": True,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "batch_size": batch,
        "tile_size": tile,
        "halo": halo,
        "padded_side": side,
        "warmup_iterations": warmup,
        "warmup_s": round(warm_s, 3),
        "iterations": iters,
        "batch_seconds_median": round(med, 5),
        "batch_seconds_min": round(min(times), 5),
        "batch_seconds_max": round(max(times), 5),
        "mpx_per_s": round(batch * tile**2 / med / 1e6, 2),
        "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }


# ------------------------------------------------------------------------------------------- sampler


class GpuSampler:
    """GPU utilisation (%) and memory used (MiB) every ``interval`` s, with Unix timestamps."""

    def __init__(self, index: int = 0, interval: float = 0.5) -> None:
        self.index, self.interval = index, interval
        self.samples: list[tuple[float, float, float]] = []
        self.source = "none"
        self.error: str | None = None  # the sampler that ran failed, or none could run
        self.note: str | None = None  # why pynvml was not used
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> GpuSampler:
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.source = "pynvml"
            self._thread = threading.Thread(target=self._nvml_loop, args=(pynvml, handle), daemon=True)
            self._thread.start()
            return self
        except Exception as exc:  # not installed, or no NVML: nvidia-smi
            self.note = f"pynvml not used: {exc}"
        smi = shutil.which("nvidia-smi")
        if not smi:
            self.error = f"{self.note}; nvidia-smi not found: no GPU samples"
            return self
        cmd = [
            smi,
            "--query-gpu=timestamp,utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
            "-lms",
            str(int(self.interval * 1000)),
            "-i",
            str(self.index),
        ]
        if shutil.which("stdbuf"):
            cmd = ["stdbuf", "-oL", *cmd]  # line-buffered through the pipe
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as exc:
            self.error = f"{self.note}; nvidia-smi: {exc}"
            return self
        self.source = "nvidia-smi -lms"
        self._thread = threading.Thread(target=self._smi_loop, daemon=True)
        self._thread.start()
        return self

    def _nvml_loop(self, pynvml: Any, handle: Any) -> None:
        while not self._stop.is_set():
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                self.samples.append((time.time(), float(util), float(mem)))
            except Exception as exc:
                self.error = f"pynvml: {exc}"
            self._stop.wait(self.interval)

    def _smi_loop(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            parsed = parse_smi_line(line)
            if parsed:
                self.samples.append(parsed)

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            try:
                self._proc.send_signal(signal.SIGINT)
                self._proc.wait(timeout=3)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.source != "none" and not self.samples and not self.error:
            self.error = f"{self.source}: no samples read"


def parse_smi_line(line: str) -> tuple[float, float, float] | None:
    """``2026/11/26 12:00:00.123, 87, 30512`` -> (unix time, util %, MiB); None for anything else."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        try:
            t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        except ValueError:
            t = time.time()
        return t, float(parts[1]), float(parts[2])
    except ValueError:
        return None


def util_stats(samples: list[tuple[float, float, float]], t0: float | None, t1: float | None) -> dict[str, Any]:
    window = [s for s in samples if t0 is not None and t1 is not None and t0 <= s[0] <= t1]
    if not window:
        return {"samples": 0}
    util = sorted(s[1] for s in window)
    return {
        "samples": len(window),
        "util_mean": round(statistics.fmean(util), 1),
        "util_median": round(statistics.median(util), 1),
        "util_p10": round(util[max(0, int(0.1 * (len(util) - 1)))], 1),
        "memory_used_max_mib": round(max(s[2] for s in window), 0),
        "memory_used_median_mib": round(statistics.median(s[2] for s in window), 0),
    }


# ------------------------------------------------------------------------------------------- driver


def _run_child(args: list[str], timeout: float, monitor: bool = False) -> dict[str, Any]:
    from bench.run import _child

    return _child(args[0], args[1:], monitor=monitor, timeout=max(30, int(timeout)))


def _nvidia_smi_info() -> dict[str, Any]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {}
    try:
        out = (
            subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            .stdout.strip()
            .splitlines()
        )
        name, driver, mem = (p.strip() for p in out[0].split(","))
        return {"nvidia_smi_name": name, "driver_version": driver, "memory_total": mem}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


def measure(size: int, tile: int, halo: int, batch: int, iters: int, device: str, deadline: float) -> dict[str, Any]:
    from bench.rasters import write_raster
    from bench.run import PIXEL_SIZE_M, check, pipeline, ratio, semantic_config

    left = lambda: deadline - time.monotonic()  # noqa: E731
    log(f"model alone: U-Net ResNet-18, batch {batch}, padded side of {tile} + {halo}, {iters} iterations")
    alone = _run_child(
        [
            "bench.gpu",
            "--child",
            "model",
            "--tile-size",
            str(tile),
            "--halo",
            str(halo),
            "--batch-size",
            str(batch),
            "--iters",
            str(iters),
            "--device",
            device,
        ],
        min(240, left()),
    )
    log(f"model alone: {alone.get('mpx_per_s')} Mpx/s {alone.get('error', '')}")
    t = time.monotonic()
    raster = write_raster(SCRATCH / f"gpu-syn-{size}.tif", size, pixel_size=PIXEL_SIZE_M)
    raster_s = round(time.monotonic() - t, 1)
    log(f"pipeline: {size}^2 (raster written in {raster_s} s), tile {tile} + {halo}, batch {batch}, device {device}")
    sampler = GpuSampler(0, 0.5).start()
    try:
        pipe = pipeline(
            [raster],
            semantic_config(
                "bench/models.py:unet_resnet18", tile, halo, batch, device="auto" if device == "cuda" else device
            ),
            f"gpu-{size}",
            timeout=max(60, int(left() - 20)),
        )
    finally:
        sampler.stop()
    raster.unlink(missing_ok=True)
    log(
        f"pipeline: {pipe.get('mpx_per_s_steady')} Mpx/s steady, {pipe.get('mpx_per_s_end_to_end')} end to end"
        f" {pipe.get('error', '')}"
    )
    ok = "error" not in pipe
    steady_u = util_stats(sampler.samples, pipe.get("first_tile_unix"), pipe.get("last_tile_unix")) if ok else {}
    run_u = util_stats(sampler.samples, pipe.get("run_started_unix"), pipe.get("run_returned_unix")) if ok else {}
    a = alone.get("mpx_per_s")
    steady, e2e = (pipe.get("mpx_per_s_steady"), pipe.get("mpx_per_s_end_to_end")) if ok else (None, None)
    checks = [
        check(f"U-Net alone, batch {batch}, bf16 autocast, channels_last, data on the GPU", a, "Mpx/s"),
        check("pipeline, steady (first to last tile result)", steady, "Mpx/s"),
        check("pipeline, end to end (core Mpx / run() wall)", e2e, "Mpx/s"),
        check("pipeline / model alone, steady", ratio(steady, a), ""),
        check("pipeline / model alone, end to end", ratio(e2e, a), ""),
        check("GPU utilisation, steady window: mean", steady_u.get("util_mean"), "%"),
        check("GPU utilisation, steady window: median", steady_u.get("util_median"), "%"),
        check("GPU utilisation, steady window: p10", steady_u.get("util_p10"), "%"),
        check("GPU utilisation over the whole run(): mean", run_u.get("util_mean"), "%"),
        check("GPU memory used, max over the run", run_u.get("memory_used_max_mib"), "MiB"),
        check("first tile after run() began", pipe.get("first_tile_s") if ok else None, "s"),
        check(
            "whole-job peak host memory (driver RSS + PSS of Ray processes)",
            pipe.get("whole_job_peak_mib") if ok else None,
            "MiB",
        ),
    ]
    return {
        "checks": checks,
        "model_alone": alone,
        "pipeline": pipe,
        "raster_write_s": raster_s,
        "sampler": {
            "source": sampler.source,
            "error": sampler.error,
            "note": sampler.note,
            "samples": len(sampler.samples),
            "steady_window": steady_u,
            "whole_run": run_u,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results.json")
    ap.add_argument("--size", type=int, default=16384, help="synthetic raster side for the pipeline")
    ap.add_argument("--tile-size", type=int, default=1024)
    ap.add_argument("--halo", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=30, help="timed iterations of the model alone")
    ap.add_argument("--keep-scratch", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: tests the harness only")
    ap.add_argument("--child", choices=["info", "model"], help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        res = (
            child_info()
            if args.child == "info"
            else child_model(
                args.tile_size, args.halo, args.batch_size, 3 if args.device == "cpu" else 10, args.iters, args.device
            )
        )
        Path(args.json).write_text(json.dumps(res, indent=2))
        return

    started = time.monotonic()
    deadline = started + BUDGET_S
    SCRATCH.mkdir(parents=True, exist_ok=True)
    from bench.run import _load, finish_results, load_results, machine_info

    out_path = Path(args.out)
    info = _run_child(["bench.gpu", "--child", "info"], 300)
    machine = machine_info()
    load = _load()
    section: dict[str, Any] = {
        "title": "GPU: U-Net ResNet-18, model alone vs the pipeline",
        "machine": machine,
        "gpu": {**info, **_nvidia_smi_info()},
    }
    if args.cpu_smoke:
        size, tile, halo, batch, iters, device = 1024, 256, 32, 2, 2, "cpu"
        section["cpu_smoke"] = True
    else:
        size, tile, halo, batch, iters, device = (
            args.size,
            args.tile_size,
            args.halo,
            args.batch_size,
            args.iters,
            "cuda",
        )
    section["parameters"] = {
        "size": size,
        "tile_size": tile,
        "halo": halo,
        "batch_size": batch,
        "device": device,
        "model": "smp.Unet('resnet18', encoder_weights=None, in_channels=3, classes=5), seed 0",
        "gpu": info.get("device"),
        "torch": info.get("torch"),
        "cuda": info.get("torch_cuda"),
        "cudnn": info.get("cudnn"),
        "driver": section["gpu"].get("driver_version"),
    }
    if not info.get("cuda_available") and not args.cpu_smoke:
        section.update(skipped="no CUDA device", checks=[])
        log("no CUDA device: gpu section skipped")
    else:
        try:
            section.update(measure(size, tile, halo, batch, iters, device, deadline))
        except Exception as exc:  # record and exit 0: the other sections stay valid
            import traceback

            section.update(
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc()[-4000:],
                checks=section.get("checks", []),
            )
            log(f"failed: {exc!r}")
    section.update(
        load_avg_before=load,
        load_avg_after=_load(),
        seconds=round(time.monotonic() - started, 1),
        generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        quick=bool(args.cpu_smoke),
    )
    results = load_results(out_path)
    results["gpu"] = section
    results.setdefault("machine", machine)
    md = finish_results(results, out_path)
    if not args.keep_scratch:
        from bench.run import clean_scratch

        clean_scratch(False)
    log(f"wrote the gpu section of {out_path} and {md} in {section['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
