"""The Ray a run uses, and what it leaves behind on a laptop.

A run joins a Ray that is already up (a cluster, a notebook's, one an earlier run started) and
leaves it as it is. Otherwise it connects to ``--address``/``RAY_ADDRESS``, or starts a local Ray,
which stays up for the next run in the same process and is shut down when the process exits
(stopping a local Ray takes about 1.5 s: a command pays it once, at its end, not inside ``run``).
A local Ray started here is marked as geoseg's, and its session folder (logs, sockets, spilled
objects: Ray never deletes them) is removed at that exit. A run killed with SIGKILL cannot
clean up: two Ray agents outlive it for a while and its session folder stays, so each new run
first sweeps the sessions of geoseg runs whose driver is gone (their leftover processes are ended,
their folders removed). Sessions of clusters started with ``ray start`` are never touched.
Set ``GEOSEG_KEEP_RAY_SESSION=1`` to keep the session folder for debugging.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Iterator

import ray

from geoseg.lock import process_alive

log = logging.getLogger("geoseg")
# A local Ray caps its object store: tile batches in flight need little, and the store's pages
# count in every process that maps them.
LOCAL_OBJECT_STORE_BYTES = 1024**3
MARKER = "geoseg-driver.pid"  # in a session folder: the local Ray was started by this geoseg run


def ensure_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; reuse one already up."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        # "local": a new Ray of our own, even where `ray start` runs one on this machine (whose
        # address needs --address or RAY_ADDRESS): its session folder is then ours to remove.
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING, object_store_memory=LOCAL_OBJECT_STORE_BYTES)


@contextlib.contextmanager
def ray_for_run(address: str | None) -> Iterator[None]:
    """Ray for one run (see the module docstring)."""
    if ray.is_initialized():
        yield
        return
    local = not (address or os.environ.get("RAY_ADDRESS"))
    ensure_ray(address)
    session = _session_dir() if local else None
    if session is not None:
        with contextlib.suppress(OSError):
            (session / MARKER).write_text(str(os.getpid()))
        sweep_stale_sessions(session.parent)
    # Registered after ray.init, so it runs before Ray's own exit hook (last in, first out).
    atexit.register(_shut_down, session)
    yield


def _shut_down(session: Path | None) -> None:
    """At exit: stop the Ray this process started or joined, then remove a local session folder."""
    ray.shutdown()
    if session is not None and not os.environ.get("GEOSEG_KEEP_RAY_SESSION"):
        remove_session(session)


def _session_dir() -> Path | None:
    try:
        return Path(ray._private.worker._global_node.get_session_dir_path())  # no public API names it
    except AttributeError:
        return None


def remove_session(session: Path) -> None:
    latest = session.parent / "session_latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() and Path(os.path.realpath(latest)) == session.resolve():
            latest.unlink()
    shutil.rmtree(session, ignore_errors=True)


def _holders(folder: Path) -> list[int]:
    """Processes with a file open under ``folder`` (Linux /proc; none found elsewhere)."""
    prefix = str(folder.resolve()) + os.sep
    pids = []
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(f"/proc/{entry.name}/fd/{fd}").startswith(prefix)
                   for fd in os.listdir(f"/proc/{entry.name}/fd")):
                pids.append(int(entry.name))
    return pids


def sweep_stale_sessions(root: Path) -> list[Path]:
    """End what runs killed earlier left in Ray's temp folder ``root``: for each session folder
    marked as geoseg's whose driver is gone, stop the processes still holding files in it, then
    remove it. Returns the folders."""
    swept = []
    for session in root.iterdir():
        if not re.match(r"session_\d", session.name) or session.is_symlink():
            continue
        try:
            driver = int((session / MARKER).read_text().strip())
        except (OSError, ValueError):
            continue  # not started by a geoseg run (e.g. `ray start`): not ours to touch
        if process_alive(driver):
            continue
        for pid in _holders(session):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        remove_session(session)
        log.info("removed the Ray session %s left by a killed geoseg run (pid %d)", session, driver)
        swept.append(session)
    return swept
