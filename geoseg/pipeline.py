"""The driver: plan tiles -> read (Ray tasks) -> infer (Ray actors) -> post-process (Ray tasks)
-> stitch and write (here, one writer per scene).

Why Ray core rather than Ray Data: scenes in one run differ in band count and dtype, and a bad
file must fail only its own scene. With tasks and actors each tile carries its own arrays and its
own error, the number of tiles in flight is an explicit bound (so driver memory does not grow with
raster size), and every head runs on one tile read in one actor call.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import rasterio
import ray
from tqdm import tqdm

from geoseg.config import Config
from geoseg.contract import check_scene
from geoseg.errors import GeosegError, InputError, OutputError
from geoseg.grid import Tile, tile_grid_shape
from geoseg.postprocess import TileResult, postprocess_tile
from geoseg.read import SceneInfo, find_scenes, inspect_scene, read_tile
from geoseg.scene import SceneJob

log = logging.getLogger("geoseg")
DRIVER_GDAL_CACHE_MB = 256
# The driver maps object-store pages as it reads tile results, so its resident memory is bounded by
# libraries (~300 MiB) + its own state (~135 MiB) + this store: 1 GiB keeps it under 1.5 GB.
LOCAL_OBJECT_STORE_BYTES = 1024**3
MAX_SCENES_FINISHING = 2


@dataclass
class RunReport:
    """What a run did: one entry per input, ok or failed."""

    summaries: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, one-line error)
    tiles: int = 0
    skipped: int = 0  # inputs already done (resume)
    megapixels: float = 0.0
    seconds: float = 0.0
    started_unix: float = 0.0  # time.time() when run() began
    # (time.time(), core pixels) each time tile results reached their scene: progress and steady-state rate
    progress: list[tuple[float, int]] = field(default_factory=list)

    @property
    def first_tile_unix(self) -> float | None:
        return self.progress[0][0] if self.progress else None

    @property
    def ok(self) -> bool:
        return not self.failures


def _read_task(path: str, tile: Tile, bands: list[int]) -> dict[str, Any]:
    try:
        data = read_tile(path, tile, bands)
    except InputError as exc:
        return {"tile": tile, "status": "error", "error": str(exc)}
    except Exception as exc:  # GDAL can fail in many ways on a damaged file; keep it to this scene
        return {"tile": tile, "status": "error", "error": f"{path}: read failed ({exc})"}
    if not data["valid"].any():
        return {"tile": tile, "status": "empty"}
    return {"tile": tile, "status": "ok", **data}


def _post_task(pred: dict[str, Any], config: Config, row_area: Any, grid_shape: tuple[int, int]) -> TileResult:
    try:
        return postprocess_tile(pred, config, row_area, grid_shape)
    except Exception as exc:
        return TileResult(tile=pred["tile"], status="error", error=f"post-processing failed: {exc}")


class _PredictorActor:
    """Ray actor around ``Predictor``: one return value per tile, so each tile moves on alone."""

    def __init__(self, config: Config, num_threads: int) -> None:
        from geoseg.infer import Predictor  # torch lives in the actors, not in the driver

        self.predictor = Predictor(config, num_threads=num_threads)

    def predict(self, *payloads: dict[str, Any]) -> Any:
        out = self.predictor(list(payloads))
        return out[0] if len(out) == 1 else tuple(out)


def _check_models_task(config: Config) -> None:
    from geoseg.models import check_models

    check_models(config)


def check_models_on_cluster(config: Config) -> None:
    """Build and test every model once in a Ray worker, before any tile is read.

    Done in a worker so that the driver never imports torch (about 700 MB for a CUDA build): the
    driver's memory stays small and flat whatever the raster size.
    """
    try:
        ray.get(ray.remote(num_cpus=1)(_check_models_task).remote(config))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, GeosegError):
            raise exc.cause from None
        raise


def ensure_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; reuse one already up."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, object_store_memory=LOCAL_OBJECT_STORE_BYTES)


def _start_actors(config: Config) -> list[Any]:
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        n, options = config.runtime.num_actors or gpus, {"num_gpus": 1, "num_cpus": 1}
    else:
        # One CPU actor that uses all cores but one: the remaining core reads and post-processes.
        n, options = config.runtime.num_actors or 1, {"num_cpus": max(1, cpus - 1) if cpus > 1 else 0.5}
    threads = max(1, int(options["num_cpus"]))
    actor_cls = ray.remote(_PredictorActor)
    return [actor_cls.options(**options).remote(config, threads) for _ in range(n)]


def _check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".geoseg-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(str(out_dir), f"output folder is not writable ({exc.strerror})") from None


def config_fingerprint(config: Config) -> str:
    """Hash of the resolved config: a rerun with ``resume`` skips only scenes made the same way."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def _done_before(path: str, out_dir: Path, stem: str, fingerprint: str) -> dict[str, Any] | None:
    """The summary of an earlier successful run of this input with this config, if still current."""
    summary_path = out_dir / stem / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
        newer = os.path.exists(path) and os.path.getmtime(path) > summary_path.stat().st_mtime
    except (OSError, ValueError):
        return None
    same = summary.get("input") == path and summary.get("config") == fingerprint and summary.get("status") == "ok"
    return summary if same and not newer else None


