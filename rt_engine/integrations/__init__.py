"""Voice-agent framework integrations of the avatar stream (:mod:`rt_engine.stream.avatar`).

* :mod:`rt_engine.integrations.pipecat`: a Pipecat video service (``pip install 'rt_engine[pipecat]'``);
* :mod:`rt_engine.integrations.livekit`: a LiveKit Agents ``VideoGenerator`` and avatar worker
  (``pip install 'rt_engine[livekit]'``).

Importing this package imports neither framework; each submodule imports its own.
"""

from __future__ import annotations

from rt_engine.stream.clock import ClockConfig
from rt_engine.stream.scheduler import SchedulerConfig
from rt_engine.stream.session import Engine


def load_engine(
    checkpoint: str | None = None,
    backend: str = "auto",
    precision: str = "auto",
    max_batch: int = 8,
    margin_ms: float = 80.0,
    threads: int = 0,
) -> Engine:
    """An engine with the runner that ``serve`` would pick (bundled model unless ``checkpoint``)."""
    from rt_engine.backends import make_runner

    runner = make_runner(checkpoint, precision, backend)
    return Engine(
        runner, SchedulerConfig(max_batch=max_batch).validate(), ClockConfig(margin_s=margin_ms / 1e3), threads=threads
    )


def require(module: str, extra: str) -> None:
    """Raise a one-line ImportError naming the extra to install when ``module`` is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"error: {module} is not installed; pip install 'rt_engine[{extra}]'")
