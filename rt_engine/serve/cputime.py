"""Where the server's CPU time goes: the model, or everything else (per session work).

    CpuSplit().read(model_threads) -> {"model": s, "server": s, "total": s}

Linux only (``/proc/self/task``); elsewhere ``model`` is 0 and everything counts as ``server``.
A thread counts as the model's when it is one of the scheduler's lane threads, or when Python does
not know it and it is not a MediaPipe thread: the runtimes' own worker pools (OpenVINO's TBB workers,
torch's OpenMP threads) are native threads that Python never started. Threads that ended stay
counted on their side (:class:`CpuSplit` keeps their last reading). A codec that ran its own native
threads would be counted as the model's; at 224 px aiortc's encoders run in the calling executor
thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _thread_cpu(task: Path) -> tuple[str, float] | None:
    """(name, CPU seconds) of one thread: the scheduler's exact run time (``schedstat``, ns) where the
    kernel has it, else utime + stime in clock ticks (which the kernel rescales per thread, so sums
    of them drift from the process total)."""
    try:
        comm = (task / "comm").read_text().strip()
        try:
            return comm, int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            return comm, (int(fields[11]) + int(fields[12])) / _TICK
    except OSError:  # the thread ended meanwhile
        return None


class CpuSplit:
    """Reads the split, thread by thread. Remembers every thread id it ever saw Python run (a Python
    thread that is ending leaves ``threading.enumerate()`` before its OS thread exits, and must not be
    taken for a native pool thread) and the last reading of every thread, so that the CPU of a
    thread that ended stays counted on its side. Each thread is read once per call and the total is
    their sum: no part is read at another moment than the rest. CPU spent before the first call by
    threads that ended before it is not counted (callers use differences)."""

    def __init__(self) -> None:
        self._python: set[int] = set()
        self._last: dict[int, tuple[str, float]] = {}  # thread id -> (part, CPU seconds) at the last read
        self._gone = {"model": 0.0, "server": 0.0}  # CPU of threads that ended since

    def read(self, model_threads: Iterable[int | None]) -> dict[str, float]:
        """CPU seconds so far, split into the model's and the rest (see the module doc)."""
        tasks = Path("/proc/self/task")
        if not tasks.is_dir():
            total = time.process_time()
            return {"model": 0.0, "server": total, "total": total}
        model_ids = {i for i in model_threads if i is not None}
        self._python.update(th.native_id for th in threading.enumerate() if th.native_id is not None)
        seen: dict[int, tuple[str, float]] = {}
        for task in tasks.iterdir():
            tid = int(task.name)
            got = _thread_cpu(task)
            if got is None:
                continue
            comm, sec = got
            native_pool = tid not in self._python and not comm.startswith("mediapipe")
            seen[tid] = ("model" if tid in model_ids or native_pool else "server", sec)
        for tid, (part, sec) in self._last.items():
            if tid not in seen:
                self._gone[part] += sec
        self._last = seen
        parts = dict(self._gone)
        for part, sec in seen.values():
            parts[part] += sec
        return {"model": parts["model"], "server": parts["server"], "total": parts["model"] + parts["server"]}
