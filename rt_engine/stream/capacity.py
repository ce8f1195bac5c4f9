"""What the model can do, measured, and the output plan that follows from it.

:class:`CostModel` keeps a moving average of the model's wall time per batch, for every batch size
it has run (the warm-up times each size once, so the table is full before the first session). From
it, :func:`plan_output` derives, for ``n`` sessions of 25 frames/s each:

* ``fraction``: the share of frame indices that are generated. 1 while the model keeps up; below
  that, frames are generated on an even sub-rate grid (:func:`wants_frame`: with 0.5 every second
  frame, with 0.6 three of every five, evenly spaced) and the others hold the previous image. The
  model's measured throughput, times ``utilisation``, is spread over all sessions (one session, whose
  evenly spaced frames never wait for another's, may use ``solo_utilisation`` of it).
* ``margin_s``: the compute budget after the 120 ms lookahead. A frame's job is complete about
  ``arrival_s`` after its window; it may wait for the batch in flight and then runs in the next
  one, so ``margin = max(base, arrival_s + 2 * batch time)``, capped so that the whole output delay
  stays within ``max_delay_s`` (default 400 ms). When even the cap is not enough, the fraction is
  lowered until batches of one frame fit. A model so slow that one frame alone does not fit in the
  bound with room to spare (``arrival_s + 1.5 x`` one frame's time: about 160 ms per frame) gets that
  much margin instead, beyond the bound; otherwise almost no frame would be fresh.

Admission asks the same question for ``n + 1`` sessions, on :meth:`CostModel.predicted`: a new
session is taken only when every session would still get every frame fresh. The prediction counts
contention: each session's own work (codecs, RTP, mel; on a small host also a local client) takes
CPU from the model, so the model time grows with the session count. The cost model measures that
slowdown against the warm-up time at each session count and extrapolates it linearly.

The prediction is checked against what the model really does in service (:class:`ObservedLoad`):
the model's busy seconds per second at the most loaded session count measured, scaled per session
to one more session (and by the growth of the slowdown), must stay within ``observed_utilisation``.
The linear slowdown misses the point where the cores run out (on 2 cores with the peers on the same
machine, 4 sessions were predicted to fit and got 71% of their frames fresh); the measured
utilisation sees it coming.

Batches that do not pay are not formed: :meth:`CostModel.batch_cap` is the smallest batch size
that makes nearly the best frames/s among the sizes that all keep batch 1's rate. On a runtime where
batching costs throughput (a dynamic-shape graph on the CPU), or gains nothing (a large model on a
small CPU), the scheduler and the plan then use batch 1. The warm-up fixes the cap (``limit``), and
the runner may release what it holds for larger sizes.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

from rt_engine.config import FPS

EMA = 0.2  # weight of the newest batch in the per-size moving average
RATIO_EMA = 0.05  # weight of the newest batch in the slowdown average (per session count)
RATIO_MIN = 20  # batches seen at a session count before its slowdown is trusted
SLOW_FRAME_ROOM = 1.5  # a margin holds at least this many single-frame times (beyond the bound if need be)
BATCH_GAIN_TOL = 0.97  # a batch size is used while its frames/s is at least this share of batch 1's


class CostModel:
    """Model seconds per batch, by batch size, on one lane: a moving average plus ``spread`` times the
    moving mean absolute deviation (a batch seldom takes longer than the estimate). ``lanes`` batches
    run at once (the scheduler's lanes), so the model makes ``lanes`` times one lane's frames/s.
    Thread-safe."""

    def __init__(self, max_batch: int, spread: float = 1.0):
        self.max_batch = max_batch
        self.spread = spread
        self._lock = threading.Lock()
        self._mean: dict[int, float] = {}  # batch size -> seconds
        self._dev: dict[int, float] = {}  # batch size -> mean absolute deviation, seconds
        self._cost: dict[int, float] = {}  # batch size -> mean + spread * dev
        # contention: the warm-up times (nothing else running) and, per number of open sessions, the
        # moving average of observed time / warm-up time (codecs, RTP and input work share the cores)
        self._quiet: dict[int, float] = {}  # batch size -> seconds, from set()
        self._ratio: dict[int, tuple[float, int]] = {}  # sessions -> (slowdown EMA, batches seen)
        self.load = 0  # open sessions now (set by the engine as sessions come and go)
        self.limit: int | None = None  # batch_cap fixed by the warm-up (None: from the averages)
        self.lanes = 1  # batches that run at once (Scheduler lanes)

    def observe(self, batch: int, seconds: float) -> None:
        with self._lock:
            old = self._mean.get(batch)
            if old is None:
                self._mean[batch], self._dev[batch] = seconds, 0.0
            else:
                self._dev[batch] = (1 - EMA) * self._dev[batch] + EMA * abs(seconds - old)
                self._mean[batch] = (1 - EMA) * old + EMA * seconds
            self._cost[batch] = self._mean[batch] + self.spread * self._dev[batch]
            if self.load > 0 and self._quiet.get(batch, 0.0) > 0:
                r, k = self._ratio.get(self.load, (1.0, 0))
                x = seconds / self._quiet[batch]
                self._ratio[self.load] = (x if k == 0 else (1 - RATIO_EMA) * r + RATIO_EMA * x, k + 1)

    def set(self, batch: int, seconds: float) -> None:
        """Replace the estimate for one batch size (warm-up timing, tests); it is also the quiet time
        that contention is measured against."""
        with self._lock:
            self._mean[batch], self._dev[batch], self._cost[batch] = seconds, 0.0, seconds
            self._quiet[batch] = seconds
            self._ratio.clear()  # slowdowns were measured against the old warm-up times

    def slowdown(self, sessions: int) -> float:
        """Predicted model time with ``sessions`` open sessions, relative to the warm-up time: 1 + k n,
        with k per session fitted from the most loaded state seen (at least ``RATIO_MIN`` batches),
        never below 0. 1 while nothing was seen under load."""
        with self._lock:
            seen = [(n, r) for n, (r, k) in self._ratio.items() if k >= RATIO_MIN]
        if not seen:
            return 1.0
        n, r = max(seen)
        return 1.0 + max(0.0, r - 1.0) / n * max(0, sessions)

    def predicted(self, sessions: int) -> CostModel:
        """A cost model for ``sessions`` open sessions: the warm-up times scaled by :meth:`slowdown`
        (the measured moving averages where no warm-up time exists). For admission: the current table
        reflects today's load, not the load one more session brings."""
        f = self.slowdown(sessions)
        out = CostModel(self.max_batch, self.spread)
        out.lanes = self.lanes
        with self._lock:
            for b, m in self._mean.items():
                q = self._quiet.get(b)
                mean = q * f if q else m
                out._mean[b], out._dev[b] = mean, self._dev[b]
                out._cost[b] = mean + self.spread * self._dev[b]
        return out

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
        """Frames per second the model makes at this batch size on all its lanes, on average (inf
        while unmeasured)."""
        s = self.batch_s(batch, spread=False)
        return self.lanes * batch / s if s > 0 else math.inf

    def table(self) -> dict[int, float]:
        with self._lock:
            return dict(sorted(self._cost.items()))

    def batch_cap(self) -> int:
        """Largest batch size the scheduler forms: ``limit`` once fixed (the warm-up fixes it), else
        from the averages. Sizes 1..k that all make at least ``BATCH_GAIN_TOL`` times batch 1's
        frames/s are usable; of those, the cap is the smallest that makes ``BATCH_GAIN_TOL`` of the
        best rate among them (a larger batch that is not faster only adds latency and memory).
        Unmeasured sizes count as batch 1's rate; with nothing measured the cap is ``max_batch``."""
        if self.limit is not None:
            return self.limit
        with self._lock:
            mean = dict(self._mean)
        if mean.get(1, 0.0) <= 0:
            return self.max_batch
        fps = {1: 1.0 / mean[1]}
        for b in range(2, self.max_batch + 1):
            rate = b / mean[b] if b in mean else fps[1]
            if rate < BATCH_GAIN_TOL * fps[1]:
                break
            fps[b] = rate
        if all(b not in mean for b in fps if b > 1):
            return max(fps)  # nothing measured beyond batch 1: no reason to hold batches back
        best = max(fps.values())
        return min(b for b, rate in fps.items() if rate >= BATCH_GAIN_TOL * best)

    def snapshot(self) -> dict[str, Any]:
        """Every estimate (averages, warm-up times, slowdown by load, fixed cap): what :meth:`restore`
        takes (a replica in another process)."""
        with self._lock:
            return {
                "mean": dict(self._mean),
                "dev": dict(self._dev),
                "quiet": dict(self._quiet),
                "ratio": dict(self._ratio),
                "limit": self.limit,
                "lanes": self.lanes,
            }

    def restore(self, snap: dict[str, Any]) -> None:
        """Replace every estimate by a :meth:`snapshot` of another cost model."""
        with self._lock:
            self._mean, self._dev = dict(snap["mean"]), dict(snap["dev"])
            self._cost = {b: m + self.spread * self._dev.get(b, 0.0) for b, m in self._mean.items()}
            self._quiet, self._ratio = dict(snap["quiet"]), dict(snap["ratio"])
            self.limit = snap["limit"]
            self.lanes = int(snap.get("lanes", 1))


@dataclass(frozen=True)
class PlanConfig:
    max_delay_s: float = 0.4  # bound on the output delay (lookahead + margin)
    utilisation: float = 0.95  # share of the model's measured throughput the plan may use
    # one session: its frames lie on an even grid, one at a time, and never wait for another
    # session's, so the plan may use more of the throughput (the margin keeps the spread)
    solo_utilisation: float = 0.98
    # admission: the utilisation measured in service, scaled per session to one more session, must
    # stay within this. It grows faster than the session count once lanes overlap and the cores fill:
    # on the 2-core VM (peers on the same cores) from 2 to 3 sessions it grew 1.5-1.8x; 3 sessions held
    # 95% fresh in 4 of 5 runs where 2 measured 0.47-0.51, and in 1 of 6 at 0.51-0.60 (docs/serving.md)
    observed_utilisation: float = 0.75
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
    # the bound, unless one frame alone cannot fit in it with room to spare (a model slower than about
    # 160 ms per frame): then the delay grows to what one frame needs, or no frame would be fresh
    one_frame = cfg.arrival_s + SLOW_FRAME_ROOM * cost.batch_s(1)
    max_margin = max(base_margin_s, cfg.max_delay_s - lookahead_s, one_frame)
    cap = cost.batch_cap()  # batches beyond it would cost throughput: the scheduler does not form them
    util = cfg.solo_utilisation if n == 1 else cfg.utilisation
    lanes = max(1, cost.lanes)  # the sessions' frames spread over the lanes
    fraction = min(1.0, util * cost.fps(min(cap, math.ceil(n / lanes))) / (FPS * n))
    while True:
        batch = max(1, min(cap, math.ceil(n * fraction / lanes)))  # frames per batch on one lane
        t_b = cost.batch_s(batch)  # with the spread: deadlines need the long batches too
        busy = min(1.0, FPS * n * fraction * cost.batch_s(batch, spread=False) / batch / lanes)  # per lane
        need = cfg.arrival_s + (1.0 + busy) * t_b
        if need <= max_margin or fraction <= 0.0:
            break
        if batch > 1:  # smaller batches first
            fraction = min(fraction, (batch - 1) * lanes / n)
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


class ObservedLoad:
    """The model's utilisation (model-busy seconds per second, averaged over its lanes) as measured in
    service, per session count, for admission. Windows of ``window_s`` (a window restarts when the
    count changes); a moving average per count, trusted after ``min_windows`` windows and kept when the
    count changes (sessions often arrive together, before their own count could be measured). A
    thinned plan (fraction < 1) is scaled up to the full rate. Thread-safe."""

    def __init__(self, window_s: float = 1.0, min_windows: int = 3, ema: float = 0.3):
        self.window_s, self.min_windows, self.ema = window_s, min_windows, ema
        self._lock = threading.Lock()
        self._mark: tuple[float, float, int] | None = None  # (time, busy seconds, sessions) at window start
        self._util: dict[int, tuple[float, int]] = {}  # sessions -> (full-rate utilisation EMA, windows)

    def update(self, now: float, busy_s: float, sessions: int, fraction: float = 1.0) -> None:
        """Called often (each plan lookup); closes a window every ``window_s``."""
        with self._lock:
            if self._mark is None or self._mark[2] != sessions:
                self._mark = (now, busy_s, sessions)  # a new count: a new window
                return
            t0, b0, _ = self._mark
            if now - t0 < self.window_s:
                return
            u = max(0.0, busy_s - b0) / (now - t0) / max(fraction, 1e-3)
            self._mark = (now, busy_s, sessions)
            if sessions > 0:
                old, k = self._util.get(sessions, (u, 0))
                self._util[sessions] = ((1 - self.ema) * old + self.ema * u, k + 1)

    def predicted(self, sessions: int, cost: CostModel) -> float | None:
        """Utilisation predicted for ``sessions``, from the most loaded session count measured (None
        while no count has a trusted measurement): per session as there, times the growth of the
        contention slowdown."""
        with self._lock:
            trusted = [(n, u) for n, (u, k) in self._util.items() if k >= self.min_windows]
        if not trusted:
            return None
        n, u = max(trusted)
        return u * sessions / n * cost.slowdown(sessions) / cost.slowdown(n)


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
