"""One run at a time per output folder: a lock file that names its holder.

``out/.geoseg.lock`` is created exclusively (``O_CREAT | O_EXCL``) and holds the host, pid and
start time of the run that writes there. A second run refuses with a one-line message naming
them. A lock whose holder is gone (same host, no such process) is taken over, so a run killed
with SIGKILL does not block the next night's. Object storage has no exclusive create that every
S3-compatible server honours, so ``s3://`` outputs are not locked.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from geoseg.core.errors import OutputError

LOCK_NAME = ".geoseg.lock"
STARTING_S = 10.0  # an unreadable lock younger than this belongs to a run that is starting


def process_alive(pid: int) -> bool:
    """True while process ``pid`` exists on this host (someone else's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """Context manager holding ``<out>/.geoseg.lock`` for the duration of a run."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.held = False

    def __enter__(self) -> RunLock:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):  # the second try follows taking over a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None and self._age() < STARTING_S:  # being written by a run starting now
                    holder = {"host": "?", "pid": "?", "started": "just now"}
                if holder is not None and not self._stale(holder):
                    raise OutputError(
                        str(self.path.parent),
                        (
                            f"another geoseg run is writing here (host {holder.get('host')}, pid {holder.get('pid')}, "
                            f"started {holder.get('started')}); wait for it, or remove {self.path} if that run is gone"
                        ),
                    ) from None
                self.path.unlink(missing_ok=True)  # its holder died: take it over
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise OutputError(str(self.path.parent), f"could not take the run lock {self.path}")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict[str, object] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable or half-written: treated as stale

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return float("inf")

    @staticmethod
    def _stale(holder: dict[str, object]) -> bool:
        pid = holder.get("pid")
        return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not process_alive(pid)
