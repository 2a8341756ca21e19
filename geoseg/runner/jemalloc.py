"""jemalloc's page decay in a worker process, where the process allocates with jemalloc.

A local Ray started by geoseg runs its workers on the jemalloc that Ray ships
(``geoseg.runner.local_ray``); a cluster does with ``RAY_LD_PRELOAD_ON_WORKERS=1``. Elsewhere the
process has glibc's malloc and these functions do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from typing import Any

_SIZE = ctypes.c_ssize_t


@functools.cache
def _mallctl() -> Any:
    """jemalloc's ``mallctl``, where the process's malloc is jemalloc (glibc has no such symbol)."""
    try:
        mallctl = ctypes.CDLL(None).mallctl
    except AttributeError:
        return None
    # int mallctl(const char *name, void *oldp, size_t *oldlenp, void *newp, size_t newlen)
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    return mallctl


def keep_freed_pages() -> bool:
    """Keep freed pages in this process for reuse instead of returning them to the kernel after
    jemalloc's decay time (10 s by default, returned gradually from the moment they are freed).

    For the model actor: each call frees and allocates the same large window arrays again; with
    the default decay every call faulted those pages in anew, and a run on an 8192^2 raster took
    1.5x as long. Kept, they are reused by the next call, without the fragmented heaps glibc
    leaves. Set in the process (not through ``MALLOC_CONF`` in a Ray
    ``runtime_env``, for which Ray starts a fresh worker: the actor was ready 0.8 s later).
    Returns whether jemalloc is there."""
    mallctl = _mallctl()
    if mallctl is None:
        return False
    never = _SIZE(-1)
    narenas = ctypes.c_uint(0)
    size = ctypes.c_size_t(ctypes.sizeof(narenas))
    mallctl(b"arenas.narenas", ctypes.byref(narenas), ctypes.byref(size), None, 0)
    names = [b"arenas.dirty_decay_ms", b"arenas.muzzy_decay_ms"]  # arenas made from now on
    for i in range(narenas.value):  # those there already (one not yet initialised refuses: fine)
        names += [b"arena.%d.dirty_decay_ms" % i, b"arena.%d.muzzy_decay_ms" % i]
    for name in names:
        mallctl(name, None, None, ctypes.byref(never), ctypes.sizeof(never))
    return True


# mallctl's index for "every arena" (MALLCTL_ARENAS_ALL).
ALL_ARENAS = 4096


def release_freed_pages() -> bool:
    """Return every arena's freed (dirty) pages to the kernel now; for the model actor between
    calls. Within a call its window buffers reuse the pages they freed (``keep_freed_pages``); what
    one call leaves freed is mostly of sizes the next may not ask for again, and was held to the
    end of the run: the 1x1-conv run on 8192^2 peaked 60 MiB lower in the actor (100 MiB over the
    whole job) and took as long. Returns whether jemalloc is there."""
    mallctl = _mallctl()
    if mallctl is None:
        return False
    mallctl(b"arena.%d.purge" % ALL_ARENAS, None, None, None, 0)
    return True


def freed_bytes() -> int | None:
    """Bytes of freed pages jemalloc holds in this process (all arenas), or None without jemalloc."""
    mallctl = _mallctl()
    if mallctl is None:
        return None
    epoch = ctypes.c_uint64(1)  # stats are a snapshot, refreshed by writing the epoch
    mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
    pages = ctypes.c_size_t(0)
    size = ctypes.c_size_t(ctypes.sizeof(pages))
    if mallctl(b"stats.arenas.%d.pdirty" % ALL_ARENAS, ctypes.byref(pages), ctypes.byref(size), None, 0):
        return None
    return int(pages.value) * mmap.PAGESIZE


def decay_ms(arena: int = 0) -> int | None:
    """Arena ``arena``'s dirty-page decay time in ms (-1: pages are kept), or None without jemalloc."""
    mallctl = _mallctl()
    if mallctl is None:
        return None
    value = _SIZE(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    if mallctl(b"arena.%d.dirty_decay_ms" % arena, ctypes.byref(value), ctypes.byref(size), None, 0):
        return None
    return int(value.value)
