"""The scheduling loop of one run: batches of tiles through read -> model -> post-processing ->
the scene's writer, bounded in flight, and what it does when a worker, an actor or a node dies.
The driver's part of ``geoseg.pipeline``; it passes object refs and receives small acknowledgements."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import ray
from tqdm import tqdm

from geoseg.actors import cpu_nodes, task_cpus
from geoseg.checkpoint import checkpoint_stamp, finished_tiles
from geoseg.config import Config
from geoseg.grid import Tile, plan_tiles, tile_grid_shape
from geoseg.ray_errors import actor_hex, death_detail, one_line_error, plain_line, ray_cause, why_died
from geoseg.read import SceneInfo
from geoseg.storage import OutputStore
from geoseg.units import GroundScale, ground_scale
from geoseg.windows import BlendPlan, blend_plan
from geoseg.workers import TileAck, postprocess_batch, read_batch

if TYPE_CHECKING:
    from geoseg.pipeline import RunReport

log = logging.getLogger("geoseg")
# Batches a scene may have between the model actor and its writer (post-processing, writing),
# beyond those queued at the actors: enough for the CPU stages to overlap the model.
EXTRA_BATCHES_IN_FLIGHT = 2

# What the scheduler survives (besides Ray's own retries of read and post-processing tasks whose
# worker died, 3 by default):
SUSPECT_DEATHS = 2  # a batch in flight at this many model actor deaths is retried tile by tile, each alone
POISON_DEATHS = 3  # a tile that kills its model actor this many times fails its scene (a poison input)
LOST_TRIES = 3  # a batch whose data was lost with a node (or another system failure) is tried this often
ACTOR_START_TRIES = 3  # a model actor that dies while starting this many times in a row is not replaced again
SCENE_ATTEMPTS = 2  # a scene whose writer died is redone from its first tile on another writer, attempts in all


class _Scene:
    """The driver's view of one scene: its tiles still to send, counters, its writer and error.
    A scene whose writer died starts again from its first tile (a new ``attempt``)."""

    def __init__(self, index: int, info: SceneInfo, config: Config, run_id: str = "") -> None:
        self.index, self.info, self.run_id = index, info, run_id
        self.config = config
        self.tile_size, self.halo = config.tiling.tile_size, config.tiling.halo
        self.grid_shape = tile_grid_shape(info.width, info.height, self.tile_size)
        self.n_tiles = self.grid_shape[0] * self.grid_shape[1]
        self.scale: GroundScale | None = None  # computed when first opened
        self.pixel_areas: Any = None  # ref of the scene's PixelAreas (small), shared by its tasks
        self.error: str | None = None
        self.closed = False  # published, or failed and reported
        self.attempt = 0
        self.reset()

    def open_blend(self) -> None:
        """Make the scene's window grids for this attempt; their key names its windows in the model
        actors' caches."""
        self.blend = blend_plan(self.config, self.info, f"{self.run_id}/{self.index}/{self.attempt}")

    def _tiles(self) -> Iterator[Tile]:
        """The scene's tiles, each with the context its windows need (drawn after the scene opened)."""
        for tile in plan_tiles(self.info.width, self.info.height, self.tile_size, self.halo, scene=self.index):
            yield tile if self.blend is None else dataclasses.replace(tile, context=self.blend.context(tile.read))

    def reset(self) -> None:
        """(Re)start from the first tile, on no writer yet."""
        self.attempt += 1
        # The scene's window grids (None: each tile is one window), made when the scene opens, and
        # their ref in the object store.
        self.blend: BlendPlan | None = None
        self.blend_ref: Any = None
        self.tiles: Iterator[Tile] = self._tiles()
        self.writer: int | None = None  # index in the writer pool
        self.writer_actor: Any = None  # the writer itself (a replacement may take its index later)
        self.opened: Any = None  # ref of the writer's open(): later calls wait for it
        self.sent = self.acked = self.in_flight = 0
        self.pixels = 0  # core pixels acknowledged in this attempt
        self.finishing = False


