"""What the model can do, measured, and the output plan that follows from it.

:class:`CostModel` keeps a moving average of the model's wall time per batch, for every batch size
it has run (the warm-up times each size once, so the table is full before the first session). From
it, :func:`plan_output` derives, for ``n`` sessions of 25 frames/s each:

* ``fraction``: the share of frame indices that are generated. 1 while the model keeps up; below
  that, frames are generated on an even sub-rate grid (:func:`wants_frame`: with 0.5 every second
  frame, with 0.6 three of every five, evenly spaced) and the others hold the previous image. The
  model's measured throughput, times ``utilisation``, is spread over all sessions.
* ``margin_s``: the compute budget after the 120 ms lookahead. A frame's job is complete about
  ``arrival_s`` after its window; it may wait for the batch in flight and then runs in the next
  one, so ``margin = max(base, arrival_s + 2 * batch time)``, capped so that the whole output delay
  stays within ``max_delay_s`` (default 400 ms). When even the cap is not enough, the fraction is
  lowered until batches of one frame fit.

Admission (:meth:`Plan.admits_more`) asks the same question for ``n + 1`` sessions: a new session is
taken only when every session would still get every frame fresh.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from rt_engine.config import FPS

EMA = 0.2  # weight of the newest batch in the per-size moving average


class CostModel:
    """Model seconds per batch, by batch size: a moving average plus ``spread`` times the moving
    mean absolute deviation (a batch seldom takes longer than the estimate). Thread-safe."""

    def __init__(self, max_batch: int, spread: float = 1.0):
        self.max_batch = max_batch
        self.spread = spread
        self._lock = threading.Lock()
        self._mean: dict[int, float] = {}  # batch size -> seconds
        self._dev: dict[int, float] = {}  # batch size -> mean absolute deviation, seconds
        self._cost: dict[int, float] = {}  # batch size -> mean + spread * dev

    def observe(self, batch: int, seconds: float) -> None:
        with self._lock:
            old = self._mean.get(batch)
            if old is None:
                self._mean[batch], self._dev[batch] = seconds, 0.0
            else:
                self._dev[batch] = (1 - EMA) * self._dev[batch] + EMA * abs(seconds - old)
                self._mean[batch] = (1 - EMA) * old + EMA * seconds
            self._cost[batch] = self._mean[batch] + self.spread * self._dev[batch]

    def set(self, batch: int, seconds: float) -> None:
        """Replace the estimate for one batch size (warm-up timing, tests)."""
        with self._lock:
            self._mean[batch], self._dev[batch], self._cost[batch] = seconds, 0.0, seconds

    @property
    def known(self) -> bool:
        return bool(self._cost)

    def batch_s(self, batch: int, spread: bool = True) -> float:
        """Estimated seconds for a batch of ``batch`` frames (0 while nothing was measured); without
        ``spread`` the plain average. Unmeasured sizes scale the cost of the nearest measured size."""
        with self._lock:
            table = self._cost if spread else self._mean
            if batch in table:
                return table[batch]
            if not table:
                return 0.0
            near = min(table, key=lambda b: (abs(b - batch), -b))
            return table[near] / near * batch

    def fps(self, batch: int) -> float:
        """Frames per second the model makes at this batch size, on average (inf while unmeasured)."""
        s = self.batch_s(batch, spread=False)
        return batch / s if s > 0 else math.inf

    def table(self) -> dict[int, float]:
        with self._lock:
            return dict(sorted(self._cost.items()))

    def snapshot(self) -> tuple[dict[int, float], dict[int, float]]:
        """-> (mean, mean deviation) per batch size: what :meth:`restore` takes (a replica elsewhere)."""
        with self._lock:
            return dict(self._mean), dict(self._dev)

    def restore(self, snap: tuple[dict[int, float], dict[int, float]]) -> None:
        """Replace every estimate by a :meth:`snapshot` of another cost model."""
        mean, dev = snap
        with self._lock:
            self._mean, self._dev = dict(mean), dict(dev)
            self._cost = {b: m + self.spread * self._dev.get(b, 0.0) for b, m in self._mean.items()}


@dataclass(frozen=True)
class PlanConfig:
    max_delay_s: float = 0.4  # bound on the output delay (lookahead + margin)
    utilisation: float = 0.95  # share of the model's measured throughput the plan may use
    arrival_s: float = 0.04  # least allowance for how far into the margin a frame's audio is complete
    max_arrival_s: float = 0.2  # the measured allowance (p95, Engine) is capped here


@dataclass(frozen=True)
class Plan:
    sessions: int
    fraction: float  # share of frames generated (1: all fresh)
    margin_s: float  # compute budget after the lookahead
    model_fps: float  # model throughput at the batch size this plan expects
    batch: int  # expected frames per batch

    @property
    def fresh_fps(self) -> float:
        return FPS * self.fraction

    @property
    def full_rate(self) -> bool:
        return self.fraction >= 1.0


def plan_output(
    cost: CostModel, sessions: int, base_margin_s: float, lookahead_s: float, cfg: PlanConfig | None = None
) -> Plan:
    """The output plan for ``sessions`` sessions (see module doc)."""
    cfg = cfg or PlanConfig()
    n = max(1, sessions)
    max_margin = max(base_margin_s, cfg.max_delay_s - lookahead_s)
    fraction = min(1.0, cfg.utilisation * cost.fps(min(cost.max_batch, n)) / (FPS * n))
    while True:
        batch = max(1, min(cost.max_batch, math.ceil(n * fraction)))
        t_b = cost.batch_s(batch)  # with the spread: deadlines need the long batches too
        busy = min(1.0, FPS * n * fraction * cost.batch_s(batch, spread=False) / batch)  # share of time
        need = cfg.arrival_s + (1.0 + busy) * t_b
        if need <= max_margin or fraction <= 0.0:
            break
        if batch > 1:  # smaller batches first
            fraction = min(fraction, (batch - 1) / n)
            continue
        # one frame per batch and still too slow for the bound: evenly spaced frames (the fraction
        # is already within the throughput) rarely wait for one another, so take the whole bound.
        # Frames that cannot be ready even so are dropped by the scheduler before they are computed.
        need = max_margin
        break
    margin = min(max_margin, max(base_margin_s, need))
    return Plan(
        sessions=sessions,
        fraction=max(0.0, min(1.0, fraction)),
        margin_s=margin,
        model_fps=cost.fps(batch),
        batch=batch,
    )


class RunningQuantile:
    """A streaming estimate of the ``q`` quantile of a quantity in seconds (stochastic approximation:
    each sample moves it by ``step`` up with weight q or down with weight 1-q). No history is kept;
    thread-safe enough for one writer (a float assignment)."""

    def __init__(self, q: float, init: float, step: float = 0.002):
        self.q, self.value, self.step = q, init, step

    def update(self, x: float) -> None:
        self.value += self.step * (self.q if x > self.value else self.q - 1.0)


def wants_frame(i: int, fraction: float) -> bool:
    """Whether frame ``i`` is on the even sub-rate grid of ``fraction`` (1: every frame)."""
    if fraction >= 1.0:
        return True
    return math.floor((i + 1) * fraction) > math.floor(i * fraction)
