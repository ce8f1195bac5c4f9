"""The model worker: lanes of threads run the Runner for every session, batching frames across sessions.

Sessions submit :class:`FrameJob` s (frame index, mel window [1,80,20], pose code [12], due time).
The worker takes every pending job, orders them by due time (earliest deadline first) and forms
one batch, whatever session the jobs belong to. A batch is delivered as a whole when it ends, so
it is admitted by its end time: job k joins only when the measured time of a batch of k+1 frames
(:class:`~rt_engine.stream.capacity.CostModel`) still ends before the earliest due time in the
batch, and only up to the largest batch size that does not cost throughput (``batch_cap``); the
rest waits for the next batch. A job that could not be ready in time even alone (on the
average batch time) is dropped before it is computed (computing it would only make the following
frames late too). So no frame is computed and then thrown away as late while the model has the capacity; the metric
``frames_computed_late_total`` counts the exceptions (capacity exceeded, an estimate that was off).

    windows [B,1,80,20] --encode_audio--> mouth [B,500]
    id0 [B,id_dim], id1 [B,C,7,7] (stacked per row: identities differ per row), pose [B,12]
    --generate--> frames [B,3,H,W] -> uint8 [B,H,W,3] -> session.deliver(i, image)

**Lanes.** A runner that can run several model calls at once (OpenVINO: one inference stream of
one thread per lane, :meth:`~rt_engine.backends.base.Runner.set_lanes`) gets one worker thread per
lane; each free lane forms its own batch from the shared pending jobs by the rule above. On a small
model, lanes of one thread make more frames per second than one call spread over every thread (on
the 2-core VM of docs/serving.md, 114 against 84 generator frames/s), and a lane that the
media threads preempt delays only its own batch. The warm-up keeps the lanes only where one frame
on one lane fits in a frame period (40 ms); a large model (the official size) runs one lane over
every thread. ``SchedulerConfig.lanes`` (``--lanes``) fixes the number instead.

When compute keeps up every batch holds about one frame per session; when it falls behind, the
sessions lengthen their delay and thin their frames (:mod:`rt_engine.stream.capacity`), and late
jobs are dropped, never queued up (no drift, no growing latency). Other model work (identity
features, pose codes) runs through :meth:`call`, in a lane's thread, between batches: frame
batches go first, a call waits at most ``CALL_WAIT_S``. Besides closures, :meth:`Scheduler.call` takes
the name of one of :data:`MODEL_CALLS`, whose arguments and results are numpy arrays: only those can
also cross into a model process (:mod:`rt_engine.stream.remote`).

:class:`Metrics` is a tiny thread-safe registry, exposed in the Prometheus text format by
prometheus_client.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from rt_engine.backends.base import MouthGain, Runner
from rt_engine.config import FPS, MEL_WINDOW, NoiseMode, check_mouth_gain, noise_mode
from rt_engine.errors import ConfigError
from rt_engine.inputs.audio import N_MELS
from rt_engine.inputs.image import to_tensor, to_uint8
from rt_engine.stream.capacity import CostModel

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)
CALL_WAIT_S = 0.25  # longest a non-frame model call (identity, pose) waits behind frame batches
PROBE_S = 1.0  # with nothing run for this long, the newest job runs even if the estimate says it is late
LANE_FRAME_S = 1.0 / FPS  # lanes are kept only where one frame on one lane takes at most a frame period
LANE_SYNC_S = 120.0  # longest the lanes wait for one another in the warm-up (a lane that died breaks it)


class Metrics:
    """Counters, gauges and histograms with labels; ``render()`` gives Prometheus text."""

    def __init__(self, prefix: str = "rt_engine"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self._gauges: dict[tuple[str, tuple], float] = {}
        self._hist: dict[tuple[str, tuple], list] = {}  # -> [bucket bounds, counts, sum, count]
        self._help: dict[str, tuple[str, str]] = {}

    @staticmethod
    def _key(name: str, labels: dict[str, Any]) -> tuple[str, tuple]:
        return name, tuple(sorted((k, str(v)) for k, v in labels.items()))

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, value: float = 1.0, **labels: Any) -> None:
        with self._lock:
            self._counters[self._key(name, labels)] += value

    def set(self, name: str, value: float, **labels: Any) -> None:
        with self._lock:
            self._gauges[self._key(name, labels)] = float(value)

    def observe(self, name: str, value: float, buckets: tuple = LATENCY_BUCKETS, **labels: Any) -> None:
        with self._lock:
            h = self._hist.get(self._key(name, labels))
            if h is None:
                h = self._hist[self._key(name, labels)] = [buckets, [0] * len(buckets), 0.0, 0]
            for j, b in enumerate(h[0]):
                if value <= b:
                    h[1][j] += 1
            h[2] += value
            h[3] += 1

    def snapshot(self) -> tuple[dict, dict, dict, dict]:
        """A copy of everything recorded (picklable): -> (counters, gauges, histograms, help)."""
        with self._lock:
            hists = {k: [b, list(c), t, n] for k, (b, c, t, n) in self._hist.items()}
            return dict(self._counters), dict(self._gauges), hists, dict(self._help)

    def merged(self, snap: tuple[dict, dict, dict, dict]) -> Metrics:
        """A new registry holding this one plus a :meth:`snapshot` of another (counters and histograms
        of the same name and labels add up; the snapshot's gauges win)."""
        out = Metrics(self.prefix)
        counters, gauges, hists, helps = self.snapshot()
        out._counters.update(counters)
        out._gauges.update(gauges)
        out._hist.update(hists)
        out._help.update(helps)
        o_counters, o_gauges, o_hists, o_help = snap
        for k, v in o_counters.items():
            out._counters[k] += v
        out._gauges.update(o_gauges)
        for k, (b, c, t, n) in o_hists.items():
            h = out._hist.get(k)
            if h is not None and tuple(h[0]) == tuple(b):
                h[1] = [x + y for x, y in zip(h[1], c, strict=True)]
                h[2] += t
                h[3] += n
            else:
                out._hist[k] = [b, list(c), t, n]
        for k, v in o_help.items():
            out._help.setdefault(k, v)
        return out

    def counter(self, name: str, **labels: Any) -> float:
        with self._lock:
            return self._counters.get(self._key(name, labels), 0.0)

    def render(self) -> str:
        """Everything in the Prometheus text format (prometheus_client's exposition; sample names
        are ``<prefix>_<name>``, histograms add ``_bucket`` / ``_sum`` / ``_count``)."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(self))
        return generate_latest(registry).decode()

    def families(self) -> list:
        """A snapshot as prometheus_client metric families (counter, gauge, histogram)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self._lock:
            counters = sorted(self._counters.items())
            gauges = sorted(self._gauges.items())
            hists = sorted((k, (b, list(c), t, n)) for k, (b, c, t, n) in self._hist.items())
        fams: dict[str, Any] = {}

        def family(name: str, cls: type, labels: tuple):
            if name not in fams:
                text = self._help.get(name, ("", name.replace("_", " ")))[1]
                fams[name] = cls(f"{self.prefix}_{name}", text, labels=[k for k, _ in labels])
            return fams[name]

        for (name, labels), v in counters:
            family(name, CounterMetricFamily, labels).add_metric([v for _, v in labels], v)
        for (name, labels), v in gauges:
            family(name, GaugeMetricFamily, labels).add_metric([v for _, v in labels], v)
        for (name, labels), (bounds, counts, total, n) in hists:
            buckets = [(f"{b:g}", c) for b, c in zip(bounds, counts, strict=True)] + [("+Inf", n)]
            family(name, HistogramMetricFamily, labels).add_metric([v for _, v in labels], buckets, total)
        return list(fams.values())


class _Families:
    """prometheus_client collector over one :class:`Metrics` (read at each scrape)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        return iter(self.metrics.families())


# ---------------------------------------------------------------------------------- named model calls
def _encode_identity(r: Runner, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """image [1,3,224,224] f32 in [-1,1] -> (id0 [1,id_dim], id1 [1,C,7,7]) f32."""
    id0, id1 = r.encode_identity(torch.from_numpy(np.ascontiguousarray(image, np.float32)))
    return id0.numpy(), id1.numpy()


def _encode_pose(r: Runner, image: np.ndarray) -> np.ndarray:
    """images [N,3,224,224] f32 in [-1,1] -> pose codes [N,12]."""
    return r.encode_pose(torch.from_numpy(np.ascontiguousarray(image, np.float32))).numpy()


def _encode_poses(r: Runner, crops: np.ndarray) -> np.ndarray:
    """aligned crops [N,224,224,3] u8 -> pose codes [N,12], 16 at a time."""
    x = to_tensor(crops)  # [N,3,224,224]
    return np.concatenate([r.encode_pose(x[s : s + 16]).numpy() for s in range(0, len(x), 16)])


def _idle_codes(r: Runner, crop: np.ndarray) -> np.ndarray:
    """identity crop [H,W,3] u8 -> 10 s of idle motion codes [250,12] (forward and backward)."""
    from rt_engine.stream import sources

    return sources.idle_codes(crop, lambda c: _encode_poses(r, c), seconds=10.0)


# The model work a session may ask for besides frames, by name: arguments and results are numpy arrays,
# so a call can be shipped to a model process (rt_engine.stream.remote) as well as run in this thread.
MODEL_CALLS: dict[str, Callable[..., Any]] = {
    "encode_identity": _encode_identity,
    "encode_pose": _encode_pose,
    "encode_poses": _encode_poses,
    "idle_codes": _idle_codes,
}


def _named_call(fn: Callable[..., Any], args: tuple, r: Runner) -> Any:
    return fn(r, *args)


class JobOwner(Protocol):
    """What the scheduler needs from a session."""

    sid: str
    id0: torch.Tensor  # [1,id_dim]
    id1: torch.Tensor  # [1,C,7,7]

    def deliver(self, i: int, image: np.ndarray, computed_at: float) -> None: ...

    def dropped(self, i: int, reason: str) -> None: ...


@dataclass
class FrameJob:
    owner: JobOwner
    index: int  # video frame index i
    window: np.ndarray  # [1,80,20] mel window
    pose: np.ndarray  # [12]
    due: float  # wall time (monotonic) when the frame is sent
    submitted: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 8
    noise: str = NoiseMode.STORED
    late_grace_s: float = 0.0  # a job may still run this long after its due time
    mouth_gain: float = 1.0  # how far the mouth moves, 1 = as trained (backends.base.MouthGain)
    lanes: int = 0  # model calls at once (0: as many as the runner offers for the threads, kept if fast enough)

    def validate(self) -> SchedulerConfig:
        if not 1 <= self.max_batch <= 64:
            raise ConfigError(f"scheduler.max_batch must be in [1, 64], got {self.max_batch}")
        if not isinstance(self.lanes, int) or not 0 <= self.lanes <= 64:
            raise ConfigError(f"scheduler.lanes must be an integer in [0, 64] (0: auto), got {self.lanes!r}")
        noise_mode(self.noise, "scheduler.noise")
        check_mouth_gain(self.mouth_gain, "scheduler.mouth_gain")
        return self


class Scheduler:
    """Owns the Runner; everything that touches the model goes through its lane threads (one, unless
    the runner runs several calls at once: see the module doc)."""

    def __init__(
        self, runner: Runner, cfg: SchedulerConfig | None = None, metrics: Metrics | None = None, threads: int = 0
    ):
        self.runner = runner
        self.cfg = (cfg or SchedulerConfig()).validate()
        self.mouth_gain = MouthGain(self.cfg.mouth_gain)
        self.metrics = metrics or Metrics()
        self.threads = threads
        self._jobs: list[FrameJob] = []
        self._calls: list[tuple[Callable[[Runner], Any], concurrent.futures.Future, float]] = []
        self._cv = threading.Condition()
        self._stop = False
        self._threads: list[threading.Thread] = []
        # lanes: the runner's calls that may run at once, each in its own thread (module doc)
        self.cost = CostModel(self.cfg.max_batch)  # seconds per batch by size (drives admission of jobs)
        set_lanes = getattr(runner, "set_lanes", None)  # Runner subclasses have it (duck-typed ones may not)
        want = self.cfg.lanes or max(1, threads or torch.get_num_threads())
        self.cost.lanes = set_lanes(want) if set_lanes is not None else 1
        self._lanes_fixed = bool(self.cfg.lanes)  # else the warm-up may fall back to one lane
        # per lane: its part of a warm-up, with the future of the whole (lane 0) or None
        self._lane_calls: list[list[tuple[Callable[[Runner, int], None], concurrent.futures.Future | None]]] = [
            [] for _ in range(self.lanes)
        ]
        self.batches = 0
        self.frames = 0
        self.busy_s = 0.0  # model-busy seconds, averaged over the lanes (busy_s / wall time = utilisation)
        self.model_cpu_per_busy_s = 0.0  # measured by warm_up
        self._last_run = time.monotonic()

    @property
    def cost_per_frame_s(self) -> float:
        """Estimated model seconds for a batch of one frame (0 before any was measured)."""
        return self.cost.batch_s(1)

    @property
    def lanes(self) -> int:
        """Model calls that run at once, each in its own thread (kept by the cost model, which counts
        its frames/s over them)."""
        return self.cost.lanes

    # ------------------------------------------------------------------ control
    def start(self) -> Scheduler:
        if not self._threads:
            for lane in range(self.lanes):
                name = "rt-engine-model" + (f"-{lane}" if lane else "")
                th = threading.Thread(target=self._loop, args=(lane,), name=name, daemon=True)
                th.start()
                self._threads.append(th)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for th in self._threads:
            th.join(timeout)
        self._threads = []
        with self._cv:
            for _, fut, _ in self._calls:
                fut.cancel()
            self._calls.clear()
            for calls in self._lane_calls:
                for _, fut in calls:
                    if fut is not None:
                        fut.cancel()
                calls.clear()
            self._jobs.clear()

    @property
    def thread_ids(self) -> list[int]:
        """The native (OS) ids of the lane threads that run."""
        return [th.native_id for th in self._threads if th.native_id is not None and th.is_alive()]

    @property
    def alive(self) -> bool:
        """Lane 0 runs (the others may have ended after a warm-up fell back to one lane)."""
        return bool(self._threads) and self._threads[0].is_alive()

    # ------------------------------------------------------------------ input
    def submit(self, jobs: list[FrameJob]) -> None:
        if not jobs:
            return
        with self._cv:
            self._jobs.extend(jobs)
            self._cv.notify()

    def call(self, fn: Callable[[Runner], Any] | str, *args: Any) -> concurrent.futures.Future:
        """Run ``fn(runner)`` in a lane's thread; returns a Future (wrap with asyncio.wrap_future).
        ``fn`` may also be the name of one of :data:`MODEL_CALLS`, run as ``MODEL_CALLS[fn](runner, *args)``."""
        if isinstance(fn, str):
            if fn not in MODEL_CALLS:
                raise KeyError(f"unknown model call {fn!r}; known: {sorted(MODEL_CALLS)}")
            fn = functools.partial(_named_call, MODEL_CALLS[fn], args)
        elif args:
            raise TypeError("arguments go with a named call only")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stop:
                fut.set_exception(RuntimeError("scheduler stopped"))
                return fut
            self._calls.append((fn, fut, time.monotonic()))
            self._cv.notify()
        return fut

    def warm_up(self, id0: torch.Tensor, id1: torch.Tensor) -> concurrent.futures.Future:
        """Run every batch size the scheduler can form three times on every lane at once: the first
        call takes any first-call cost of a runner (OpenVINO compiles and allocates per shape) out of
        the stream, the faster of the other two, averaged over the lanes, seeds the cost model (one
        timing alone, taken while the server starts, moved the batch cap between 1 and 4 from one
        start to the next), so the first sessions are planned on measured figures. First, with
        several lanes and ``SchedulerConfig.lanes`` at auto, one frame is timed on one lane alone
        (fastest of three); slower than :data:`LANE_FRAME_S`, the runner goes back to one lane over
        every thread."""

        def time_sizes(r: Runner, lane: int, sync: threading.Barrier, best: dict) -> tuple[float, float]:
            """-> (wall, process CPU) seconds of this lane's timed calls; best[(lane, b)] = fastest."""
            wall = cpu = 0.0
            for b in range(1, self.cfg.max_batch + 1):
                best[lane, b] = float("inf")
                for timed in (False, True, True):
                    sync.wait()  # the lanes' calls overlap as they will in service
                    t0, c0 = time.monotonic(), time.process_time()
                    self._compute(r, id0, id1, torch.zeros(b, 1, N_MELS, MEL_WINDOW), torch.zeros(b, r.cfg.pose_dim))
                    if timed:
                        best[lane, b] = min(best[lane, b], time.monotonic() - t0)
                        wall, cpu = wall + time.monotonic() - t0, cpu + time.process_time() - c0
            sync.wait()
            return wall, cpu

        def run(r: Runner) -> None:  # in lane 0: it alone may end the others
            if self.lanes > 1 and not self._lanes_fixed:
                alone = float("inf")
                for k in range(4):  # the first call compiles; the fastest of the other three counts
                    t0 = time.monotonic()
                    self._compute(r, id0, id1, torch.zeros(1, 1, N_MELS, MEL_WINDOW), torch.zeros(1, r.cfg.pose_dim))
                    alone = min(alone, time.monotonic() - t0) if k else alone
                if alone > LANE_FRAME_S:
                    log.info(
                        "one frame on one of %d lanes takes %.1f ms (> %.0f ms): one lane over every thread",
                        self.lanes,
                        1e3 * alone,
                        1e3 * LANE_FRAME_S,
                    )
                    self._set_lanes(1)
            lanes = self.lanes
            sync = threading.Barrier(lanes, timeout=LANE_SYNC_S)
            best: dict[tuple[int, int], float] = {}
            errors: list[BaseException] = []

            def other(r: Runner, lane: int) -> None:
                try:
                    time_sizes(r, lane, sync, best)
                except BaseException as e:  # noqa: BLE001 - reported by lane 0
                    errors.append(e)
                    sync.abort()

            with self._cv:
                for lane in range(1, lanes):
                    self._lane_calls[lane].append((other, None))
                self._cv.notify_all()
            try:
                wall, cpu = time_sizes(r, 0, sync, best)
            except threading.BrokenBarrierError:
                raise (errors[0] if errors else RuntimeError("a model lane did not take part in the warm-up")) from None
            for b in range(1, self.cfg.max_batch + 1):
                self.cost.set(b, sum(best[lane, b] for lane in range(lanes)) / lanes)
            self.cost.limit = None
            self.cost.limit = self.cost.batch_cap()  # fixed: sizes above it are never formed
            keep = getattr(r, "keep_batches", None)  # Runner subclasses have it (duck-typed ones may not)
            if keep is not None:
                keep(self.cost.limit)
            # process CPU seconds per model-busy second (every lane busy), with nothing else running:
            # lets a benchmark tell the model's share of the server's CPU from the rest
            self.model_cpu_per_busy_s = cpu / wall if wall > 0 else 0.0
            log.info(
                "model seconds per batch size (each of %d lane(s)): %s; batches of up to %d frames",
                lanes,
                ", ".join(f"{b}: {1e3 * t:.1f} ms" for b, t in self.cost.table().items()),
                self.cost.limit,
            )

        fut: concurrent.futures.Future = concurrent.futures.Future()

        def lead(r: Runner, lane: int) -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(run(r))
                except BaseException as e:  # handed to the caller
                    fut.set_exception(e)

        with self._cv:
            if self._stop:
                fut.set_exception(RuntimeError("scheduler stopped"))
                return fut
            self._lane_calls[0].append((lead, fut))
            self._cv.notify_all()
        return fut

    def _set_lanes(self, n: int) -> None:
        """Fewer lanes (called in lane 0, in the warm-up): lanes >= n finish their batch and end, then
        the runner drops what it held for them."""
        with self._cv:
            self.cost.lanes = n
            self._cv.notify_all()
        for th in self._threads[n:]:
            th.join(LANE_SYNC_S)
        self._threads = self._threads[:n]
        got = self.runner.set_lanes(n)  # it has lanes beyond one: it has set_lanes
        with self._cv:
            self.cost.lanes = got

    def forget(self, owner: JobOwner) -> None:
        """Remove a closed session's pending jobs."""
        with self._cv:
            self._jobs = [j for j in self._jobs if j.owner is not owner]

    def pending(self) -> int:
        with self._cv:
            return len(self._jobs)

    def sessions_total(self, local: int) -> int:
        """Sessions this scheduler serves, given ``local`` open in the caller's process (one process:
        the same; a model process adds those of the other media workers)."""
        return local

    @property
    def model_metrics(self) -> tuple | None:
        """A :meth:`Metrics.snapshot` of model-side metrics kept elsewhere; None: they are in ``metrics``."""
        return None

    # ------------------------------------------------------------------ worker
    def _loop(self, lane: int = 0) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        use_lane = getattr(self.runner, "use_lane", None)
        if use_lane is not None:
            use_lane(lane)  # this thread's share of the runner (its inference requests)
        while True:
            with self._cv:
                while (
                    not self._stop
                    and lane < self.lanes
                    and not self._lane_calls[lane]
                    and not self._jobs
                    and not self._calls
                ):
                    self._cv.wait()
                if self._stop or lane >= self.lanes:
                    return
                if self._lane_calls[lane]:  # this lane's part of a warm-up
                    mine, _ = self._lane_calls[lane].pop(0)
                    self._cv.release()
                    try:
                        mine(self.runner, lane)
                    finally:
                        self._cv.acquire()
                    continue
                # frames first; other model work when idle or once it has waited CALL_WAIT_S
                urgent = self._calls and (not self._jobs or time.monotonic() - self._calls[0][2] > CALL_WAIT_S)
                call = self._calls.pop(0) if urgent else None
                jobs: list[FrameJob] = []
                if call is None:
                    jobs, self._jobs = self._select(self._jobs)
                if (jobs or call is not None) and (self._jobs or self._calls) and self.lanes > 1:
                    self._cv.notify()  # work left for a free lane (submit and call wake only one)
            if call is not None:
                fn, fut, _ = call
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.runner))
                    except BaseException as e:  # handed to the caller
                        fut.set_exception(e)
                del call, fn, fut  # while idle, hold nothing of a finished call (it may own a session)
                continue
            if jobs:
                self._run(jobs)
            del jobs  # nor of the last batch: a closed session is freed when it closes, not at the next batch

    def _select(self, pending: list[FrameJob]) -> tuple[list[FrameJob], list[FrameJob]]:
        """-> (this batch, still pending). Jobs that cannot be ready in time are dropped here."""
        now = time.monotonic()
        grace = self.cfg.late_grace_s
        batch: list[FrameJob] = []
        rest: list[FrameJob] = []
        late: list[FrameJob] = []
        batch_deadline = float("inf")  # earliest due time in the batch: the whole batch must end by then
        cap = self.cost.batch_cap()  # <= max_batch: larger batches would make fewer frames/s
        for j in sorted(pending, key=lambda j: j.due):
            deadline = j.due + grace
            # not even alone, not now, on average: waiting only makes it later (the average, not the
            # cautious estimate: a frame that is likely in time is computed rather than thrown away)
            if now + self.cost.batch_s(1, spread=False) > deadline:
                late.append(j)
            elif len(batch) < cap and now + self.cost.batch_s(len(batch) + 1) <= min(batch_deadline, deadline):
                batch.append(j)
                batch_deadline = min(batch_deadline, deadline)
            else:
                rest.append(j)
        if not batch and late and now - self._last_run > PROBE_S:
            # nothing ran for a while: run the newest unexpired job anyway, so that an estimate that is
            # too high (a slow first call, a busy moment) is measured again instead of starving the stream
            newest = late[-1]
            if newest.due + grace >= now:
                batch.append(late.pop())
        for j in late:
            try:
                j.owner.dropped(j.index, "late")
            except Exception:
                log.exception("session %s: drop notification failed", j.owner.sid)
            self.metrics.inc("frames_dropped_total", reason="late_compute")
        return batch, rest

    def _compute(
        self, r: Runner, id0: torch.Tensor, id1: torch.Tensor, wins: torch.Tensor, pose: torch.Tensor
    ) -> np.ndarray:
        """wins [B,1,80,20], pose [B,12], id0 [B|1,id_dim], id1 [B|1,C,7,7] -> images [B,H,W,3] uint8."""
        mouth = self.mouth_gain(r, r.encode_audio(wins))  # [B,500]
        generate_uint8 = getattr(r, "generate_uint8", None)  # Runner subclasses have it (duck-typed ones may not)
        if generate_uint8 is not None:  # the conversion inside the model call (in the graph for OpenVINO)
            return generate_uint8(id0, id1, mouth, pose, noise=self.cfg.noise)  # [B,H,W,3]
        return to_uint8(r.generate(id0, id1, mouth, pose, noise=self.cfg.noise))  # [B,3,H,W] -> [B,H,W,3]

    def _run(self, jobs: list[FrameJob]) -> None:
        t0 = time.monotonic()
        for j in jobs:
            self.metrics.observe("stage_latency_seconds", t0 - j.submitted, stage="queue")
        try:
            wins = torch.from_numpy(np.stack([j.window for j in jobs]))  # [B,1,80,20]
            pose = torch.from_numpy(np.stack([j.pose for j in jobs]).astype(np.float32))  # [B,12]
            owners = [j.owner for j in jobs]
            if all(o is owners[0] for o in owners):
                id0, id1 = owners[0].id0, owners[0].id1  # [1,...] broadcast
            else:
                id0 = torch.cat([o.id0 for o in owners])  # [B,id_dim]
                id1 = torch.cat([o.id1 for o in owners])  # [B,C,7,7]
            images = self._compute(self.runner, id0, id1, wins, pose)  # [B,H,W,3]
        except Exception:
            log.exception("model batch of %d frames failed; dropping them", len(jobs))
            for j in jobs:
                j.owner.dropped(j.index, "error")
                self.metrics.inc("frames_dropped_total", reason="model_error")
            return
        t1 = time.monotonic()
        with self._cv:  # lanes finish batches concurrently
            self._last_run = t1
            self.batches += 1
            self.frames += len(jobs)
            self.busy_s += (t1 - t0) / self.lanes
        self.cost.observe(len(jobs), t1 - t0)
        late = sum(1 for j in jobs if t1 > j.due + self.cfg.late_grace_s)
        if late:
            self.metrics.inc("frames_computed_late_total", late)
        self.metrics.observe("stage_latency_seconds", t1 - t0, stage="model")
        self.metrics.observe("batch_size", len(jobs), buckets=BATCH_BUCKETS)
        self.metrics.inc("frames_generated_total", len(jobs))
        for j, img in zip(jobs, images, strict=True):
            try:
                j.owner.deliver(j.index, img, t1)
            except Exception:  # one broken session must not stop the worker
                log.exception("delivering frame %d to session %s failed", j.index, j.owner.sid)
