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

A local Ray started for a run leaves out three of its services that a batch run never uses: the
autoscaler monitor (one node, nothing to scale), the log monitor (worker logs are not streamed to
the driver) and the API server of the dashboard (job submission, the state API behind ``ray
list``). They are Python processes of 50-80 MiB each, and ``ray.init`` waits about a second for
the API server to come up. ``GEOSEG_KEEP_RAY_SERVICES=1`` starts them (e.g. to inspect a run with
``ray list actors``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from geoseg.runner.lock import process_alive

log = logging.getLogger("geoseg")
# A local Ray caps its object store: tile batches in flight need little, and the store's pages
# count in every process that maps them.
LOCAL_OBJECT_STORE_BYTES = 1024**3
MARKER = "geoseg-driver.pid"  # in a session folder: the local Ray was started by this geoseg run
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's switch for token authentication: token or disabled
KEEP_SERVICES_ENV = "GEOSEG_KEEP_RAY_SERVICES"
# The local Ray's services a batch run does not use (see the module): the methods of Ray's Node
# that start them. Skipped, the API server leaves the head node's dashboard URL None, as Ray's
# Node sets it before starting anything.
UNUSED_SERVICES = ("start_monitor", "start_log_monitor", "start_api_server")


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
        _token_auth_for_local_ray()
        with _jemalloc_in_workers(), _without_unused_services():
            ray.init(
                address="local",
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            )


@contextlib.contextmanager
def _without_unused_services() -> Iterator[None]:
    """While a local Ray starts, Ray's Node skips the services in ``UNUSED_SERVICES``.

    No public option of ``ray.init`` leaves them out (``ray start`` has ``--no-monitor`` and
    ``--include-log-monitor``, not the API server), and ending them once up, as geoseg did before,
    still paid for their start: on 2 cores ``ray.init`` took 2.6-3.6 s with them and 1.8 s without.
    A Ray whose Node lacks one of these methods starts it as usual.
    """
    node_class: Any = getattr(getattr(ray._private, "node", None), "Node", None)
    skipped = (
        {}
        if os.environ.get(KEEP_SERVICES_ENV) or node_class is None
        else {name: getattr(node_class, name) for name in UNUSED_SERVICES if hasattr(node_class, name)}
    )

    for name in skipped:
        setattr(node_class, name, _start_nothing)
    try:
        yield
    finally:
        for name, method in skipped.items():
            setattr(node_class, name, method)


def _start_nothing(node: Any, *args: Any, **kwargs: Any) -> None:
    """Stands in for a Node method in ``UNUSED_SERVICES`` while a local Ray starts."""
    del node, args, kwargs


@contextlib.contextmanager
def _jemalloc_in_workers() -> Iterator[None]:
    """Let the workers of the local Ray being started use the jemalloc that Ray ships (its raylet
    and GCS always do), unless ``RAY_LD_PRELOAD_ON_WORKERS`` says otherwise. glibc's malloc keeps
    freed blocks of the windows' arrays in fragmented heaps: on an 8192^2 raster the whole job
    peaked at 2,755 MiB with it and 2,488 MiB with jemalloc, no slower (the model actor keeps its
    freed pages: ``geoseg.runner.jemalloc``). The raylet reads the switch when it starts and passes
    it to the workers it starts; the driver's own environment is left as it was."""
    key = "RAY_LD_PRELOAD_ON_WORKERS"
    before = os.environ.get(key)
    if before is None:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)


def _token_auth_for_local_ray() -> None:
    """Ask for token authentication for a local Ray, unless ``RAY_AUTH_MODE`` says otherwise.

    With ``RAY_AUTH_MODE`` unset, Ray 2.60 turns token authentication on for a new local Ray by
    itself (writing ``~/.ray/auth_token`` if missing) and then warns, on every start, that it did.
    The protection is right (a local Ray listens on the machine's address: without a token anyone
    who reaches its ports can run code in it), the warning is noise: asking for token mode
    explicitly keeps the same protection and Ray says nothing. Ray reads the mode when it is
    imported, so setting the variable now is not enough: its own helper sets it and reloads Ray's
    config (what ``ray.init`` itself does, without the warning). A mode the user set (``token``, or
    ``disabled`` on a trusted machine) is kept, and clusters joined through an address are never
    touched: this runs only before starting a local Ray.
    """
    if os.environ.get(AUTH_MODE_ENV) is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # a Ray without token authentication: its defaults apply, nothing to say
        return
    _enable_token_auth()


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
    if session is not None:
        # The autoscaler monitor first (when GEOSEG_KEEP_RAY_SERVICES started it): ray.shutdown()
        # stops it after the GCS, and its SIGTERM handler then tries to report its end to the GCS
        # that is gone until Ray kills it a second later (1.0 of the 1.5 s that shutdown took here).
        _end_monitor()
    ray.shutdown()
    if session is not None and not os.environ.get("GEOSEG_KEEP_RAY_SESSION"):
        remove_session(session)


def _end_monitor() -> None:
    """End the autoscaler monitor of the local Ray this process started, if it runs."""
    node: Any = getattr(ray._private.worker, "_global_node", None)
    try:
        node.kill_monitor(check_alive=False)
    except Exception as exc:  # noqa: BLE001 (a Ray without the method: shutdown ends it, later)
        log.debug("could not end Ray's autoscaler monitor: %s", exc)


def _session_dir() -> Path | None:
    try:
        # Ray declares _global_node as None (its value before ray.init); no public API names the folder.
        node: Any = ray._private.worker._global_node
        return Path(node.get_session_dir_path())
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
            if any(
                os.readlink(f"/proc/{entry.name}/fd/{fd}").startswith(prefix)
                for fd in os.listdir(f"/proc/{entry.name}/fd")
            ):
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