@dataclass(eq=False)
class _Batch:
    """Tiles of one scene that go together: read task -> model actor call -> post-processing task
    -> the scene's writer."""

    scene: _Scene
    tiles: list[Tile]
    attempt: int  # the scene's attempt it belongs to: one of an earlier attempt no longer counts
    deaths: int = 0  # model actor deaths while it was in flight
    lost: int = 0  # other system failures (its data lost with a node, ...)
    solo: bool = False  # runs alone on its actor (it was in flight at two of its deaths)
    slot: int = -1
    actor: Any = None  # the model actor it went to
    writer: Any = None  # the writer it went to


@dataclass(eq=False)
class _Slot:
    """The place of one model actor: the actor now in it and its state."""

    actor: Any
    node: str | None  # the node it is pinned to (CPU actors); None: placed by Ray (GPU actors)
    state: str = "ready"  # starting | ready | gone (dead and not replaced)
    load: int = 0  # batches queued on it
    solo: bool = False  # a suspect batch runs on it, alone
    start_failures: int = 0  # deaths while starting, in a row


class Scheduler:
    """The scheduling loop of one run (see the module docstring), and what it does when a worker dies.

    A model actor that dies is replaced (on its node; on none when the node is gone and other
    actors remain) and the batches it had are sent again. A batch that was in flight at two deaths
    is split into its tiles, each run alone on an actor: a tile that kills its actor a third time
    fails its scene with a line naming the tile window (a poison input), and the other scenes go
    on. A writer that dies takes its scenes' partial files with it: they are redone from their first
    tile on another writer (``SCENE_ATTEMPTS``), and the partial files dropped. Data lost with a
    node is computed again (``LOST_TRIES``).
    """

    def __init__(self, scenes: list[SceneInfo], config: Config, env: dict[str, str], actors: list[Any],
                 writers: list[Any], report: RunReport, progress: bool, store: OutputStore) -> None:
        self.config, self.report, self.store = config, report, store
        # The run's own lists (see ActorPool): a replacement takes the place of the actor it replaces.
        self.actors, self.writers = actors, writers
        self.slots = [_Slot(a, node) for a, node in zip(actors, getattr(actors, "nodes", [None] * len(actors)))]
        self.writer_nodes: list[str | None] = list(getattr(writers, "nodes", [None] * len(writers)))
        self.writer_where = [w.node.remote() for w in writers]  # refs: the node each one runs on
        self.writer_alive = [True] * len(writers)
        self.roles: dict[str, tuple[str, int]] = {}  # actor id -> ("model", slot) or ("writer", index)
        for i, a in enumerate(actors):
            self.roles[actor_hex(a)] = ("model", i)
        for w, a in enumerate(writers):
            self.roles[actor_hex(a)] = ("writer", w)
        self.dead: set[str] = set()  # actor ids whose death was dealt with
        self.scenes = [_Scene(i, info, config, report.run_id) for i, info in enumerate(scenes)]
        self.pending = list(reversed(self.scenes))  # pop() takes them in input order
        self.writer_load = [0] * len(self.writers)  # scenes open on each writer
        self.writer_uses = [0] * len(self.writers)  # scenes given to each writer: ties go round the pool
        cpus = task_cpus()
        self.read = ray.remote(num_cpus=cpus)(read_batch)
        self.post = ray.remote(num_cpus=cpus)(postprocess_batch)
        self.config_ref, self.env_ref = ray.put(config), ray.put(env)
        runtime = config.runtime
        self.per_actor = (runtime.batches_in_flight_per_actor + EXTRA_BATCHES_IN_FLIGHT) * runtime.batch_size
        self.stamp = {"config": report.config_id, "run": report.run_id}  # recorded in each summary.json
        self.current: _Scene | None = None
        self.acks: dict[Any, _Batch] = {}  # ack ref -> its batch
        self.retry: collections.deque[_Batch] = collections.deque()  # batches to send again, first
        # ready() ref of a model actor starting (a replacement) or probed (it stopped answering):
        # (slot, actor, probe)
        self.starting: dict[Any, tuple[int, Any, bool]] = {}
        self.finishing: dict[Any, tuple[_Scene, int, Any]] = {}  # finish ref -> (scene, attempt, writer)
        self.aborting: list[Any] = []  # abort refs: waited for before the writers go
        self.no_actor = "no model actor is left (their nodes are gone)"
        self.tiles_in_flight = 0
        total = sum(s.n_tiles for s in self.scenes)
        report.tiles = total
        self.bar = tqdm(total=total, unit="tile", disable=not progress, smoothing=0.1)
        self.done_px = 0
        self.first_batch = True

    def run(self) -> None:
        try:
            while True:
                self._submit()
                waiting = [*self.acks, *self.finishing, *self.starting]
                if not waiting:
                    break
                ray.wait(waiting, num_returns=1)
                ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)  # everything ready now
                for ref in ready:
                    if ref in self.acks:
                        self._on_ack(ref)
                    elif ref in self.finishing:
                        self._on_finished(ref)
                    elif ref in self.starting:
                        self._on_started(ref)
            for scene in self.scenes:  # none is left; if one were, it is reported, never dropped
                if not scene.closed:
                    scene.in_flight = 0
                    self._fail(scene, f"{scene.info.path}: not processed (the run stopped before it)")
        finally:
            self.bar.close()
            try:
                ray.get(self.aborting)  # before run() lets the writers go
            except ray.exceptions.RayError:
                pass  # a writer that died has nothing left to remove
        self.report.megapixels = self.done_px / 1e6

    # -- sending work

    def _limit(self) -> int:
        return max(1, sum(s.state != "gone" for s in self.slots)) * self.per_actor

    def _submit(self) -> None:
        batch = self.config.runtime.batch_size
        while self.tiles_in_flight + batch <= self._limit() or not self.acks:
            if all(s.state == "gone" for s in self.slots):
                self._fail_unfinished(self.no_actor)
                return
            while self.retry and self._stale(self.retry[0]):
                self.retry.popleft()
            if self.retry:  # batches sent again go first
                slot = self._pick(self.retry[0].solo)
                if slot is None:
                    return  # an actor is starting, or draining for a batch that runs alone
                self._send(self.retry.popleft(), slot)
                continue
            slot = self._pick(False)
            if slot is None:
                return
            nxt = self._next_batch()
            if nxt is None:
                return
            self._send(nxt, slot)

    def _pick(self, solo: bool) -> int | None:
        """The least loaded ready model actor (an idle one for a batch that runs alone)."""
        free = [i for i, s in enumerate(self.slots) if s.state == "ready" and not s.solo and (s.load == 0 or not solo)]
        return min(free, key=lambda i: self.slots[i].load, default=None)

    @staticmethod
    def _stale(b: _Batch) -> bool:
        return b.attempt != b.scene.attempt or b.scene.error is not None or b.scene.closed

    def _next_batch(self) -> _Batch | None:
        """The next new tiles to send, all of one scene; opens scenes on their writers as they start."""
        size = 1 if self.first_batch else self.config.runtime.batch_size  # the first tile comes back soon
        while True:
            scene = self.current
            if scene is None or scene.error or scene.closed:
                if not self.pending:
                    self.current = None
                    return None
                self.current = self.pending.pop()
                continue
            if scene.writer is None and not self._open(scene):
                continue
            tiles = list(itertools.islice(scene.tiles, size))
            if tiles:
                self.first_batch = False
                scene.sent += len(tiles)
                return _Batch(scene, tiles, scene.attempt)
            self.current = None

    def _open(self, scene: _Scene) -> bool:
        alive = [w for w, ok in enumerate(self.writer_alive) if ok]
        if not alive:
            self._fail(scene, f"{scene.info.path}: no scene writer is left (their nodes are gone)")
            return False
        w = min(alive, key=lambda i: (self.writer_load[i], self.writer_uses[i]))
        self.writer_load[w] += 1
        self.writer_uses[w] += 1
        scene.writer, scene.writer_actor = w, self.writers[w]
        info = scene.info
        if scene.scale is None:
            # Computed once per scene (a few projected points, whatever its size): the writer gets
            # the whole scale, the post-processing tasks the recipe of their tiles' pixel areas.
            scene.scale = ground_scale(info.crs_wkt, info.transform, info.width, info.height)
            scene.pixel_areas = ray.put(scene.scale.pixel_areas)
        scene.open_blend()
        scene.blend_ref = None if scene.blend is None else ray.put(scene.blend)
        resume = self._resumable(scene)
        scene.opened = scene.writer_actor.open.remote(scene.index, info, self.stamp, scene.scale, resume)
        return True

    def _resumable(self, scene: _Scene) -> list[int]:
        """Tiles of ``scene`` checkpointed by a killed run (or by this run's writer that died):
        its new writer replays them, and they are not sent again (``geoseg.checkpoint``)."""
        stamp = checkpoint_stamp(scene.info.path, scene.info.fingerprint, self.stamp["config"], scene.n_tiles)
        done = finished_tiles(self.store.staging_path(scene.info.folder), stamp)
        if len(done) >= scene.n_tiles:
            done = done[:-1]  # one tile still flows: its acknowledgement is what finishes the scene
        if done:
            skip = set(done)
            scene.tiles = (t for t in scene.tiles if t.index not in skip)
            scene.sent += len(done)
            scene.acked += len(done)
            self.bar.update(len(done))
            log.info("%s: %d of %d tiles taken from checkpoints", scene.info.path, len(done), scene.n_tiles)
        return done

    def _send(self, b: _Batch, i: int) -> None:
        slot, scene = self.slots[i], b.scene
        slot.load += 1
        slot.solo = b.solo
        b.slot, b.actor, b.writer = i, slot.actor, scene.writer_actor
        reads = self.read.remote(scene.info.raster, b.tiles, self.config.bands_needed, self.env_ref)
        preds = slot.actor.predict.remote(reads, scene.blend_ref)
        results = self.post.remote(preds, self.config_ref, scene.pixel_areas, scene.grid_shape)
        ack = scene.writer_actor.add.remote(scene.index, results, scene.opened)
        self.acks[ack] = b
        scene.in_flight += len(b.tiles)
        self.tiles_in_flight += len(b.tiles)

    # -- results

    def _on_ack(self, ref: Any) -> None:
        b = self.acks.pop(ref)
        scene, n = b.scene, len(b.tiles)
        slot = self.slots[b.slot]
        if slot.actor is b.actor:  # (not a replacement, which starts empty)
            slot.load -= 1
            slot.solo = slot.solo and not b.solo
        self.tiles_in_flight -= n
        current = b.attempt == scene.attempt
        if current:
            scene.in_flight -= n
        try:
            acks: list[TileAck] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            kind, cause = self._on_death(exc, b.writer)
            if b.attempt == scene.attempt and not scene.closed:  # (a writer death redoes its scenes)
                self._retry_or_fail(b, kind, cause)
            self._settle(scene)
            return
        if not current:
            return
        pixels = sum(ack.core_pixels for ack in acks)
        for ack in acks:
            if ack.status == "error" and not scene.error:
                scene.error = plain_line(ack.error or f"{scene.info.path}: unknown error")
        scene.acked += n
        scene.pixels += pixels
        self.done_px += pixels
        self.report.progress.append((time.time(), pixels))
        self.bar.update(n)
        self.bar.set_postfix_str(f"{self.done_px / 1e6 / max(time.time() - self.report.started_unix, 1e-9):.2f} Mpx/s",
                                 refresh=False)
        if scene.error:
            self._settle(scene)
        elif scene.acked == scene.n_tiles:
            scene.finishing = True
            self.finishing[scene.writer_actor.finish.remote(scene.index)] = (scene, scene.attempt, scene.writer_actor)

    def _retry_or_fail(self, b: _Batch, kind: str, cause: BaseException) -> None:
        """A batch failed for ``kind`` (see ``_on_death``): send it again, or fail its scene."""
        scene = b.scene
        if scene.error:
            return
        where = f"{scene.info.path}: {tiles_where(b.tiles)}"
        if kind == "model":
            b.deaths += 1
            if b.deaths >= POISON_DEATHS:
                self._fail(scene, f"{where}: the model worker died {b.deaths} times on this "
                                  f"{'tile' if len(b.tiles) == 1 else 'batch'} ({death_detail(cause)})")
                return
            if b.deaths >= SUSPECT_DEATHS:  # one tile at a time, alone on an actor: only a tile that kills it fails
                self.retry.extend(_Batch(scene, [t], b.attempt, b.deaths, b.lost, solo=True) for t in b.tiles)
                return
        elif kind in ("lost", "writer"):  # (a writer's death redoes its scenes: not met here)
            b.lost += 1
            if b.lost >= LOST_TRIES:
                self._fail(scene, f"{where}: failed {b.lost} times ({one_line_error(cause)})")
                return
        else:
            msg = one_line_error(cause)
            self._fail(scene, msg if scene.info.path in msg else f"{where}: {msg}")
            return
        b.slot, b.actor, b.writer = -1, None, None
        self.retry.append(b)

    def _on_finished(self, ref: Any) -> None:
        scene, attempt, writer = self.finishing.pop(ref)
        try:
            summary = ray.get(ref)
        except ray.exceptions.RayError as exc:
            kind, cause = self._on_death(exc, writer)
            if scene.closed or attempt != scene.attempt:
                return
            scene.finishing = False
            if kind == "writer":
                self._redo(scene, cause)
                return
            msg = one_line_error(cause)
            self._fail(scene, msg if scene.info.path in msg else f"{scene.info.path}: {msg}")
            return
        scene.closed = True
        if scene.writer is not None and self.writers[scene.writer] is scene.writer_actor:
            self.writer_load[scene.writer] -= 1
        if self.current is scene:
            self.current = None
        self.report.summaries.append(summary)
        self.report.writer_nodes[scene.info.path] = ray.get(scene.opened)
        log.info("%s: done", scene.info.path)

    def _on_started(self, ref: Any) -> None:
        """A replacement model actor built its models, or died trying; or one that had stopped
        answering answers again, or is dead."""
        i, actor, probe = self.starting.pop(ref)
        slot = self.slots[i]
        if slot.actor is not actor:  # replaced meantime
            return
        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:
            actor_id = actor_hex(actor)
            if probe:  # dead (or still not answering: given up, killed, replaced)
                if actor_id not in self.dead:
                    self.dead.add(actor_id)
                    ray.kill(slot.actor)
                    self._model_died(i, ray_cause(exc))
                return
            self.dead.add(actor_id)
            slot.start_failures += 1
            why = why_died(exc)
            if slot.start_failures >= ACTOR_START_TRIES:
                slot.state = "gone"
                self.no_actor = f"the model actor could not be started again ({slot.start_failures} tries; last: {why})"
                log.warning("%s", self.no_actor)
            else:
                log.warning("a new model actor did not start (%s); starting another", why)
                self._replace_model(i)
            return
        slot.state, slot.start_failures = "ready", 0

    # -- deaths

    def _on_death(self, exc: BaseException, writer: Any = None) -> tuple[str, BaseException]:
        """What failed a call, and its error under Ray's wrapping: "model" or "writer" (that actor
        died: replaced, and a writer's scenes redone, once per death), "lost" (another system failure,
        or a model actor that stopped answering and is probed: try again), "task" (a read or
        post-processing worker died, after Ray's retries) or "error" (the code raised). ``writer``:
        the writer the call went through (an actor that cannot be placed is not named in the error;
        a model actor gets calls only once it answered, so that is the writer)."""
        cause = ray_cause(exc)
        actor_id = None
        if isinstance(cause, ray.exceptions.RayActorError):  # died, or stopped answering
            actor_id = cause.actor_id or ""
        elif isinstance(cause, ray.exceptions.ActorUnschedulableError) and writer is not None:
            actor_id = actor_hex(writer)
        if actor_id is not None:
            role = self.roles.get(actor_id)
            if role is None or actor_id in self.dead:
                return (role[0] if role else "lost"), cause
            died = isinstance(cause, ray.exceptions.ActorDiedError)
            if role[0] == "writer":
                # A writer call that may or may not have run cannot be sent again (a tile placed
                # twice): a writer that stopped answering counts as dead, and is made so.
                self.dead.add(actor_id)
                if not died:
                    ray.kill(self.writers[role[1]])
                self._writer_died(role[1], cause)
                return "writer", cause
            if died:
                self.dead.add(actor_id)
                self._model_died(role[1], cause)
                return "model", cause
            # A model actor that stopped answering gets no batch until it answers or is found dead.
            slot = self.slots[role[1]]
            if slot.state == "ready":
                slot.state = "starting"
                self.starting[slot.actor.ready.remote()] = (role[1], slot.actor, True)
            return "lost", cause
        if isinstance(cause, (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError)):
            return "task", cause
        if isinstance(cause, (ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError,
                              ray.exceptions.ObjectFetchTimedOutError, ray.exceptions.RaySystemError,
                              ray.exceptions.LocalRayletDiedError)):
            return "lost", cause
        return "error", cause

    def _model_died(self, i: int, cause: BaseException) -> None:
        log.warning("a model actor died (%s); the batches it had are sent again", death_detail(cause))
        self._replace_model(i)

    def _replace_model(self, i: int) -> None:
        """Start a replacement in slot ``i``: on its node, or, for a GPU actor, while the cluster
        has a GPU for it; none when that is gone and other actors remain (they take its batches)."""
        slot = self.slots[i]
        slot.load, slot.solo = 0, False
        start = getattr(self.actors, "start", None)
        others = [s for s in self.slots if s is not slot and s.state != "gone"]
        alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
        node, place = slot.node, start is not None
        if place and node is not None and node not in alive:
            if others:
                place = False
            else:  # the last actor: on the largest node left
                nodes = cpu_nodes()
                place, node = bool(nodes), nodes[0][0] if nodes else None
        elif place and node is None and others:
            place = len(others) < sum(n["Resources"].get("GPU", 0) for n in alive.values())
        if not place:
            slot.state = "gone"
            log.warning("its node is gone: the %d other model actor(s) go on without it", len(others))
            return
        slot.actor, slot.node, slot.state = start(node), node, "starting"
        self.actors[i] = slot.actor
        self.roles[actor_hex(slot.actor)] = ("model", i)
        self.starting[slot.actor.ready.remote()] = (i, slot.actor, False)

    def _writer_died(self, w: int, cause: BaseException) -> None:
        """Writer ``w`` died or stopped answering. Where that may be its node's end, the other
        writers on that node are taken for dead too (and made so): a scene redone must not land there."""
        node_gone = not isinstance(cause, ray.exceptions.ActorDiedError) or "node has died" in str(cause)
        where = self._writer_node(w)
        self._drop_writer(w, cause, node_gone)
        for v, alive in enumerate(self.writer_alive):
            if node_gone and alive and where is not None and self._writer_node(v) == where:
                self.dead.add(actor_hex(self.writers[v]))
                ray.kill(self.writers[v])
                self._drop_writer(v, cause, node_gone)

    def _writer_node(self, w: int) -> str | None:
        """The node writer ``w`` runs on, once it has said so (else the node it was asked onto)."""
        ready, _ = ray.wait([self.writer_where[w]], timeout=0)
        try:
            return ray.get(ready[0]) if ready else self.writer_nodes[w]
        except ray.exceptions.RayError:
            return self.writer_nodes[w]

    def _drop_writer(self, w: int, cause: BaseException, node_gone: bool) -> None:
        """Redo the scenes writer ``w`` was assembling (except one it was publishing: its finish
        call says how that went). A replacement starts on its node when only its process died
        there; where the node is gone, or may be, the other writers take its scenes (a writer starts
        anywhere if none is left)."""
        scenes = [s for s in self.scenes if s.writer == w and s.writer_actor is self.writers[w]
                  and not (s.closed or s.error or s.finishing)]
        log.warning("a scene writer died (%s); %d scene(s) it was assembling are redone on another writer",
                    death_detail(cause), len(scenes))
        node = self._writer_node(w)
        self.writer_alive[w] = False
        self.writer_load[w] = 0
        start = getattr(self.writers, "start", None)
        node_ok = not node_gone and node in {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        if start is not None and (node_ok or not any(self.writer_alive)):
            node = node if node_ok else None
            self.writers[w] = start(node)
            self.writer_nodes[w], self.writer_alive[w] = node, True
            self.writer_where[w] = self.writers[w].node.remote()
            self.roles[actor_hex(self.writers[w])] = ("writer", w)
        for scene in scenes:
            self._redo(scene, cause)

    def _redo(self, scene: _Scene, cause: BaseException) -> None:
        """Start a scene whose writer died again from its first tile, or fail it after
        ``SCENE_ATTEMPTS``; the batches it still has in flight no longer count."""
        self.done_px -= scene.pixels
        self.bar.update(-scene.acked)
        if scene.attempt >= SCENE_ATTEMPTS:
            scene.attempt += 1
            scene.in_flight = 0
            self._fail(scene, f"{scene.info.path}: its scene writer died {scene.attempt - 1} times "
                              f"({death_detail(cause)})")
            return
        log.info("%s: its writer died; redone from its first tile", scene.info.path)
        scene.reset()
        if scene is not self.current and scene not in self.pending:
            self.pending.append(scene)  # next

    # -- failures

    def _fail(self, scene: _Scene, error: str) -> None:
        if scene.error is None:
            scene.error = plain_line(error)
        self._settle(scene)

    def _fail_unfinished(self, why: str) -> None:
        """No model actor is left: every scene that still needs one fails."""
        self.retry.clear()
        for scene in self.scenes:
            if not (scene.closed or scene.error or scene.finishing):
                self._fail(scene, f"{scene.info.path}: {why}")

    def _settle(self, scene: _Scene) -> None:
        """Report a failed scene once none of its batches is in flight, and drop what it wrote."""
        if scene.closed or scene.error is None or scene.in_flight:
            return
        scene.closed = True
        if self.current is scene:
            self.current = None
        w = scene.writer
        if w is not None and self.writers[w] is scene.writer_actor and self.writer_alive[w]:
            self.writer_load[w] -= 1
            self.aborting.append(scene.writer_actor.abort.remote(scene.index))
        elif w is not None or scene.attempt > 1:
            self._discard(scene)
        log.info("%s", scene.error)
        self.report.failures.append((scene.info.path, scene.error))

    def _discard(self, scene: _Scene) -> None:
        """Drop the partial files a dead writer left of ``scene``: another writer opens the scene
        (which clears its staging folder, wherever the outputs are named) and aborts it."""
        alive = [w for w, ok in enumerate(self.writer_alive) if ok]
        if not alive or scene.scale is None:
            log.warning("%s: its writer died; partial files may be left", scene.info.path)
            return
        writer = self.writers[alive[0]]
        opened = writer.open.remote(scene.index, scene.info, self.stamp, scene.scale)
        self.aborting.append(writer.abort.remote(scene.index, opened))


def tiles_where(tiles: list[Tile]) -> str:
    """``tile 7 (window col_off=256 row_off=512 width=256 height=256)``: the tiles' core window."""
    c0 = min(int(t.core.col_off) for t in tiles)
    r0 = min(int(t.core.row_off) for t in tiles)
    c1 = max(int(t.core.col_off + t.core.width) for t in tiles)
    r1 = max(int(t.core.row_off + t.core.height) for t in tiles)
    names = f"tile {tiles[0].index}" if len(tiles) == 1 else f"tiles {', '.join(str(t.index) for t in tiles)}"
    return f"{names} (window col_off={c0} row_off={r0} width={c1 - c0} height={r1 - r0})"