def _open_scenes(inputs: list[str], config: Config, out_dir: Path, report: RunReport,
                 resume: bool = False) -> list[SceneInfo]:
    """Check every input's header against the models; returns the scenes to process."""
    paths, errors = find_scenes(inputs)
    for err in errors:
        report.failures.append((err.path, str(err)))
    scenes: list[SceneInfo] = []
    stems: set[str] = set()
    fingerprint = config_fingerprint(config)
    for path in paths:
        if resume and (done := _done_before(path, out_dir, Path(path).stem, fingerprint)):
            log.info("%s: already done with this config, skipped (resume)", path)
            report.summaries.append(done)
            report.skipped += 1
            stems.add(Path(path).stem)
            continue
        try:
            info = inspect_scene(path)
            check_scene(info, config)  # each head's input contract: band count, dtype, resolution
            if info.stem in stems:
                raise InputError(path, f"another input already writes {out_dir / info.stem}; rename one of them")
            stems.add(info.stem)
            scenes.append(info)
        except GeosegError as exc:
            log.info("%s", exc)
            report.failures.append((path, str(exc)))
    return scenes


def run(inputs: list[str], out_dir: str | Path, config: Config, address: str | None = None,
        progress: bool = True, resume: bool = False) -> RunReport:
    """Process every input; a failing input is reported and the others go on.

    With ``resume``, inputs whose ``out/<stem>/summary.json`` says they were done with the same
    config (and that are older than it) are skipped, so a rerun after a failure redoes the rest.
    """
    started = time.monotonic()
    report = RunReport(started_unix=time.time())
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    ensure_ray(address)
    check_models_on_cluster(config)
    # The driver writes masks window by window; a small GDAL block cache keeps its memory flat.
    with rasterio.Env(GDAL_CACHEMAX=DRIVER_GDAL_CACHE_MB):
        scenes = _open_scenes(inputs, config, out_dir, report, resume)
        if scenes:
            _schedule(scenes, config, out_dir, report, progress)
    report.seconds = time.monotonic() - started
    write_run_csv(out_dir / "summary.csv", report)
    return report


def _tile_stream(scenes: list[SceneInfo], config: Config, out_dir: Path, report: RunReport,
                 active: dict[int, SceneJob]) -> Iterator[tuple[SceneJob, Tile]]:
    """Tiles of one scene after another. A scene's outputs are opened when its first tile is
    sent (not all at start: a nightly run may hold thousands of scenes)."""
    fingerprint = config_fingerprint(config)
    for index, info in enumerate(scenes):
        try:
            job = SceneJob(index, info, config, out_dir, fingerprint)
        except Exception as exc:  # e.g. the output folder filled up or vanished
            report.failures.append((info.path, f"{info.path}: cannot prepare outputs ({exc})"))
            continue
        active[index] = job
        for tile in job.tiles:
            if job.error:  # a scene that failed stops sending tiles
                break
            job.sent += 1
            yield job, tile


