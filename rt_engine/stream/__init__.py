"""Real-time streaming engine: media clock, sources, model scheduler, sessions.

Read in this order: :mod:`.clock` (media time and output timing), :mod:`.sources` (audio, pose,
identity inputs), :mod:`.scheduler` (the model's lane threads, batching across sessions),
:mod:`.session` (one client's pipeline and the :class:`Engine` that creates sessions).
"""

from rt_engine.stream.clock import ClockConfig, MediaClock
from rt_engine.stream.scheduler import Metrics, Scheduler, SchedulerConfig
from rt_engine.stream.session import Engine, Session, SessionOptions, read_stamp, stamp_index

__all__ = [
    "ClockConfig",
    "Engine",
    "MediaClock",
    "Metrics",
    "Scheduler",
    "SchedulerConfig",
    "Session",
    "SessionOptions",
    "read_stamp",
    "stamp_index",
]
