"""The scene writer: assembles scenes from tile results, off the driver.

The driver starts a few writers (Ray actors, spread over the cluster's nodes) and gives each scene
to one of them. Post-processing tasks return their results as object refs, which the driver passes
to the scene's writer unopened, so tile pixels go from the workers to the writer and never through
the driver. A writer holds several scenes at once; calls for different scenes run in parallel
threads (GDAL, numpy and shapely release the GIL), calls for one scene are serialised by its lock.
What comes back to the driver is small: per tile its status and pixel count, and per scene the
summary. This module knows nothing of Ray: ``geoseg.runner.pipeline`` wraps ``SceneWriter`` in an actor.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from geoseg.core.config import Config
from geoseg.core.s3 import apply_storage_env
from geoseg.core.storage import OutputStore
from geoseg.core.units import GroundScale
from geoseg.models.postprocess import TileResult
from geoseg.outputs.gpkg_template import GpkgTemplates
from geoseg.outputs.scene import SceneJob
from geoseg.raster.read import SceneInfo
from geoseg.runner.workers import TileAck

# A write that fails with less free space than this on the output disk is reported as disk full.
DISK_FULL_BYTES = 16 * 1024**2
# A writer's GDAL block cache (MB): the masks are written window by window, whole blocks at a time,
# so a small cache keeps its memory flat whatever the raster size. 32 MB rather than 64: the writer
# peaked 50 MiB lower on an 8192^2 mask, in the same time (two runs each).
WRITER_GDAL_CACHE_MB = 32
# SQLite's rollback journal of the scenes' GeoPackages kept in memory, not in a file beside each
# (GDAL's OGR_SQLITE_JOURNAL): a GeoPackage being written lives in the scene's staging folder and
# is rebuilt from scratch if the run dies, so a journal on disk protects nothing. An append through
# GDAL took 2.5 ms instead of 3.9 so; the rows now go in through sqlite3 with the same setting
# (geoseg.outputs.export.open_gpkg), and GDAL writes only the empty layers, once per CRS.
WRITER_SQLITE_JOURNAL = "MEMORY"


class SceneWriter:
    """Hosts the scenes given to it: opens their files, places tile results, publishes or drops them."""

    def __init__(self, config: Config, store: OutputStore, storage_env: dict[str, str], node: str = "") -> None:
        apply_storage_env(storage_env)
        # Before GDAL is first used in this process, so that every thread's writes share the cap.
        os.environ.setdefault("GDAL_CACHEMAX", str(WRITER_GDAL_CACHE_MB))
        os.environ.setdefault("OGR_SQLITE_JOURNAL", WRITER_SQLITE_JOURNAL)
        self.config, self.store, self.node = config, store, node
        self.jobs: dict[int, SceneJob] = {}
        self.locks: dict[int, threading.Lock] = {}
        self.errors: dict[int, str] = {}  # scenes that failed before their job existed
        self.templates = GpkgTemplates(config)

    def _local_dir(self) -> Path:
        """Where this writer's files go on local disk: the output folder, or the temp folder that
        stages uploads to object storage."""
        return Path(tempfile.gettempdir() if self.store.remote else self.store.location)

    def open(
        self,
        index: int,
        info: SceneInfo,
        stamp: dict[str, str] | None = None,
        scale: GroundScale | None = None,
        resume_tiles: list[int] | None = None,
    ) -> str:
        """Prepare a scene's outputs, replaying ``resume_tiles`` from an earlier run's checkpoints;
        returns the node it is assembled on. A failure is kept and reported on the scene's first
        tile (so the driver's loop sees it like any tile error)."""
        self.locks[index] = threading.Lock()
        try:
            self.jobs[index] = SceneJob(
                index, info, self.config, self.store, stamp, scale, resume_tiles, self.templates
            )
        except Exception as exc:  # e.g. the output folder filled up or vanished
            self.errors[index] = f"{info.path}: cannot prepare outputs ({_write_error(exc, self._local_dir())})"
        return self.node

    def add(self, index: int, results: list[TileResult], opened: Any = None) -> list[TileAck]:
        """Place tile results of scene ``index``. ``opened`` is the result of ``open`` (passed so the
        call waits for it)."""
        del opened
        with self.locks[index]:
            job = self.jobs.get(index)
            acks = []
            for r in results:
                error = r.error
                if job is None:
                    error = self.errors.get(index, "scene was not opened")
                else:
                    try:
                        job.add(r)
                    except Exception as exc:  # a disk that filled up, a GDAL write error
                        error = (
                            f"{job.info.path}: writing tile {r.tile.index} failed "
                            f"({_write_error(exc, job.tmp_dir.parent)})"
                        )
                        job.error = job.error or error
                core = r.tile.core
                acks.append(
                    TileAck(index, r.tile.index, "error" if error else r.status, int(core.width * core.height), error)
                )
            return acks

    def finish(self, index: int) -> dict[str, Any]:
        """Publish a complete scene; returns its summary. Raises with a one-line message on failure."""
        with self.locks[index]:
            job = self.jobs.pop(index)
            del self.locks[index]
            try:
                return job.finish()
            except Exception as exc:
                job.abort()
                raise RuntimeError(
                    f"{job.info.path}: writing outputs failed ({_write_error(exc, job.tmp_dir.parent)})"
                ) from None

    def abort(self, index: int) -> None:
        """Drop everything a failed scene wrote."""
        lock = self.locks.pop(index, None)
        if lock is None:
            return
        with lock:
            job = self.jobs.pop(index, None)
            self.errors.pop(index, None)
            if job is not None:
                job.abort()


def _write_error(exc: BaseException, folder: Path) -> str:
    """Why a write failed, in one line; a full disk says so, whatever GDAL or SQLite reported
    (they say "Failed to commit transaction", or quote a whole SQL statement)."""
    text = str(exc)
    full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in text
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if full or (free is not None and free < DISK_FULL_BYTES):
        room = f", {free / 1e6:.1f} MB free" if free is not None else ""
        return f"disk full: no space left on the disk holding {folder}{room}"
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
