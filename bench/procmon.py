"""Memory of a process tree from /proc (Linux), without psutil.

``Monitor`` polls a child process (the driver) in a thread: its RSS, and the summed RSS and PSS
of its Ray worker processes (descendants whose command line starts with ``ray::``). RSS counts
shared pages (Ray's object store is shared memory) in every process that maps them, so the
worker RSS sum over-counts; PSS splits shared pages between their users and sums correctly.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_parts_kb(pid: int) -> dict[str, int]:
    """VmRSS split as the kernel counts it: RssAnon (private heap), RssFile (libraries), RssShmem (shared memory)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmRSS")


def hwm_kb(pid: int) -> int:
    """Peak RSS of a live process (VmHWM)."""
    return _status_kb(pid, "VmHWM")


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Monitor:
    """Poll ``pid`` every ``interval`` s until stopped; keeps peaks in MiB."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval = pid, interval
        self.driver_peak_kb = 0
        self.workers_rss_peak_kb = 0
        self.workers_pss_peak_kb = 0
        self.workers_max = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.driver_peak_kb = max(self.driver_peak_kb, hwm_kb(self.pid), rss_kb(self.pid))
            workers = [p for p in descendants(self.pid) if _cmdline(p).startswith("ray::")]
            self.workers_max = max(self.workers_max, len(workers))
            self.workers_rss_peak_kb = max(self.workers_rss_peak_kb, sum(rss_kb(p) for p in workers))
            self.workers_pss_peak_kb = max(self.workers_pss_peak_kb, sum(pss_kb(p) for p in workers))
            self.samples += 1
            self._stop.wait(self.interval)

    def figures(self) -> dict[str, float]:
        return {
            "driver_peak_rss_polled_mib": round(self.driver_peak_kb / 1024, 1),
            "ray_workers_peak_rss_sum_mib": round(self.workers_rss_peak_kb / 1024, 1),
            "ray_workers_peak_pss_sum_mib": round(self.workers_pss_peak_kb / 1024, 1),
            "ray_workers_max": self.workers_max,
            "samples": self.samples,
        }
