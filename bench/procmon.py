"""Memory of a Ray job's process tree from /proc (Linux), without psutil.

``Monitor`` polls a driver process in a thread. Every ``interval`` seconds it finds the job's
processes: every descendant of the driver (gcs_server, raylet, the dashboard and runtime-env
agents, log monitor, ``ray::`` workers: a local Ray is started by the driver, its workers by the
raylet) and, in case one was re-parented, any process whose command line names the driver's Ray
session folder (``/tmp/ray/session_<stamp>``, read from the raylet's or gcs_server's command line).
Processes of other Ray sessions on the machine (someone else's job) are never counted.

Each sample takes ``driver RSS + sum of the PSS of those processes``: the *whole-job* figure. RSS
counts a shared page (Ray's object store is shared memory; so are the libraries every worker maps)
in every process that maps it, so an RSS sum over-counts; PSS splits each shared page between the
processes that map it, so a PSS sum counts it once. The driver's RSS (not PSS) is used so that the
driver's own figure is never flattered by sharing. The peak of the sum over the run is reported,
with the split by process kind at that sample.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")


def _fields_kb(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """The kB values of ``keys`` in a ``/proc`` file of ``Key: value kB`` lines (missing: left out)."""
    out = {}
    try:
        for line in Path(path).read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in keys:
                out[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def rss_parts_kb(pid: int) -> dict[str, int]:
    """VmRSS split as the kernel counts it: RssAnon (private heap), RssFile (libraries), RssShmem (shared memory)."""
    return _fields_kb(f"/proc/{pid}/status", ("VmRSS", "RssAnon", "RssFile", "RssShmem"))


def rss_kb(pid: int) -> int:
    return _fields_kb(f"/proc/{pid}/status", ("VmRSS",)).get("VmRSS", 0)


def hwm_kb(pid: int) -> int:
    """Peak RSS of a live process (VmHWM)."""
    return _fields_kb(f"/proc/{pid}/status", ("VmHWM",)).get("VmHWM", 0)


def pss_kb(pid: int) -> int:
    return _fields_kb(f"/proc/{pid}/smaps_rollup", ("Pss",)).get("Pss", 0)


def pss_parts_kb(pid: int) -> dict[str, int]:
    """PSS split as the kernel counts it (``smaps_rollup``): ``Pss`` = ``Pss_Anon`` (private heap)
    + ``Pss_File`` (libraries) + ``Pss_Shmem`` (shared memory: Ray's object store pages it touched)."""
    return _fields_kb(f"/proc/{pid}/smaps_rollup", ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"))


def process_start_unix(pid: int | str = "self") -> float:
    """When a process started, as Unix time (``/proc/<pid>/stat`` field 22 + boot time)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
    btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def _parents() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            out[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def descendants(pid: int, parents: dict[int, int] | None = None) -> list[int]:
    parents = _parents() if parents is None else parents
    kids: dict[int, list[int]] = {}
    for child, parent in parents.items():
        kids.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (``/proc/<pid>/stat`` fields 14, 15)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kind_of(cmdline: str) -> str:
    """A short name for a Ray process: gcs, raylet, worker, or other (agents, log monitor, ...)."""
    if cmdline.startswith("ray::"):
        return "workers"
    exe = cmdline.split(" ", 1)[0]
    if exe.endswith("gcs_server"):
        return "gcs"
    if exe.endswith("raylet"):
        return "raylet"
    if "default_worker.py" in cmdline:
        return "workers"  # a worker before it renamed itself ray::...
    return "other"


def _short(cmdline: str) -> str:
    """A process's name for the per-process split: ``ray::Name`` or the executable's or script's base name."""
    if cmdline.startswith("ray::"):
        return cmdline.split(" ", 1)[0]
    if kind_of(cmdline) in ("gcs", "raylet"):  # (the raylet's arguments name setup_worker.py)
        return cmdline.split(" ", 1)[0].rsplit("/", 1)[-1]
    parts = cmdline.split()
    script = next((a for a in parts[1:] if a.endswith(".py")), parts[0] if parts else "?")
    return script.rsplit("/", 1)[-1]


class Monitor:
    """Poll the job of driver ``pid`` every ``interval`` s until stopped; keeps peaks (kB inside, MiB out)."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval = pid, interval
        self.session: str | None = None
        self.driver_peak_kb = 0
        self.workers_rss_peak_kb = 0
        self.workers_pss_peak_kb = 0
        self.ray_pss_peak_kb = 0  # every Ray process but the driver
        self.whole_peak_kb = 0  # driver RSS + PSS sum of the Ray processes, same sample
        self.whole_pss_peak_kb = 0  # driver PSS + PSS sum of the Ray processes, same sample
        self.whole_peak_split_kb: dict[str, int] = {}
        self.whole_peak_processes_kb: dict[str, int] = {}  # "<pid> <name>" -> PSS at the peak sample
        self.whole_peak_processes_parts_kb: dict[str, dict[str, int]] = {}  # same, split anon / file / shmem
        self.whole_peak_at = 0.0
        self.cpu_by_process: dict[int, tuple[str, float]] = {}  # pid -> (name, CPU s at its last sample)
        self.processes_max = 0
        self.workers_max = 0
        self.samples = 0
        self._cmd: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _job_processes(self) -> list[int]:
        parents = _parents()
        procs = set(descendants(self.pid, parents))
        for p in procs:
            if (
                p not in self._cmd or "default_worker.py" in self._cmd[p] or self._cmd[p].startswith("ray::")
            ):  # workers rename themselves
                self._cmd[p] = _cmdline(p)
            if self.session is None and (m := _SESSION.search(self._cmd[p])):
                self.session = m.group(0)
        if self.session:
            for p in parents:
                if p in procs or p == self.pid:
                    continue
                if p not in self._cmd:
                    self._cmd[p] = _cmdline(p)
                if self.session in self._cmd[p]:
                    procs.add(p)
        for p in list(self._cmd):
            if p not in parents:
                del self._cmd[p]
        return sorted(procs)

    def sample(self) -> None:
        driver_rss = rss_kb(self.pid)
        if not driver_rss:
            return
        procs = self._job_processes()
        split: dict[str, int] = {}
        each: dict[str, int] = {}
        parts: dict[str, dict[str, int]] = {}
        workers_rss = 0
        for p in procs:
            cmd = self._cmd.get(p) or _cmdline(p)
            kind = kind_of(cmd)
            rollup = pss_parts_kb(p)
            pss = rollup.get("Pss", 0)
            split[kind] = split.get(kind, 0) + pss
            each[f"{p} {_short(cmd)}"] = pss
            parts[f"{p} {_short(cmd)}"] = rollup
            # A process that has just exited reads as 0 s and no name: keep its last real figures.
            name, cpu = _short(cmd), cpu_seconds(p)
            before = self.cpu_by_process.get(p)
            if before is not None and (cpu < before[1] or name == "?"):
                name, cpu = before[0], max(cpu, before[1])
            self.cpu_by_process[p] = (name, cpu)
            if kind == "workers":
                workers_rss += rss_kb(p)
        ray_pss = sum(split.values())
        whole = driver_rss + ray_pss
        self.driver_peak_kb = max(self.driver_peak_kb, hwm_kb(self.pid), driver_rss)
        self.workers_rss_peak_kb = max(self.workers_rss_peak_kb, workers_rss)
        self.workers_pss_peak_kb = max(self.workers_pss_peak_kb, split.get("workers", 0))
        self.ray_pss_peak_kb = max(self.ray_pss_peak_kb, ray_pss)
        self.whole_pss_peak_kb = max(self.whole_pss_peak_kb, pss_kb(self.pid) + ray_pss)
        if whole > self.whole_peak_kb:
            self.whole_peak_kb, self.whole_peak_at = whole, time.time()
            self.whole_peak_split_kb = {"driver_rss": driver_rss, **split}
            self.whole_peak_processes_kb = each
            self.whole_peak_processes_parts_kb = parts
        self.processes_max = max(self.processes_max, len(procs))
        self.workers_max = max(self.workers_max, sum(1 for p in procs if kind_of(self._cmd.get(p, "")) == "workers"))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # a process vanished mid-read: skip this sample
                pass
            self._stop.wait(self.interval)

    def figures(self) -> dict[str, object]:
        mib = 1 / 1024
        return {
            "whole_job_peak_mib": round(self.whole_peak_kb * mib, 1),
            "whole_job_peak_split_mib": {k: round(v * mib, 1) for k, v in self.whole_peak_split_kb.items()},
            "whole_job_peak_processes_pss_mib": {
                k: round(v * mib, 1) for k, v in sorted(self.whole_peak_processes_kb.items(), key=lambda kv: -kv[1])
            },
            "whole_job_peak_processes_pss_parts_mib": {
                k: {part.removeprefix("Pss_").lower(): round(v * mib, 1) for part, v in split.items() if part != "Pss"}
                for k, split in sorted(self.whole_peak_processes_parts_kb.items(), key=lambda kv: -kv[1].get("Pss", 0))
            },
            "whole_job_peak_unix": round(self.whole_peak_at, 3),
            "whole_job_peak_all_pss_mib": round(self.whole_pss_peak_kb * mib, 1),
            "ray_processes_peak_pss_sum_mib": round(self.ray_pss_peak_kb * mib, 1),
            "driver_peak_rss_polled_mib": round(self.driver_peak_kb * mib, 1),
            "ray_workers_peak_rss_sum_mib": round(self.workers_rss_peak_kb * mib, 1),
            "ray_workers_peak_pss_sum_mib": round(self.workers_pss_peak_kb * mib, 1),
            "cpu_s_by_process": {
                f"{pid} {name}": round(cpu, 2)
                for pid, (name, cpu) in sorted(self.cpu_by_process.items(), key=lambda kv: -kv[1][1])
            },
            "ray_processes_max": self.processes_max,
            "ray_workers_max": self.workers_max,
            "ray_session": self.session,
            "samples": self.samples,
        }
