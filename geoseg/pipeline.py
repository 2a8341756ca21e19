"""The driver: plans tiles and schedules the work; no pixel, polygon or output file passes through it.

For each batch of tiles of one scene: a read task -> a model actor call -> a post-processing task
-> the scene's writer (``geoseg.writer``, an actor placed anywhere in the cluster). The driver
hands each stage the previous stage's object ref, so arrays go from worker to worker; what it
receives back is one small acknowledgement per tile and one summary per scene. It bounds the tiles
in flight (so memory does not grow with the raster), keeps every model actor fed, and turns any
failure into that scene's one-line error while the other scenes go on.

Why Ray core rather than Ray Data: scenes in one run differ in band count and dtype, a bad file
must fail only its own scene, and every head runs on one tile read in one actor call.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import rasterio
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from geoseg.config import Config
from geoseg.contract import check_scene
from geoseg.errors import GeosegError, InputError
from geoseg.grid import Tile, plan_tiles, tile_grid_shape
from geoseg.lock import RunLock
from geoseg.read import SceneInfo, find_scenes, inspect_scene
from geoseg.storage import OutputStore, storage_env
from geoseg.units import GroundScale, ground_scale
from geoseg.workers import PredictorWorker, TileAck, postprocess_batch, read_batch, warm_up_worker

log = logging.getLogger("geoseg")
DRIVER_GDAL_CACHE_MB = 64  # the driver only opens headers
# A local Ray caps its object store: tile batches in flight need little, and the store's pages
# count in every process that maps them.
LOCAL_OBJECT_STORE_BYTES = 1024**3
# Batches a scene may have between the model actor and its writer (post-processing, writing),
# beyond those queued at the actors: enough for the CPU stages to overlap the model.
EXTRA_BATCHES_IN_FLIGHT = 2
WRITER_THREADS = 4  # concurrent calls per writer: scenes on one writer are assembled side by side


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
    # (time.time(), core pixels) each time tile results reached their scene's writer
    progress: list[tuple[float, int]] = field(default_factory=list)
    writer_nodes: dict[str, str] = field(default_factory=dict)  # input -> Ray node id that assembled it
    device: str = ""  # where the models ran

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def first_tile_unix(self) -> float | None:
        return self.progress[0][0] if self.progress else None


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


class _WriterActor:
    """Ray actor around ``geoseg.writer.SceneWriter`` (imported in the actor: the driver never
    loads the writing stack)."""

    def __init__(self, config: Config, store: OutputStore, env: dict[str, str]) -> None:
        from geoseg.writer import SceneWriter

        self.writer = SceneWriter(config, store, env, node=ray.get_runtime_context().get_node_id())

    def open(self, index: int, info: SceneInfo, config_id: str, scale: GroundScale) -> str:
        return self.writer.open(index, info, config_id, scale)

    def add(self, index: int, results: list[Any], opened: Any = None) -> list[TileAck]:
        return self.writer.add(index, results, opened)

    def finish(self, index: int) -> dict[str, Any]:
        return self.writer.finish(index)

    def abort(self, index: int) -> None:
        self.writer.abort(index)


def _cpu_nodes() -> list[tuple[str, float]]:
    """(node id, CPUs) of the alive nodes that have CPUs, largest first."""
    nodes = [(n["NodeID"], float(n["Resources"].get("CPU", 0))) for n in ray.nodes() if n.get("Alive")]
    return sorted([n for n in nodes if n[1] >= 1], key=lambda n: -n[1])


def _task_cpus() -> float:
    """CPUs of a read or post-processing task: one, or half where a node has a single CPU (its
    model actor holds the other half). One per task keeps a 2-core laptop at one task worker."""
    return 1.0 if all(cpus >= 2 for _, cpus in _cpu_nodes()) else 0.5


def _start_actors(config: Config) -> list[Any]:
    """One model actor per GPU; without GPUs, one per node, sized by that node's CPUs.

    A CPU actor reserves all of its node's cores but one (half a core on a one-core node) so that
    reading and post-processing go on beside it, and runs torch on every core of its node: the
    model gets the cores while the CPU stages overlap it. Sizing by one node (never by the
    cluster's total) keeps an actor schedulable on a cluster of small nodes.
    """
    # A model actor that dies (a worker killed, out of memory) is restarted and its calls retried.
    actor_cls = ray.remote(max_restarts=2, max_task_retries=2)(PredictorWorker)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus and config.runtime.device != "cpu":
        # Two calls at once: one batch is padded and copied while the other runs on the GPU.
        return [actor_cls.options(num_gpus=1, num_cpus=1, max_concurrency=2).remote(config, 1)
                for _ in range(config.runtime.num_actors or gpus)]
    nodes = _cpu_nodes()
    if not nodes:
        raise GeosegError("the Ray cluster has no node with a CPU to run the models on")
    count = config.runtime.num_actors or len(nodes)
    actors = []
    for node_id, cpus in itertools.islice(itertools.cycle(nodes), count):
        reserve = cpus - 1 if cpus >= 2 else 0.5
        actors.append(actor_cls.options(
            num_cpus=reserve, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(config, max(1, int(cpus))))
    return actors


def _start_writers(config: Config, store: OutputStore, env: dict[str, str]) -> list[Any]:
    """Scene writers, one per node, so scenes are assembled all over the cluster.

    They reserve no CPU: their work is mostly compressed window writes, in GDAL threads. Placement
    is by node affinity, soft (Ray's SPREAD put every zero-CPU writer on one node here).
    """
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    cls = ray.remote(_WriterActor)
    return [cls.options(num_cpus=0, max_concurrency=WRITER_THREADS,
                        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote(config, store, env)
            for node in nodes]


def _wait_ready(actors: list[Any]) -> str:
    """Wait until every model actor has built and checked its models; raise the first model error."""
    try:
        devices = ray.get([a.ready.remote() for a in actors])
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, GeosegError):
            raise exc.cause from None
        raise
    return ",".join(sorted(set(devices)))


def config_fingerprint(config: Config) -> str:
    """Hash of the resolved config: a rerun with ``resume`` skips only scenes made the same way."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def _done_before(path: str, store: OutputStore, stem: str, fingerprint: str) -> dict[str, Any] | None:
    """The summary of an earlier successful run of this input with this config, if still current."""
    text = store.read_text(f"{stem}/summary.json")
    if text is None:
        return None
    try:
        summary = json.loads(text)
    except ValueError:
        return None
    published = summary.get("published_unix", 0)
    newer = os.path.exists(path) and published and os.path.getmtime(path) > published
    same = summary.get("input") == path and summary.get("config") == fingerprint and summary.get("status") == "ok"
    return summary if same and not newer else None


def _open_scenes(inputs: list[str], config: Config, store: OutputStore, report: RunReport,
                 resume: bool = False) -> list[SceneInfo]:
    """Check every input's header against the models; returns the scenes to process."""
    paths, errors = find_scenes(inputs)
    for err in errors:
        report.failures.append((err.path, str(err)))
    scenes: list[SceneInfo] = []
    stems: set[str] = set()
    fingerprint = config_fingerprint(config)
    for path in paths:
        if resume and (done := _done_before(path, store, Path(path).stem, fingerprint)):
            log.info("%s: already done with this config, skipped (resume)", path)
            report.summaries.append(done)
            report.skipped += 1
            stems.add(Path(path).stem)
            continue
        try:
            info = inspect_scene(path)
            check_scene(info, config)  # each head's input contract: band count, dtype, resolution
            if info.stem in stems:
                raise InputError(path, f"another input already writes {store.uri(info.stem)}; rename one of them")
            stems.add(info.stem)
            scenes.append(info)
        except GeosegError as exc:
            log.info("%s", exc)
            report.failures.append((path, str(exc)))
    return scenes


def run(inputs: list[str], out_dir: str | Path, config: Config, address: str | None = None,
        progress: bool = True, resume: bool = False) -> RunReport:
    """Process every input into ``out_dir`` (a folder, or ``s3://bucket/prefix``); a failing input
    is reported and the others go on.

    With ``resume``, inputs whose published ``summary.json`` says they were done with the same
    config (and that are older than it) are skipped, so a rerun after a failure redoes the rest.
    """
    started = time.monotonic()
    report = RunReport(started_unix=time.time())
    store = OutputStore(out_dir)
    store.check_writable()
    with contextlib.nullcontext() if store.remote else RunLock(out_dir):  # one run per output folder
        _run_locked(inputs, store, config, address, progress, resume, report)
        report.seconds = time.monotonic() - started
        store.write_text("summary.csv", run_csv(report))
    return report


def _run_locked(inputs: list[str], store: OutputStore, config: Config, address: str | None, progress: bool,
                resume: bool, report: RunReport) -> None:
    ensure_ray(address)
    env = storage_env()
    # Everything that takes seconds to start starts now, side by side: the model actors build and
    # check their models, the writers and the task workers import their libraries, while the
    # driver reads the inputs' headers.
    actors = _start_actors(config)
    writers = _start_writers(config, store, env)
    ray.remote(num_cpus=_task_cpus())(warm_up_worker).remote()
    try:
        with rasterio.Env(GDAL_CACHEMAX=DRIVER_GDAL_CACHE_MB):
            scenes = _open_scenes(inputs, config, store, report, resume)
        report.device = _wait_ready(actors)
        if scenes:
            _Scheduler(scenes, config, env, actors, writers, report, progress).run()
    finally:
        for actor in actors + writers:
            ray.kill(actor)


class _Scene:
    """The driver's view of one scene: its tiles still to send, counters, its writer and error."""

    def __init__(self, index: int, info: SceneInfo, config: Config) -> None:
        self.index, self.info = index, info
        ts = config.tiling.tile_size
        self.grid_shape = tile_grid_shape(info.width, info.height, ts)
        self.n_tiles = self.grid_shape[0] * self.grid_shape[1]
        self.tiles: Iterator[Tile] = plan_tiles(info.width, info.height, ts, config.tiling.halo, scene=index)
        self.writer: Any = None
        self.opened: Any = None  # ref of the writer's open(): later calls wait for it
        self.row_area: Any = None  # ref of the per-row pixel areas, shared by the scene's tasks
        self.sent = self.acked = self.in_flight = 0
        self.error: str | None = None


class _Scheduler:
    """The scheduling loop of one run (see the module docstring)."""

    def __init__(self, scenes: list[SceneInfo], config: Config, env: dict[str, str], actors: list[Any],
                 writers: list[Any], report: RunReport, progress: bool) -> None:
        self.config, self.actors, self.writers, self.report = config, actors, writers, report
        self.pending = [_Scene(i, info, config) for i, info in enumerate(scenes)]
        self.pending.reverse()  # pop() takes them in input order
        self.writer_load = [0] * len(self.writers)  # scenes open on each writer
        self.writer_uses = [0] * len(self.writers)  # scenes given to each writer: ties go round the pool
        self.actor_load = [0] * len(actors)  # batches queued on each actor
        task_cpus = _task_cpus()
        self.read = ray.remote(num_cpus=task_cpus)(read_batch)
        self.post = ray.remote(num_cpus=task_cpus)(postprocess_batch)
        self.config_ref, self.env_ref = ray.put(config), ray.put(env)
        batch = config.runtime.batch_size
        self.limit = len(actors) * (config.runtime.batches_in_flight_per_actor + EXTRA_BATCHES_IN_FLIGHT) * batch
        self.config_id = config_fingerprint(config)
        self.current: _Scene | None = None
        self.acks: dict[Any, tuple[_Scene, int, int]] = {}  # ack ref -> (scene, tiles, actor index)
        self.finishing: dict[Any, _Scene] = {}  # finish ref -> scene
        self.aborting: list[Any] = []  # abort refs: waited for before the writers go
        self.tiles_in_flight = 0
        total = sum(s.n_tiles for s in self.pending)
        report.tiles = total
        self.bar = tqdm(total=total, unit="tile", disable=not progress, smoothing=0.1)
        self.done_px = 0
        self.first_batch = True

    def run(self) -> None:
        try:
            while True:
                self._submit()
                waiting = list(self.acks) + list(self.finishing)
                if not waiting:
                    break
                ready, _ = ray.wait(waiting, num_returns=1)
                ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)  # everything ready now
                for ref in ready:
                    if ref in self.acks:
                        self._on_ack(ref)
                    else:
                        self._on_finished(ref)
        finally:
            self.bar.close()
            try:
                ray.get(self.aborting)  # before run() lets the writers go
            except ray.exceptions.RayError:
                pass  # a writer that died has nothing left to remove
        self.report.megapixels = self.done_px / 1e6

    def _next_batch(self) -> tuple[_Scene, list[Tile]] | None:
        """The next tiles to send, all of one scene; opens scenes on their writers as they start."""
        size = 1 if self.first_batch else self.config.runtime.batch_size  # the first tile comes back soon
        while True:
            if self.current is None or self.current.error:
                if not self.pending:
                    return None
                self.current = self._open(self.pending.pop())
            tiles = list(itertools.islice(self.current.tiles, size))
            if tiles:
                self.first_batch = False
                return self.current, tiles
            self.current = None

    def _open(self, scene: _Scene) -> _Scene:
        w = min(range(len(self.writers)), key=lambda i: (self.writer_load[i], self.writer_uses[i]))
        self.writer_load[w] += 1
        self.writer_uses[w] += 1
        scene.writer = w
        info = scene.info
        # Computed once per scene (a Python loop over rows for geographic grids): the writer gets the
        # whole scale, the post-processing tasks its per-row areas through the object store.
        scale = ground_scale(info.crs_wkt, info.transform, info.width, info.height)
        scene.opened = self.writers[w].open.remote(scene.index, info, self.config_id, scale)
        scene.row_area = ray.put(scale.row_area_m2)
        return scene

    def _submit(self) -> None:
        batch = self.config.runtime.batch_size
        while self.tiles_in_flight + batch <= self.limit or not self.acks:
            nxt = self._next_batch()
            if nxt is None:
                return
            scene, tiles = nxt
            a = min(range(len(self.actors)), key=lambda i: self.actor_load[i])
            self.actor_load[a] += 1
            reads = self.read.remote(scene.info.path, tiles, self.config.bands_needed, self.env_ref)
            preds = self.actors[a].predict.remote(reads)
            results = self.post.remote(preds, self.config_ref, scene.row_area, scene.grid_shape)
            ack = self.writers[scene.writer].add.remote(scene.index, results, scene.opened)
            self.acks[ack] = (scene, len(tiles), a)
            scene.sent += len(tiles)
            scene.in_flight += len(tiles)
            self.tiles_in_flight += len(tiles)

    def _on_ack(self, ref: Any) -> None:
        scene, n, a = self.acks.pop(ref)
        self.actor_load[a] -= 1
        self.tiles_in_flight -= n
        scene.in_flight -= n
        try:
            acks: list[TileAck] = ray.get(ref)
        except ray.exceptions.RayError as exc:  # an actor or task died: this scene fails, the run goes on
            acks = []
            scene.error = scene.error or f"{scene.info.path}: {one_line_error(exc)}"
        pixels = sum(ack.core_pixels for ack in acks)
        for ack in acks:
            if ack.status == "error" and not scene.error:
                scene.error = ack.error or "unknown error"
        scene.acked += n
        self.done_px += pixels
        self.report.progress.append((time.time(), pixels))
        self.bar.update(n)
        self.bar.set_postfix_str(f"{self.done_px / 1e6 / max(time.time() - self.report.started_unix, 1e-9):.2f} Mpx/s",
                                 refresh=False)
        if scene.error and scene.in_flight == 0:
            log.info("%s", scene.error)
            self.aborting.append(self.writers[scene.writer].abort.remote(scene.index))
            self._close(scene)
            self.report.failures.append((scene.info.path, scene.error))
        elif not scene.error and scene.acked == scene.n_tiles:
            self.finishing[self.writers[scene.writer].finish.remote(scene.index)] = scene

    def _on_finished(self, ref: Any) -> None:
        scene = self.finishing.pop(ref)
        self._close(scene)
        try:
            summary = ray.get(ref)
        except ray.exceptions.RayError as exc:
            msg = one_line_error(exc)
            msg = msg if scene.info.path in msg else f"{scene.info.path}: {msg}"
            log.info("%s", msg)
            self.report.failures.append((scene.info.path, msg))
            return
        self.report.summaries.append(summary)
        self.report.writer_nodes[scene.info.path] = ray.get(scene.opened)
        log.info("%s: done", scene.info.path)

    def _close(self, scene: _Scene) -> None:
        self.writer_load[scene.writer] -= 1
        if self.current is scene:
            self.current = None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line_error(exc: BaseException) -> str:
    """The real cause of a Ray error, in one plain line (no traceback, no terminal colours)."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None:
        exc = cause
    if isinstance(exc, ray.exceptions.ActorDiedError):
        return "a worker died while processing this scene (the model actor or the scene writer)"
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def run_csv(report: RunReport) -> str:
    """``summary.csv``: a row per input x model x class, and a row per failed input."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["input", "status", "model", "task", "class", "count", "pixels", "area_m2", "error"])
    for s in report.summaries:
        for model, m in s["models"].items():
            for cls, v in m["classes"].items():
                w.writerow([s["input"], "ok", model, m["task"], cls, v.get("count", ""), v["pixels"], v["area_m2"], ""])
    for inp, err in report.failures:
        w.writerow([inp, "failed", "", "", "", "", "", "", err])
    return buf.getvalue()
