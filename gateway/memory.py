"""The process's memory (issue 18): what it holds live, and giving back what it freed.

A process's RSS is not what it holds: allocators keep freed memory for reuse, so RSS stays near
the high-water mark of the busiest moment, and fragmentation (a page, or one of pymalloc's 1 MiB
arenas, that still holds one live block) keeps more. :func:`in_use` reads what is live — glibc's
bytes allocated (``mallinfo2``: every arena, and the blocks it mmapped) and pymalloc's blocks
allocated — for ``/metrics``: a leak shows there as growth, fragmentation does not.

:class:`MemoryTrimmer` gives back what glibc keeps. Python frees what a gateway no longer
uses — a burst's frames, a hostile client's refused messages, a closed connection's buffers —
but glibc's ``malloc`` keeps the freed pages for reuse instead of returning them. Measured
with the socket-level fuzzer (``bench/frame_fuzz.py``, 300,000 hostile frames after a warm-up
of 30,000): live Python memory flat (tracemalloc: 18.37 → 18.42 MiB), RSS +10 MiB, of which
``malloc_trim(0)`` gave back 9. In a container with a memory limit, or beside other
processes, memory held for a burst that has passed is memory taken from them.

So, every ``interval`` seconds, ``malloc_trim(0)`` runs in a worker thread (ctypes releases the
GIL; the event loop goes on, its allocations wait on the heap's lock only while the trim walks
it: 20-35 ms measured during the fuzzer's attack, a few ms at rest). Only where glibc is the
allocator; elsewhere (musl, macOS) the trimmer does nothing. What pymalloc keeps (its 1 MiB
arenas, freed only when empty) and pages that still hold a live block stay: a few MiB after a
long attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import sys
import time
from collections.abc import Callable

from .observability import log

__all__ = ["MemoryTrimmer", "in_use", "malloc_trim"]


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        function = ctypes.CDLL(None).malloc_trim  # glibc only
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


#: glibc's ``malloc_trim``, or None where the C library has none.
malloc_trim = _find_malloc_trim()


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def _find_mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        function = ctypes.CDLL(None).mallinfo2  # glibc 2.33 and later
    except (AttributeError, OSError):
        return None
    function.argtypes = []
    function.restype = _MallInfo2
    return function


_mallinfo2 = _find_mallinfo2()


def in_use() -> dict[str, int]:
    """What the process holds live: ``malloc_bytes`` (glibc: allocated in its arenas plus its
    mmapped blocks; -1 where unknown) and ``python_blocks`` (pymalloc's blocks allocated)."""
    malloc_bytes = -1
    if _mallinfo2 is not None:
        info = _mallinfo2()
        malloc_bytes = int(info.uordblks + info.hblkhd)
    return {"malloc_bytes": malloc_bytes, "python_blocks": sys.getallocatedblocks()}


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    """This process's resident set size in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        return 0


class MemoryTrimmer:
    """Runs ``malloc_trim(0)`` every ``interval`` seconds; ``start()`` from inside the loop."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        #: Trims done, bytes of RSS they gave back (summed), and the last one's duration.
        self.trims = 0
        self.returned_bytes = 0
        self.last_ms = 0.0
        self._task: asyncio.Task[None] | None = None
        self._trimmed: asyncio.Event | None = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0 and malloc_trim is not None

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(), name="muxgate-memory-trim")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # A trim under way finishes in its thread (it cannot be interrupted); not awaited.
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await asyncio.to_thread(self.trim)
            if self._trimmed is not None:
                self._trimmed.set()

    async def trimmed(self, count: int) -> None:
        """Until at least ``count`` trims are done (for tests and tools)."""
        while self.trims < count:
            if self._trimmed is None:
                self._trimmed = asyncio.Event()
            self._trimmed.clear()
            await self._trimmed.wait()

    def trim(self) -> int:
        """Trim now; the bytes of RSS given back."""
        if malloc_trim is None:
            return 0
        before, started = _rss(), time.perf_counter()
        malloc_trim(0)
        self.last_ms = (time.perf_counter() - started) * 1000
        returned = max(0, before - _rss())
        self.trims += 1
        self.returned_bytes += returned
        if returned >= 1 << 20:  # worth a line: a burst's memory went back
            log.debug("memory.trimmed", returned_mib=round(returned / (1 << 20), 1),
                      ms=round(self.last_ms, 2))  # fmt: skip
        return returned
