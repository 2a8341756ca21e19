"""Run ``geoseg.runner.pipeline.run`` on a multi-node Ray cluster started on this machine.

``python tests/helpers/cluster_run.py [--remove-node-mid-run] CONFIG OVERRIDES_JSON OUT REPORT_JSON INPUT...``: a head
with no CPU and two one-CPU worker nodes (``ray.cluster_utils.Cluster``, all on 127.0.0.1), in a process of its own
because a process holds one Ray connection and the test session already has a local Ray.

``--remove-node-mid-run``: a thread watches the run and kills a worker node (SIGKILL to all its processes) once a
scene is published and a scene writer on that node holds another scene's partial files open, so the node takes a
model actor with calls in flight, a writer with a scene half assembled, and the tasks and objects it held. The
report then says which node went and when (``removed``); ``log`` has the pipeline's messages either way.

The cluster is shut down whatever happens, also when the run hangs (a watchdog, so that no raylet outlives it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

WATCHDOG_S = 300  # the run is stopped (and the cluster shut down) after this long


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode(errors="replace")


def _children(parent: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if _ppid(int(entry)) == parent:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass  # gone meanwhile
    return out


def _assembling(node: Any, out: str) -> bool:
    """Whether a scene writer on ``node`` (a worker process of its raylet) is assembling a scene in
    ``out``: it holds every mask of the scene's staging folder open (``*.raw.tif``: publishing, which
    closes them one by one, has not begun)."""
    raylet = node.all_processes["raylet"][0].process.pid
    for pid in _children(raylet):
        try:
            if not _cmdline(pid).startswith("ray::WriterActor"):
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        open_masks: dict[str, set[str]] = {}
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(out) and ".partial/" in target and target.endswith(".raw.tif"):
                folder, name = target.rsplit("/", 1)
                open_masks.setdefault(folder, set()).add(name)
        for folder, names in open_masks.items():
            try:
                if names == {p.name for p in Path(folder).glob("*.raw.tif")}:
                    return True
            except OSError:
                continue
    return False


def _published(out: str) -> int:
    """Scenes published in ``out`` (their manifest.json, outside the hidden staging folders)."""
    root = Path(out)
    return sum(
        1 for p in root.rglob("manifest.json") if not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _remove_mid_run(cluster: Any, out: str, total: int, removed: dict[str, Any], done: threading.Event) -> None:
    out = os.path.realpath(out)
    while not done.is_set():
        try:
            published = _published(out) if os.path.isdir(out) else 0
        except OSError:  # a folder moved under the walk: look again
            continue
        if 1 <= published < total:
            for node in list(cluster.worker_nodes):
                if _assembling(node, out):
                    removed.update(node=node.node_id, published_before=published, at=time.time())
                    # The raylet and its workers at once, as when a machine goes (a worker whose raylet
                    # is gone goes on serving direct calls for a while otherwise), then the rest.
                    raylet = node.all_processes["raylet"][0].process.pid
                    for pid in [raylet, *_children(raylet)]:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    cluster.remove_node(node, allow_graceful=False)
                    removed["removed_in_s"] = round(time.time() - removed["at"], 2)
                    return
        time.sleep(0.01)


def main() -> None:
    args = sys.argv[1:]
    remove = args[0] == "--remove-node-mid-run"
    config_path, overrides, out, report_path, *inputs = args[1:] if remove else args
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    from geoseg.core.config import load_config
    from geoseg.runner.pipeline import run

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.levelname} {record.getMessage()}")

    logger = logging.getLogger("geoseg")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())

    store = 150 * 1024**2
    # A killed node is found dead after a few missed health checks (by default about 15 s).
    system = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 4}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": store,
            "include_dashboard": False,
            "_system_config": system,
        },
    )
    stopped = threading.Event()

    def watchdog() -> None:
        if not stopped.wait(WATCHDOG_S):
            print(f"cluster_run: no result after {WATCHDOG_S} s, stopping", file=sys.stderr, flush=True)
            cluster.shutdown()
            os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=store)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        removed: dict[str, Any] = {}
        done = threading.Event()
        if remove:
            threading.Thread(
                target=_remove_mid_run, args=(cluster, out, len(inputs), removed, done), daemon=True
            ).start()
        started = time.time()
        try:
            report = run(inputs, out, load_config(config_path, json.loads(overrides)), progress=False)
        finally:
            done.set()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        if removed:
            removed["after_start_s"] = round(removed.pop("at") - started, 2)
        with open(report_path, "w") as fh:
            json.dump(
                {
                    "ok": report.ok,
                    "failures": report.failures,
                    "writer_nodes": report.writer_nodes,
                    "nodes": nodes,
                    "removed": removed or None,
                    "seconds": round(time.time() - started, 2),
                    "log": messages,
                },
                fh,
            )
    finally:
        ray.shutdown()
        cluster.shutdown()
        stopped.set()


if __name__ == "__main__":
    main()
