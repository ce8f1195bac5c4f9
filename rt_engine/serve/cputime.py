"""Where the server's CPU time goes: the model, or everything else (per session work).

    CpuSplit().read(model_threads) -> {"model": s, "server": s, "total": s}

Linux only (``/proc/self/task``); elsewhere ``model`` is 0 and everything counts as ``server``.
A thread counts as the model's when it is the scheduler's model thread, or when Python does not
know it and it is not a MediaPipe thread: the runtimes' own worker pools (OpenVINO's TBB workers,
torch's OpenMP threads) are native threads that Python never started. ``server`` is the process
total less the model's, so threads that already ended (they were Python's: executor workers) stay
counted. A codec that ran its own native threads would be counted as the model's; at 224 px
aiortc's encoders run in the calling executor thread.
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
    """Reads the split; remembers every thread id it ever saw Python run, so that a Python thread that
    is ending (gone from ``threading.enumerate()`` before its OS thread exits) is not taken for a
    native pool thread, which would move its whole lifetime's CPU to the model's side."""

    def __init__(self) -> None:
        self._python: set[int] = set()

    def read(self, model_threads: Iterable[int | None]) -> dict[str, float]:
        """CPU seconds of this process so far, split into the model's and the rest (see module doc)."""
        total = time.process_time()  # the whole process, ended threads included
        tasks = Path("/proc/self/task")
        if not tasks.is_dir():
            return {"model": 0.0, "server": total, "total": total}
        model_ids = {i for i in model_threads if i is not None}
        self._python.update(th.native_id for th in threading.enumerate() if th.native_id is not None)
        model = 0.0
        for task in tasks.iterdir():
            tid = int(task.name)
            if tid in self._python and tid not in model_ids:
                continue
            got = _thread_cpu(task)
            if got is None:
                continue
            comm, sec = got
            if tid in model_ids or not comm.startswith("mediapipe"):
                model += sec
        model = min(model, total)
        return {"model": model, "server": total - model, "total": total}