def _schedule(scenes: list[SceneInfo], config: Config, out_dir: Path, report: RunReport, progress: bool) -> None:
    actors = _start_actors(config)
    read = ray.remote(num_cpus=1)(_read_task)
    post = ray.remote(num_cpus=1)(_post_task)
    batch = config.runtime.batch_size
    limit = len(actors) * config.runtime.batches_in_flight_per_actor * batch
    active: dict[int, SceneJob] = {}  # scenes opened and not yet complete
    stream = _tile_stream(scenes, config, out_dir, report, active)
    in_flight: dict[Any, tuple[SceneJob, Tile]] = {}
    actor_cycle = itertools.cycle(actors)
    total = sum(math.prod(tile_grid_shape(s.width, s.height, config.tiling.tile_size)) for s in scenes)
    bar = tqdm(total=total, unit="tile", disable=not progress, smoothing=0.1)
    started = time.monotonic()
    done_px = 0
    # Finishing a scene (relabel pass, COG copies, seam merges) runs beside the loop, so the
    # actors keep getting tiles; at most a few finished scenes wait, to bound driver memory.
    finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geoseg-finish")
    finishing: deque[Future[None]] = deque()
    while True:
        while len(in_flight) + batch <= limit or not in_flight:
            group = list(itertools.islice(stream, batch))
            if not group:
                break
            reads = [read.remote(job.info.path, tile, config.bands_needed) for job, tile in group]
            preds = next(actor_cycle).predict.options(num_returns=len(reads)).remote(*reads)
            preds = [preds] if len(reads) == 1 else preds
            for (job, tile), pred in zip(group, preds):
                in_flight[post.remote(pred, config, job.row_area(tile), job.grid_shape)] = (job, tile)
        if not in_flight:
            break
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            job, tile = in_flight.pop(ref)
            result = _get(ref, tile)
            if result.status == "error" and not job.error:
                log.info("%s", result.error)
            job.add(result)
            done_px += int(result.tile.core.width * result.tile.core.height)
            report.progress.append((time.time(), int(result.tile.core.width * result.tile.core.height)))
            bar.update(1)
            bar.set_postfix_str(f"{done_px / 1e6 / max(time.monotonic() - started, 1e-9):.2f} Mpx/s", refresh=False)
            # Complete, or failed with nothing left in flight (no more of its tiles will be sent).
            if job.index in active and (job.complete or (job.error and job.done == job.sent)):
                del active[job.index]
                finishing.append(finisher.submit(_finish, job, report))
        while len(finishing) > MAX_SCENES_FINISHING:
            finishing.popleft().result()
    # Scenes that failed early never send all their tiles: finish them here.
    for job in active.values():
        job.error = job.error or "stopped before all tiles were processed"
        finishing.append(finisher.submit(_finish, job, report))
    for future in finishing:
        future.result()
    finisher.shutdown()
    bar.close()
    report.tiles = total
    report.megapixels = done_px / 1e6


def _get(ref: Any, tile: Tile) -> TileResult:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # an actor or task died: this tile fails, the run goes on
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return TileResult(tile=tile, status="error", error=f"worker failed on tile {tile.index}: {first}")


def _finish(job: SceneJob, report: RunReport) -> None:
    """Publish a complete scene, or drop a failed one (runs in the finisher thread)."""
    if job.error:
        job.abort()
        report.failures.append((job.info.path, job.error))
        return
    try:
        with rasterio.Env(GDAL_CACHEMAX=DRIVER_GDAL_CACHE_MB):  # rasterio's Env is per thread
            summary = job.finish()
        report.summaries.append(summary)
        log.info("%s: done in %.1f s", job.info.path, time.monotonic() - job.started)
    except Exception as exc:
        job.abort()
        msg = f"{job.info.path}: writing outputs failed ({exc})"
        log.info("%s", msg)
        report.failures.append((job.info.path, msg))


def write_run_csv(path: Path, report: RunReport) -> None:
    """``out/summary.csv``: a row per input x model x class, and a row per failed input."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["input", "status", "model", "task", "class", "count", "pixels", "area_m2", "error"])
        for s in report.summaries:
            for model, m in s["models"].items():
                for cls, v in m["classes"].items():
                    w.writerow([s["input"], "ok", model, m["task"], cls, v.get("count", ""), v["pixels"], v["area_m2"], ""])
        for inp, err in report.failures:
            w.writerow([inp, "failed", "", "", "", "", "", "", err])
    os.replace(tmp, path)
