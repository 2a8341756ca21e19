"""The flow of one run: batches of tiles through read -> model -> post-processing -> the scene's
writer, bounded in flight, scenes opened on writers as they start and published as they finish.
The driver's part of ``geoseg.runner.pipeline``; it passes object refs and receives small
acknowledgements. What it does when a worker, an actor or a node dies is ``geoseg.runner.failures``."""

from __future__ import annotations

import collections
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import ray
from tqdm import tqdm

from geoseg.core.checkpoint import checkpoint_stamp, finished_tiles
from geoseg.core.config import Config
from geoseg.core.storage import OutputStore
from geoseg.core.units import ground_scale
from geoseg.raster.read import SceneInfo
from geoseg.runner.actors import task_cpus
from geoseg.runner.failures import FailurePolicy
from geoseg.runner.ray_errors import actor_hex, one_line_error, plain_line
from geoseg.runner.state import Batch, Scene, Slot
from geoseg.runner.workers import TileAck, postprocess_batches, read_batches

if TYPE_CHECKING:
    from geoseg.runner.run_report import RunReport

log = logging.getLogger("geoseg")
# Batches a scene may have between the model actor and its writer (post-processing, writing),
# beyond those queued at the actors: enough for the CPU stages to overlap the model.
EXTRA_BATCHES_IN_FLIGHT = 2


