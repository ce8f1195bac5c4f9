"""Where the server's CPU time goes: the model, or everything else (per session work).

    cpu_seconds(model_threads) -> {"model": s, "server": s, "total": s}

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
from collections.abc import Iterable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _thread_cpu(task: Path) -> tuple[str, float] | None:
    try:
        comm = (task / "comm").read_text().strip()
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # the thread ended meanwhile
        return None
    return comm, (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def cpu_seconds(model_threads: Iterable[int | None]) -> dict[str, float]:
    """CPU seconds of this process so far, split into the model's and the rest (see module doc)."""
    t = os.times()
    total = t.user + t.system
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return {"model": 0.0, "server": total, "total": total}
    model_ids = {i for i in model_threads if i is not None}
    python_ids = {th.native_id for th in threading.enumerate()} - model_ids
    model = 0.0
    for task in tasks.iterdir():
        tid = int(task.name)
        if tid in python_ids:
            continue
        got = _thread_cpu(task)
        if got is None:
            continue
        comm, sec = got
        if tid in model_ids or not comm.startswith("mediapipe"):
            model += sec
    model = min(model, total)
    return {"model": model, "server": total - model, "total": total}
