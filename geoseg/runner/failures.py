"""What a run does when something dies: the failure policy of the scheduler, readable apart from
its flow of batches (``geoseg.runner.scheduler``).

A model actor that dies is replaced (on its node; on none when the node is gone and other actors
remain) and the batches it had are sent again. A batch that was in flight at two deaths is split
into its tiles, each run alone on an actor: a tile that kills its actor a third time fails its
scene with a line naming the tile window (a poison input), and the other scenes go on. A writer
that dies takes its scenes' partial files with it: they are redone from their first tile on another
writer (``SCENE_ATTEMPTS``), and the partial files dropped. Data lost with a node is computed again
(``LOST_TRIES``). A scene that fails is reported once none of its batches is in flight."""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

import ray

from geoseg.raster.grid import Tile
from geoseg.runner.actors import cpu_nodes
from geoseg.runner.ray_errors import actor_hex, death_detail, one_line_error, plain_line, ray_cause, why_died
from geoseg.runner.state import Batch, Scene, Slot

if TYPE_CHECKING:
    from tqdm import tqdm

    from geoseg.runner.run_report import RunReport

log = logging.getLogger("geoseg")

# What the scheduler survives (besides Ray's own retries of read and post-processing tasks whose
# worker died, 3 by default):
SUSPECT_DEATHS = 2  # a batch in flight at this many model actor deaths is retried tile by tile, each alone
POISON_DEATHS = 3  # a tile that kills its model actor this many times fails its scene (a poison input)
LOST_TRIES = 3  # a batch whose data was lost with a node (or another system failure) is tried this often
ACTOR_START_TRIES = 3  # a model actor that dies while starting this many times in a row is not replaced again
SCENE_ATTEMPTS = 2  # a scene whose writer died is redone from its first tile on another writer, attempts in all


class FailurePolicy:
    """The scheduler's answers to deaths and errors. A mix-in of ``Scheduler``: it reads and changes
    the run's state declared below, which the scheduler owns and its flow of batches fills in."""

    actors: Any  # the run's model actor pool (a replacement takes the place of the actor it replaces)
    writers: Any  # the run's writer pool
    slots: list[Slot]
    scenes: list[Scene]
    pending: list[Scene]
    current: Scene | None
    retry: collections.deque[Batch]
    roles: dict[str, tuple[str, int]]
    dead: set[str]
    starting: dict[Any, tuple[int, Any, bool]]
    aborting: list[Any]
    writer_alive: list[bool]
    writer_load: list[int]
    writer_nodes: list[str | None]
    writer_where: list[Any]
    stamp: dict[str, str]
    report: RunReport
    bar: tqdm
    done_px: int
    no_actor: str

    def _retry_or_fail(self, b: Batch, kind: str, cause: BaseException) -> None:
        """A batch failed for ``kind`` (see ``_on_death``): send it again, or fail its scene."""
        scene = b.scene
        if scene.error:
            return
        where = f"{scene.info.path}: {tiles_where(b.tiles)}"
        if kind == "model":
            b.deaths += 1
            if b.deaths >= POISON_DEATHS:
                self._fail(
                    scene,
                    f"{where}: the model worker died {b.deaths} times on this "
                    f"{'tile' if len(b.tiles) == 1 else 'batch'} ({death_detail(cause)})",
                )
                return
            if b.deaths >= SUSPECT_DEATHS:  # one tile at a time, alone on an actor: only a tile that kills it fails
                self.retry.extend(Batch(scene, [t], b.attempt, b.deaths, b.lost, solo=True) for t in b.tiles)
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
        if isinstance(
            cause,
            (
                ray.exceptions.ObjectLostError,
                ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectFetchTimedOutError,
                ray.exceptions.RaySystemError,
                ray.exceptions.LocalRayletDiedError,
            ),
        ):
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
        assert start is not None  # place is False without one
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
        scenes = [
            s
            for s in self.scenes
            if s.writer == w and s.writer_actor is self.writers[w] and not (s.closed or s.error or s.finishing)
        ]
        log.warning(
            "a scene writer died (%s); %d scene(s) it was assembling are redone on another writer",
            death_detail(cause),
            len(scenes),
        )
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

    def _redo(self, scene: Scene, cause: BaseException) -> None:
        """Start a scene whose writer died again from its first tile, or fail it after
        ``SCENE_ATTEMPTS``; the batches it still has in flight no longer count."""
        self.done_px -= scene.pixels
        self.bar.update(-scene.acked)
        if scene.attempt >= SCENE_ATTEMPTS:
            scene.attempt += 1
            scene.in_flight = 0
            self._fail(
                scene, f"{scene.info.path}: its scene writer died {scene.attempt - 1} times ({death_detail(cause)})"
            )
            return
        log.info("%s: its writer died; redone from its first tile", scene.info.path)
        scene.reset()
        if scene is not self.current and scene not in self.pending:
            self.pending.append(scene)  # next

    def _fail(self, scene: Scene, error: str) -> None:
        if scene.error is None:
            scene.error = plain_line(error)
        self._settle(scene)

    def _fail_unfinished(self, why: str) -> None:
        """No model actor is left: every scene that still needs one fails."""
        self.retry.clear()
        for scene in self.scenes:
            if not (scene.closed or scene.error or scene.finishing):
                self._fail(scene, f"{scene.info.path}: {why}")

    def _settle(self, scene: Scene) -> None:
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

    def _discard(self, scene: Scene) -> None:
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