class Scheduler(FailurePolicy):
    """The scheduling loop of one run (see the module docstring); its answers to deaths and errors
    are those of ``FailurePolicy``."""

    def __init__(
        self,
        scenes: list[SceneInfo],
        config: Config,
        env: dict[str, str],
        actors: list[Any],
        writers: list[Any],
        report: RunReport,
        progress: bool,
        store: OutputStore,
    ) -> None:
        self.config, self.report, self.store = config, report, store
        # The run's own lists (see ActorPool): a replacement takes the place of the actor it replaces.
        self.actors, self.writers = actors, writers
        self.slots = [Slot(a, node) for a, node in zip(actors, getattr(actors, "nodes", [None] * len(actors)))]
        self.writer_nodes: list[str | None] = list(getattr(writers, "nodes", [None] * len(writers)))
        self.writer_where = [w.node.remote() for w in writers]  # refs: the node each one runs on
        self.writer_alive = [True] * len(writers)
        self.roles: dict[str, tuple[str, int]] = {}  # actor id -> ("model", slot) or ("writer", index)
        for i, a in enumerate(actors):
            self.roles[actor_hex(a)] = ("model", i)
        for w, a in enumerate(writers):
            self.roles[actor_hex(a)] = ("writer", w)
        self.dead: set[str] = set()  # actor ids whose death was dealt with
        self.scenes = [Scene(i, info, config, report.run_id) for i, info in enumerate(scenes)]
        self.pending = list(reversed(self.scenes))  # pop() takes them in input order
        self.writer_load = [0] * len(self.writers)  # scenes open on each writer
        self.writer_uses = [0] * len(self.writers)  # scenes given to each writer: ties go round the pool
        cpus = task_cpus()
        self.read = ray.remote(num_cpus=cpus)(read_batches)
        self.post = ray.remote(num_cpus=cpus)(postprocess_batches)
        self.config_ref, self.env_ref = ray.put(config), ray.put(env)
        runtime = config.runtime
        self.per_actor = (runtime.batches_in_flight_per_actor + EXTRA_BATCHES_IN_FLIGHT) * runtime.batch_size
        # Recorded in each summary.json and STAC Item: device is where the models ran and their number
        # format ("cpu bf16"), which runtime.precision: auto picks by machine.
        self.stamp = {"config": report.config_id, "run": report.run_id, "device": report.device}
        self.current: Scene | None = None
        self.acks: dict[Any, Batch] = {}  # ack ref -> its batch
        self.retry: collections.deque[Batch] = collections.deque()  # batches to send again, first
        # ready() ref of a model actor starting (a replacement) or probed (it stopped answering):
        # (slot, actor, probe)
        self.starting: dict[Any, tuple[int, Any, bool]] = {}
        self.finishing: dict[Any, tuple[Scene, int, Any]] = {}  # finish ref -> (scene, attempt, writer)
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
                self._send([self.retry.popleft()], slot)
                continue
            slot = self._pick(False)
            if slot is None:
                return
            group = self._next_group()
            if not group:
                return
            self._send(group, slot)

    def _pick(self, solo: bool) -> int | None:
        """The least loaded ready model actor (an idle one for a batch that runs alone)."""
        free = [i for i, s in enumerate(self.slots) if s.state == "ready" and not s.solo and (s.load == 0 or not solo)]
        return min(free, key=lambda i: self.slots[i].load, default=None)

    @staticmethod
    def _stale(b: Batch) -> bool:
        return b.attempt != b.scene.attempt or b.scene.error is not None or b.scene.closed

    def _next_group(self) -> list[Batch]:
        """The next new tiles to send: a batch of ``runtime.batch_size`` tiles, or, where scenes end
        before it is full, batches of the following scenes too (many small scenes then go through
        one task and one model call: a call each would cost more than their pixels)."""
        room = 1 if self.first_batch else self.config.runtime.batch_size  # the first tile comes back soon
        group: list[Batch] = []
        while room > 0:
            nxt = self._next_batch(room)
            if nxt is None:
                break
            group.append(nxt)
            room -= len(nxt.tiles)
        return group

    def _next_batch(self, size: int) -> Batch | None:
        """Up to ``size`` new tiles of one scene; opens scenes on their writers as they start."""
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
                return Batch(scene, tiles, scene.attempt)
            self.current = None

    def _open(self, scene: Scene) -> bool:
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

    def _resumable(self, scene: Scene) -> list[int]:
        """Tiles of ``scene`` checkpointed by a killed run (or by this run's writer that died):
        its new writer replays them, and they are not sent again (``geoseg.core.checkpoint``)."""
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

    def _send(self, group: list[Batch], i: int) -> None:
        """Send batches (one, or one per scene of a group) to model actor ``i``: one read task, one
        actor call and one post-processing task for the group, then each batch to its writer."""
        slot, n = self.slots[i], len(group)
        slot.load += n
        slot.solo = group[0].solo  # (batches sent again, the only solo ones, go alone)
        for b in group:
            b.slot, b.actor, b.writer = i, slot.actor, b.scene.writer_actor
        scenes = [b.scene for b in group]
        reads = _refs(
            self.read.options(num_returns=n).remote(
                [(s.info.raster, b.tiles) for s, b in zip(scenes, group)], self.config.bands_needed, self.env_ref
            )
        )
        preds = _refs(slot.actor.predict_scenes.options(num_returns=n).remote(*reads, *[s.blend_ref for s in scenes]))
        results = _refs(
            self.post.options(num_returns=n).remote(
                self.config_ref, [s.grid_shape for s in scenes], *preds, *[s.pixel_areas for s in scenes]
            )
        )
        for b, scene, result in zip(group, scenes, results):
            ack = scene.writer_actor.add.remote(scene.index, result, scene.opened)
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
        self.bar.set_postfix_str(
            f"{self.done_px / 1e6 / max(time.time() - self.report.started_unix, 1e-9):.2f} Mpx/s", refresh=False
        )
        if scene.error:
            self._settle(scene)
        elif scene.acked == scene.n_tiles:
            scene.finishing = True
            self.finishing[scene.writer_actor.finish.remote(scene.index)] = (scene, scene.attempt, scene.writer_actor)

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


def _refs(returned: Any) -> list[Any]:
    """The object refs of a call with ``num_returns``: Ray gives one ref itself, several as a list."""
    return returned if isinstance(returned, list) else [returned]
