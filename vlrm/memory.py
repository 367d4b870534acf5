"""What a process holds in memory now, and keeping a long run's memory flat.

A long run's resident memory (RSS) can rise although nothing is kept: glibc's ``malloc`` keeps
freed pages in its heaps (one arena per thread that allocated) for reuse, and after it frees a
large buffer it serves buffers up to that size from the heaps too (its mmap threshold rises, up
to 32 MiB), where batches of varying size leave free pages behind. :func:`memory_now` tells the
two apart: ``python_blocks`` (objects the interpreter holds, ``sys.getallocatedblocks``) and
``heap_used_mib`` grow with a leak; ``heap_free_mib`` (bytes glibc holds free, ``mallinfo2``)
grows with allocator retention. Each role's worker applies :func:`process_memory_policy`:
``cluster.malloc_mmap_threshold_kb`` fixes the threshold (:func:`set_mmap_threshold`) and
``cluster.trim_heap_every_s`` hands free heap pages back between calls (:func:`trim_heap`, glibc's
``malloc_trim(0)``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from typing import Any

__all__ = ["status_mib", "memory_now", "memory_report", "trim_heap", "set_mmap_threshold", "HeapTrimmer", "process_memory_policy"]


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.mallinfo2.restype = _Mallinfo2
        return libc
    except (OSError, AttributeError):  # not glibc (macOS, musl) or glibc < 2.33
        return None


_LIBC = _libc()


def status_mib(*fields: str) -> dict[str, float | None]:
    """The kB ``fields`` of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``RssAnon``...) in MiB;
    None for each where there is no such field (not Linux)."""
    out: dict[str, float | None] = dict.fromkeys(fields)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0]) / 1024
    except OSError:  # no /proc
        pass
    return out


def _resident_mib() -> dict[str, float | None]:
    """Resident memory: ``rss`` in all, ``anon`` (private: heaps, tensors) and ``shmem`` (shared
    memory touched, e.g. Ray's object store mapped in to read a batch: bounded by the store's
    size, and not this process's own)."""
    s = status_mib("VmRSS", "RssAnon", "RssShmem")
    return {"rss_mib": s["VmRSS"], "anon_mib": s["RssAnon"], "shmem_mib": s["RssShmem"]}


def memory_now() -> dict[str, float | int | None]:
    """This process's memory now: ``rss_mib`` (resident) with its ``anon_mib`` and ``shmem_mib``
    parts (:func:`_resident_mib`), ``heap_used_mib`` and ``heap_free_mib`` (glibc's allocated and
    free bytes in its heaps, mmapped chunks counted as used; None off glibc) and ``python_blocks``
    (memory blocks the interpreter has allocated)."""
    out: dict[str, float | int | None] = _resident_mib() | {"heap_used_mib": None, "heap_free_mib": None,
                                                            "python_blocks": sys.getallocatedblocks()}
    if _LIBC is not None:
        m = _LIBC.mallinfo2()
        out["heap_used_mib"] = (m.uordblks + m.hblkhd) / 2**20
        out["heap_free_mib"] = m.fordblks / 2**20
    return out


def trim_heap() -> bool:
    """Return glibc's free heap pages to the kernel (``malloc_trim(0)``); False where there is no
    glibc, or nothing could be returned."""
    return bool(_LIBC is not None and _LIBC.malloc_trim(0))


def memory_report(trim: bool = False) -> dict[str, dict | None]:
    """``{"before": memory_now(), "after": None}``; with ``trim``, ``after`` is :func:`memory_now`
    once the free heap pages were handed back (what each actor's ``memory()`` returns)."""
    out: dict[str, dict | None] = {"before": memory_now(), "after": None}
    if trim:
        trim_heap()
        out["after"] = memory_now()
    return out


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def set_mmap_threshold(kib: int) -> bool:
    """Serve every allocation of at least ``kib`` KiB with its own mmap, returned to the kernel on
    free (glibc's ``mallopt(M_MMAP_THRESHOLD)``). glibc raises that threshold by itself (up to
    32 MiB) each time it frees a large chunk, after which buffers of tensor size come from the heaps,
    where churn of varying sizes leaves free pages behind; a fixed threshold stops that. 0 leaves
    glibc's own. False where there is no glibc."""
    if kib <= 0 or _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, int(kib) * 1024))


class HeapTrimmer:
    """Calls :func:`trim_heap` when ``every_s`` seconds have passed since the last call (0: never);
    ``maybe()`` is cheap enough to call after every step."""

    def __init__(self, every_s: float):
        self.every_s = float(every_s)
        self._last = time.monotonic()
        self.trims = 0

    def maybe(self) -> None:
        if self.every_s > 0 and time.monotonic() - self._last >= self.every_s:
            trim_heap()
            self.trims += 1
            self._last = time.monotonic()


def process_memory_policy(cluster: Any) -> HeapTrimmer:
    """Apply ``cluster.malloc_mmap_threshold_kb`` to this process and return the
    :class:`HeapTrimmer` of ``cluster.trim_heap_every_s`` (each role's worker calls this once)."""
    set_mmap_threshold(int(cluster.malloc_mmap_threshold_kb))
    return HeapTrimmer(cluster.trim_heap_every_s)
