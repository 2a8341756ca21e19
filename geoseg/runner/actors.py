"""The run's Ray actors: model actors (one per GPU, or one per CPU node sized by that node) and
scene writers (one per node), started side by side, each kind in a pool the scheduler can refill."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from geoseg.core.config import Config
from geoseg.core.errors import GeosegError
from geoseg.core.storage import OutputStore
from geoseg.core.units import GroundScale
from geoseg.raster.read import SceneInfo
from geoseg.runner.ray_errors import ray_cause, why_died
from geoseg.runner.workers import PredictorWorker, TileAck

WRITER_THREADS = 4  # concurrent calls per writer: scenes on one writer are assembled side by side


class WriterActor:
    """Ray actor around ``geoseg.runner.writer.SceneWriter`` (imported in the actor: the driver never
    loads the writing stack)."""

    def __init__(self, config: Config, store: OutputStore, env: dict[str, str]) -> None:
        from geoseg.runner.writer import SceneWriter

        self.writer = SceneWriter(config, store, env, node=ray.get_runtime_context().get_node_id())

    def open(
        self,
        index: int,
        info: SceneInfo,
        stamp: dict[str, str],
        scale: GroundScale,
        resume_tiles: list[int] | None = None,
    ) -> str:
        return self.writer.open(index, info, stamp, scale, resume_tiles)

    def add(self, index: int, results: list[Any], opened: Any = None) -> list[TileAck]:
        return self.writer.add(index, results, opened)

    def finish(self, index: int) -> dict[str, Any]:
        return self.writer.finish(index)

    def node(self) -> str:
        """The node it runs on (soft affinity may have put it elsewhere than asked)."""
        return self.writer.node

    def abort(self, index: int, after: Any = None) -> None:
        del after  # a ref this call waits for (the open() of a scene opened only to be dropped)
        self.writer.abort(index)


def cpu_nodes() -> list[tuple[str, float]]:
    """(node id, CPUs) of the alive nodes that have CPUs, largest first."""
    nodes = [(n["NodeID"], float(n["Resources"].get("CPU", 0))) for n in ray.nodes() if n.get("Alive")]
    return sorted([n for n in nodes if n[1] >= 1], key=lambda n: -n[1])


def task_cpus() -> float:
    """CPUs of a read or post-processing task: one, or half where a node has a single CPU (its
    model actor holds the other half). One per task keeps a 2-core laptop at one task worker."""
    return 1.0 if all(cpus >= 2 for _, cpus in cpu_nodes()) else 0.5


class ActorPool(list):
    """The run's actors of one kind: a list (the run kills every actor in it at the end), with
    where each was placed (``nodes``: a node id, or None where Ray placed it, on any GPU) and
    ``start(node)``, which starts one more the same way. The scheduler puts a replacement in the
    place of an actor that died, so the run's clean-up kills it too."""

    def __init__(self, start: Callable[[str | None], Any]) -> None:
        super().__init__()
        self.start = start
        self.nodes: list[str | None] = []

    def add(self, node: str | None) -> None:
        self.append(self.start(node))
        self.nodes.append(node)


def start_model_actors(config: Config) -> list[Any]:
    """One model actor per GPU; without GPUs, one per node, sized by that node's CPUs.

    A CPU actor reserves all of its node's cores but one (half a core on a one-core node) so that
    reading and post-processing go on beside it, and runs torch on every core of its node: the
    model gets the cores while the CPU stages overlap it. Sizing by one node (never by the
    cluster's total) keeps an actor schedulable on a cluster of small nodes.

    Ray neither restarts a model actor nor retries its calls (``max_restarts=0``): the driver does
    both, without limit over a run (preemptions add up over a night), because it knows what each
    call was for (see ``Scheduler``): it replaces the actor on its node (on no other node: each
    has its actor already), sends the batches it had again, and isolates a batch that kills it.
    """
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus and config.runtime.device != "cpu":
        pool = ActorPool(lambda node: model_actor(config, None))
        for _ in range(config.runtime.num_actors or gpus):
            pool.add(None)
        return pool
    nodes = cpu_nodes()
    if not nodes:
        raise GeosegError("the Ray cluster has no node with a CPU to run the models on")
    pool = ActorPool(lambda node: model_actor(config, node))
    for node_id, _ in itertools.islice(itertools.cycle(nodes), config.runtime.num_actors or len(nodes)):
        pool.add(node_id)
    return pool


def model_actor(config: Config, node: str | None) -> Any:
    """A model actor on a GPU (``node`` None), or pinned to CPU node ``node`` and sized by its CPUs.
    Pinned hard: a replacement aimed at a node that has just gone fails at once (unschedulable)
    rather than crowding a node that runs an actor already."""
    cls = ray.remote(max_restarts=0, max_task_retries=0)(PredictorWorker)
    if node is None:
        # Two calls at once: one batch is padded and copied while the other runs on the GPU.
        return cls.options(num_gpus=1, num_cpus=1, max_concurrency=2).remote(config, 1)
    cpus = dict(cpu_nodes()).get(node, 1.0)
    reserve = cpus - 1 if cpus >= 2 else 0.5
    return cls.options(num_cpus=reserve, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
        config, max(1, int(cpus))
    )


def start_writers(config: Config, store: OutputStore, env: dict[str, str]) -> list[Any]:
    """Scene writers, one per node, so scenes are assembled all over the cluster.

    They reserve no CPU: their work is mostly compressed window writes, in GDAL threads. Placement
    is by node affinity, hard (Ray's SPREAD put every zero-CPU writer on one node here, and soft
    affinity, just after the cluster started, often several on one node). A writer that dies, or
    cannot be placed, takes its scenes' partial state with it: the scheduler redoes those scenes on
    another writer, and starts a replacement where the node is still there.
    """
    cls = ray.remote(WriterActor)

    def start(node: str | None) -> Any:
        placement = {} if node is None else {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
        return cls.options(num_cpus=0, max_concurrency=WRITER_THREADS, **placement).remote(config, store, env)

    pool = ActorPool(start)
    for node in [n["NodeID"] for n in ray.nodes() if n.get("Alive")]:
        pool.add(node)
    return pool


def wait_ready(actors: list[Any]) -> str:
    """Wait until every model actor has built and checked its models; raise the first model error,
    or one line naming the cause when an actor died while starting (not retried: building the
    models again would crash again)."""
    try:
        devices = ray.get([a.ready.remote() for a in actors])
    except ray.exceptions.RayError as exc:
        cause = ray_cause(exc)
        if isinstance(cause, GeosegError):
            raise cause from None
        raise GeosegError(f"the model actor could not start: {why_died(exc)}") from None
    return ",".join(sorted(set(devices)))
