"""One model process for several media worker processes: the scheduler split over shared memory.

A host with many cores and one model cannot carry 100+ sessions of RTP in one event loop, so
``python -m rt_engine.serve --workers N`` runs N media worker processes (sessions, pacing, input
thread, codecs) and one model process (the :class:`~rt_engine.stream.scheduler.Scheduler` over the
one Runner). This module is the transport between them, free of any network code:

* :class:`ModelServer` (model process) owns the scheduler. Per worker it reads jobs and calls from
  the worker's pipe and writes frames into the worker's frame ring. It batches the jobs of all
  workers, so the batch size grows with the total session count.
* :class:`SchedulerClient` (media worker) has the scheduler interface the
  :class:`~rt_engine.stream.session.Engine` uses: ``submit``, ``call`` (named calls only:
  :data:`~rt_engine.stream.scheduler.MODEL_CALLS`), ``forget``, ``warm_up``, ``cost`` (a replica of the
  model's :class:`~rt_engine.stream.capacity.CostModel`), ``sessions_total`` (sessions of all
  workers), ``alive``, ``busy_s``, ``pending``.

Per worker, two rings in ``multiprocessing.shared_memory`` and one duplex pipe (the doorbell)::

    job ring   (worker writes, model reads)   slot: window [1,80,20] f32, pose [12] f32, due f8,
                                               submitted f8, session key i8, frame index i8 (6.5 KB)
    frame ring (model writes, worker reads)   slot: [H,W,3] u8, H*W*3 <= slot bytes (150 KB at 224 px)

Each ring has a header word, the sequence number its reader has consumed up to; the writer of
sequence ``s`` uses slot ``s % slots`` and writes only while ``s - consumed < slots`` (a full job
ring drops the job, a full frame ring drops the frame; both are counted). Readers copy a slot out
as soon as its doorbell arrives, so the rings stay nearly empty.

Pipe messages, worker -> model: ``("hello", worker, url)``, ``("reg", key, id0, id1)`` (a session's
identity features, once per session key: jobs carry none), ``("jobs", first_seq, n)``,
``("forget", key)``, ``("call", cid, name, args)``, ``("warm", cid, id0, id1)``, ``("beat", sessions)``.
Model -> worker: ``("ready", info)``, ``("frame", seq, key, index, computed_at, h, w)``,
``("drop", key, index, reason)``, ``("result", cid, ok, value)``, ``("stats", dict)`` (every
``STATS_S``: cost table, busy seconds, sessions per worker, model metrics).

Clocks: ``time.monotonic`` is system-wide on Linux (CLOCK_MONOTONIC), so due times cross processes
unchanged. Failure: a worker finds a dead model process by the end of its pipe (or stats older than
``DEAD_AFTER_S``): ``alive`` turns false and pending calls fail. The model process finds a dead worker
the same way and forgets its sessions' jobs.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from rt_engine.config import MEL_WINDOW
from rt_engine.inputs.audio import N_MELS
from rt_engine.stream.capacity import CostModel
from rt_engine.stream.scheduler import MODEL_CALLS, FrameJob, Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

KEY_ATTR = "_remote_key"  # a job owner's session key, set on the owner by SchedulerClient
FORGOTTEN = -1
POSE_DIM = 12
HEADER_BYTES = 64  # int64 [0]: sequence number consumed by the reader
JOB_SLOTS = 512  # about 20 s of one session's frames, 3.4 MB
FRAME_SLOTS = 32
FRAME_SLOT_BYTES = 512 * 512 * 3  # up to 512 px frames; pages are only backed once written
STATS_S = 0.1  # model -> worker stats period; worker -> model heartbeat period
OUTBOX = 1024  # messages queued to one worker beyond its pipe before they are dropped (about 10 s of frames)
_CLOSE = ("close",)  # tells a link's sender thread to finish
DEAD_AFTER_S = 3.0  # a model process whose stats stop this long counts as dead
JOB_DTYPE = np.dtype(
    [
        ("window", "<f4", (1, N_MELS, MEL_WINDOW)),  # [1,80,20] mel window
        ("pose", "<f4", (POSE_DIM,)),  # [12] pose code
        ("due", "<f8"),  # monotonic send time of the frame
        ("submitted", "<f8"),
        ("key", "<i8"),  # session key (per worker)
        ("index", "<i8"),  # video frame index
    ]
)


def _hang_up(conn: Connection) -> None:
    """Close a pipe end so that the other end reads EOF at once, even while a thread of this
    process is blocked reading it (a plain close would leave that socket open until the read ends)."""
    try:
        s = socket.socket(fileno=os.dup(conn.fileno()))
        s.shutdown(socket.SHUT_RDWR)
        s.close()
    except OSError:
        pass
    try:
        conn.close()
    except OSError:
        pass


# ---------------------------------------------------------------------------------- rings
class ShmRing:
    """Fixed-size slots in one shared-memory block, after a header holding the reader's position."""

    def __init__(self, shm: SharedMemory, dtype: np.dtype, slots: int, owner: bool):
        self.shm, self.owner = shm, owner
        self.n = slots
        self.consumed = np.ndarray((1,), np.int64, shm.buf, 0)  # written by the reader only
        self.slots = np.ndarray((slots,), dtype, shm.buf, HEADER_BYTES)

    @classmethod
    def create(cls, dtype: np.dtype, slots: int) -> ShmRing:
        shm = SharedMemory(create=True, size=HEADER_BYTES + slots * dtype.itemsize)
        ring = cls(shm, dtype, slots, owner=True)
        ring.consumed[0] = 0
        return ring

    @classmethod
    def attach(cls, name: str, dtype: np.dtype, slots: int) -> ShmRing:
        return cls(SharedMemory(name=name), dtype, slots, owner=False)

    @property
    def name(self) -> str:
        return self.shm.name

    def free(self, seq: int) -> bool:
        """Whether the writer may write sequence ``seq`` (its slot was consumed)."""
        return seq - int(self.consumed[0]) < self.n

    def close(self) -> None:
        """Detach (and, for the creator, unlink) the block. Views into it must be gone."""
        del self.consumed, self.slots
        try:
            self.shm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with the process
            log.debug("shared memory %s still viewed at close", self.shm.name)
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def frame_dtype() -> np.dtype:
    return np.dtype((np.uint8, FRAME_SLOT_BYTES))


@dataclass(frozen=True)
class RingNames:
    """The shared-memory blocks of one worker (created by the parent process)."""

    jobs: str
    frames: str


def create_rings() -> tuple[ShmRing, ShmRing]:
    """-> (job ring, frame ring) of one worker, owned (unlinked on close) by the caller."""
    return ShmRing.create(JOB_DTYPE, JOB_SLOTS), ShmRing.create(frame_dtype(), FRAME_SLOTS)


@dataclass(frozen=True)
class RemoteRunner:
    """What a media worker's Engine reads of the runner: its model config and description."""

    cfg: Any  # rt_engine.config.ModelConfig
    description: str

    def describe(self) -> str:
        return self.description


# ---------------------------------------------------------------------------------- model side
class _RemoteOwner:
    """One session of one worker, as the scheduler's job owner: identity features kept here."""

    def __init__(self, link: _Link, key: int, id0: torch.Tensor, id1: torch.Tensor):
        self.link, self.key = link, key
        self.sid = f"w{link.worker}:{key}"
        self.id0, self.id1 = id0, id1  # [1,id_dim], [1,C,7,7]

    def deliver(self, i: int, image: np.ndarray, computed_at: float) -> None:
        self.link.send_frame(self.key, i, image, computed_at)

    def dropped(self, i: int, reason: str) -> None:
        self.link.send(("drop", self.key, i, reason))


class _Link:
    """The model process's end of one worker: its pipe, rings and sessions."""

    def __init__(self, worker: int, conn: Connection, jobs: ShmRing, frames: ShmRing):
        self.worker, self.conn, self.jobs, self.frames = worker, conn, jobs, frames
        self.lock = threading.Lock()  # the frame ring's write position
        self.owners: dict[int, _RemoteOwner] = {}
        self.sessions = 0  # open sessions, by the worker's heartbeat
        self.url: str | None = None  # the worker's private HTTP address (routing by session id)
        self.frame_seq = 0
        self.dead = False
        self.frames_dropped_full = 0
        # messages to the worker go through a bounded outbox and a sender thread of their own: a worker
        # that stops reading fills its pipe and then its outbox, and only its own messages are dropped;
        # the model thread never blocks on it, so every other worker's sessions keep their frames
        self.outbox: queue.Queue = queue.Queue(OUTBOX)
        self.dropped_outbox = 0
        self._sender = threading.Thread(target=self._send_loop, name=f"rt-engine-send-{worker}", daemon=True)
        self._sender.start()

    def send(self, msg: tuple) -> None:
        if self.dead:
            return
        try:
            self.outbox.put_nowait(msg)
        except queue.Full:
            self.dropped_outbox += 1
            if self.dropped_outbox % 1000 == 1:
                log.warning("worker %d does not read its pipe: %d messages dropped", self.worker, self.dropped_outbox)

    def _send_loop(self) -> None:
        while not self.dead:
            try:
                msg = self.outbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if msg is _CLOSE:
                return
            try:
                self.conn.send(msg)
            except (OSError, EOFError, ValueError):
                self.dead = True

    def close(self) -> None:
        """Stop the sender (after what is queued) and mark the link dead."""
        try:
            self.outbox.put(_CLOSE, timeout=1.0)
        except queue.Full:
            pass
        self._sender.join(timeout=2.0)
        self.dead = True

    def send_frame(self, key: int, i: int, image: np.ndarray, computed_at: float) -> None:
        """image [H,W,3] u8 into the next frame slot, then its doorbell."""
        if self.dead:
            return
        h, w = image.shape[:2]
        with self.lock:
            seq = self.frame_seq
            if not self.frames.free(seq):
                self.frames_dropped_full += 1
                full = True
            else:
                full = False
                self.frames.slots[seq % self.frames.n][: h * w * 3] = image.reshape(-1)
                self.frame_seq = seq + 1
        if full:
            self.send(("drop", key, i, "frame_ring_full"))
        else:
            self.send(("frame", seq, key, i, computed_at, h, w))


class ModelServer:
    """Serves one :class:`Scheduler` to the media workers on ``links`` (model process side)."""

    def __init__(self, scheduler: Scheduler, links: list[tuple[Connection, ShmRing, ShmRing]]):
        self.scheduler = scheduler
        self.links = [_Link(k, c, j, f) for k, (c, j, f) in enumerate(links)]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._warm: concurrent.futures.Future | None = None
        self._warm_lock = threading.Lock()
        r = scheduler.runner
        self.info = {
            "cfg": r.cfg,
            "describe": r.describe(),
            "scheduler_cfg": scheduler.cfg,
            "workers": len(self.links),
            "pid": os.getpid(),
        }
        size = r.cfg.size
        if size * size * 3 > FRAME_SLOT_BYTES:
            raise ValueError(f"frames of {size} px do not fit a frame slot of {FRAME_SLOT_BYTES} bytes")
        if getattr(r.cfg, "pose_dim", POSE_DIM) != POSE_DIM:
            raise ValueError(f"the job ring carries {POSE_DIM} pose numbers, the model has {r.cfg.pose_dim}")

    def start(self) -> ModelServer:
        for link in self.links:
            link.send(("ready", self.info))
            t = threading.Thread(target=self._read, args=(link,), name=f"rt-engine-link-{link.worker}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._stats_loop, name="rt-engine-stats", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for link in self.links:
            link.close()
            _hang_up(link.conn)

    @property
    def live_workers(self) -> int:
        return sum(1 for link in self.links if not link.dead)

    def wait(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set, the scheduler died, or every worker is gone."""
        while not stop.wait(0.2):
            if not self.scheduler.alive or self.live_workers == 0:
                return

    # ------------------------------------------------------------------ per worker
    def _read(self, link: _Link) -> None:
        try:
            while not self._stop.is_set():
                msg = link.conn.recv()
                self._handle(link, msg)
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("worker %d: link failed", link.worker)
        if not self._stop.is_set():
            log.warning("worker %d is gone: forgetting its %d session(s)", link.worker, len(link.owners))
        link.dead = True
        for owner in list(link.owners.values()):
            self.scheduler.forget(owner)
        link.owners.clear()
        link.sessions = 0

    def _handle(self, link: _Link, msg: tuple) -> None:
        kind = msg[0]
        if kind == "jobs":
            self._take_jobs(link, msg[1], msg[2])
        elif kind == "beat":
            link.sessions = int(msg[1])
        elif kind == "reg":
            _, key, id0, id1 = msg
            link.owners[key] = _RemoteOwner(link, key, torch.from_numpy(id0), torch.from_numpy(id1))
        elif kind == "forget":
            owner = link.owners.pop(msg[1], None)
            if owner is not None:
                self.scheduler.forget(owner)
        elif kind == "call":
            _, cid, name, args = msg
            try:
                fut = self.scheduler.call(name, *args)
            except Exception as e:
                link.send(("result", cid, False, repr(e)))
                return
            fut.add_done_callback(lambda f, cid=cid: self._answer(link, cid, f))
        elif kind == "warm":
            _, cid, id0, id1 = msg
            with self._warm_lock:  # the first worker's warm-up serves them all
                if self._warm is None:
                    self._warm = self.scheduler.warm_up(torch.from_numpy(id0), torch.from_numpy(id1))
                fut = self._warm
            fut.add_done_callback(lambda f, cid=cid: self._answer(link, cid, f))
        elif kind == "hello":
            link.url = msg[2]
        else:
            log.warning("worker %d: unknown message %r", link.worker, kind)

    def _answer(self, link: _Link, cid: int, fut: concurrent.futures.Future) -> None:
        if fut.cancelled():
            link.send(("result", cid, False, "cancelled"))
        elif fut.exception() is not None:
            link.send(("result", cid, False, repr(fut.exception())))
        else:
            link.send(("result", cid, True, fut.result()))

    def _take_jobs(self, link: _Link, first: int, n: int) -> None:
        ring = link.jobs
        rows = [ring.slots[s % ring.n].copy() for s in range(first, first + n)]  # copy out, then free the slots
        ring.consumed[0] = first + n
        jobs = []
        for row in rows:
            owner = link.owners.get(int(row["key"]))
            if owner is None:  # forgotten meanwhile
                continue
            jobs.append(
                FrameJob(
                    owner,
                    int(row["index"]),
                    np.array(row["window"]),  # [1,80,20]
                    np.array(row["pose"]),  # [12]
                    float(row["due"]),
                    submitted=float(row["submitted"]),
                )
            )
        self.scheduler.submit(jobs)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        s = self.scheduler
        s.metrics.set("model_busy_seconds", s.busy_s)
        s.cost.load = sum(link.sessions for link in self.links if not link.dead)  # contention (capacity.py)
        return {
            "cost": s.cost.snapshot(),
            "busy_s": s.busy_s,
            "batches": s.batches,
            "frames": s.frames,
            "pending": s.pending(),
            "model_cpu_per_busy_s": s.model_cpu_per_busy_s,
            "alive": s.alive,
            "sessions": [link.sessions for link in self.links],
            "registered": [len(link.owners) for link in self.links],
            "urls": [link.url for link in self.links],
            "live": [not link.dead for link in self.links],
            "frames_dropped_ring_full": sum(link.frames_dropped_full for link in self.links),
            "messages_dropped_outbox": [link.dropped_outbox for link in self.links],
            "metrics": s.metrics.snapshot(),
        }

    def _stats_loop(self) -> None:
        while not self._stop.wait(STATS_S):
            st = self.stats()
            for link in self.links:
                link.send(("stats", st))


# ---------------------------------------------------------------------------------- worker side
class SchedulerClient:
    """A media worker's stand-in for the model process's :class:`Scheduler` (same interface)."""

    def __init__(self, worker: int, conn: Connection, names: RingNames):
        self.worker = worker
        self.conn = conn
        self.jobs = ShmRing.attach(names.jobs, JOB_DTYPE, JOB_SLOTS)
        self.frames = ShmRing.attach(names.frames, frame_dtype(), FRAME_SLOTS)
        self._send_lock = threading.Lock()  # the pipe and the job ring's write position
        self._job_seq = 0
        self._keys = itertools.count(1)
        self._lanes: dict[int, Any] = {}  # session key -> job owner (the Engine's lane)
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._cids = itertools.count(1)
        self._stats: dict = {}
        self._stats_at = 0.0
        self._ready = threading.Event()
        self._gone = False
        self.info: dict = {}
        self.cost = CostModel(8)
        self.cfg = SchedulerConfig()
        self.local_sessions = lambda: 0  # set by the server: the sessions open in this worker
        self.jobs_dropped_full = 0
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ control
    def start(self, timeout: float = 300.0) -> SchedulerClient:
        """Start the pipe reader and the heartbeat; wait for the model process's ``ready``."""
        for target, name in ((self._read, "rt-engine-model-link"), (self._beat, "rt-engine-beat")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if not self._ready.wait(timeout):
            raise TimeoutError(f"no model process answered within {timeout:g} s")
        if self._gone:
            raise ConnectionError("the model process is gone")
        self.cfg = self.info["scheduler_cfg"]
        self.cost = CostModel(self.cfg.max_batch)
        return self

    def announce(self, url: str | None) -> None:
        """Tell the model process this worker's private HTTP address (other workers route to it)."""
        self._send(("hello", self.worker, url))

    @property
    def runner(self) -> RemoteRunner:
        return RemoteRunner(self.info["cfg"], self.info["describe"])

    def stop(self, timeout: float = 10.0) -> None:
        self._gone = True
        self._fail_calls("scheduler client stopped")
        _hang_up(self.conn)
        self.jobs.close()
        self.frames.close()

    @property
    def alive(self) -> bool:
        return not self._gone and self._stats.get("alive", False) and time.monotonic() - self._stats_at < DEAD_AFTER_S

    # ------------------------------------------------------------------ scheduler interface
    def submit(self, jobs: list[FrameJob]) -> None:
        """Jobs into the job ring (identity features registered once per owner), then one doorbell."""
        if not jobs or self._gone:
            return
        with self._send_lock:
            first, n = self._job_seq, 0
            for j in jobs:
                key = getattr(j.owner, KEY_ATTR, None)
                if key == FORGOTTEN:  # a late submit of a closed (or barged-in) session
                    continue
                if key is None:
                    key = next(self._keys)
                    setattr(j.owner, KEY_ATTR, key)
                    self._lanes[key] = j.owner
                    self._send_locked(("reg", key, j.owner.id0.numpy(), j.owner.id1.numpy()))
                seq = first + n
                if not self.jobs.free(seq):
                    self.jobs_dropped_full += 1
                    j.owner.dropped(j.index, "job_ring_full")
                    continue
                slot = self.jobs.slots[seq % self.jobs.n]
                slot["window"] = j.window  # [1,80,20]
                slot["pose"] = j.pose  # [12]
                slot["due"], slot["submitted"] = j.due, j.submitted
                slot["key"], slot["index"] = key, j.index
                n += 1
            if n:
                self._job_seq = first + n
                self._send_locked(("jobs", first, n))

    def call(self, fn: str, *args: Any) -> concurrent.futures.Future:
        """A named model call (:data:`MODEL_CALLS`) in the model process; numpy arguments and results."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not isinstance(fn, str) or fn not in MODEL_CALLS:
            fut.set_exception(TypeError(f"a model process runs named calls only ({sorted(MODEL_CALLS)}), got {fn!r}"))
            return fut
        args = tuple(a.numpy() if isinstance(a, torch.Tensor) else a for a in args)
        return self._request(fut, lambda cid: ("call", cid, fn, args))

    def warm_up(self, id0: torch.Tensor, id1: torch.Tensor) -> concurrent.futures.Future:
        """The model process's warm-up (run once, whichever worker asks first)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        return self._request(fut, lambda cid: ("warm", cid, id0.numpy(), id1.numpy()))

    def forget(self, owner: Any) -> None:
        with self._send_lock:
            key = getattr(owner, KEY_ATTR, None)
            setattr(owner, KEY_ATTR, FORGOTTEN)  # from now on its jobs are not sent
            if key is None or key == FORGOTTEN:
                return
            self._lanes.pop(key, None)
            self._send_locked(("forget", key))

    def pending(self) -> int:
        return int(self._stats.get("pending", 0))

    def sessions_total(self, local: int) -> int:
        others = [n for k, n in enumerate(self._stats.get("sessions", [])) if k != self.worker]
        return local + sum(others)

    @property
    def busy_s(self) -> float:
        return float(self._stats.get("busy_s", 0.0))

    @property
    def model_cpu_per_busy_s(self) -> float:
        return float(self._stats.get("model_cpu_per_busy_s", 0.0))

    @property
    def model_metrics(self) -> tuple | None:
        return self._stats.get("metrics")

    def remote_stats(self) -> dict:
        """What the model process last reported (sessions per worker, batches, frames)."""
        st = self._stats
        return {
            "workers": self.info.get("workers"),
            "worker": self.worker,
            "model_pid": self.info.get("pid"),
            "worker_urls": st.get("urls"),
            "sessions_by_worker": st.get("sessions"),
            "registered_by_worker": st.get("registered"),
            "batches": st.get("batches"),
            "frames": st.get("frames"),
            "frames_dropped_ring_full": st.get("frames_dropped_ring_full", 0) + self.jobs_dropped_full,
        }

    def worker_url(self, worker: int) -> str | None:
        urls = self._stats.get("urls") or []
        return urls[worker] if 0 <= worker < len(urls) else None

    # ------------------------------------------------------------------ pipe
    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._send_locked(msg)

    def _send_locked(self, msg: tuple) -> None:
        if self._gone:
            return
        try:
            self.conn.send(msg)
        except (OSError, EOFError, ValueError):
            self._lost()

    def _request(self, fut: concurrent.futures.Future, make: Any) -> concurrent.futures.Future:
        if self._gone:
            fut.set_exception(ConnectionError("the model process is gone"))
            return fut
        cid = next(self._cids)
        self._calls[cid] = fut
        self._send(make(cid))
        return fut

    def _read(self) -> None:
        try:
            while True:
                msg = self.conn.recv()
                kind = msg[0]
                if kind == "frame":
                    self._take_frame(*msg[1:])
                elif kind == "drop":
                    lane = self._lanes.get(msg[1])
                    if lane is not None:
                        lane.dropped(msg[2], msg[3])
                elif kind == "stats":
                    self._stats, self._stats_at = msg[1], time.monotonic()
                    self.cost.restore(msg[1]["cost"])
                elif kind == "result":
                    _, cid, ok, value = msg
                    fut = self._calls.pop(cid, None)
                    if fut is not None and fut.set_running_or_notify_cancel():
                        if ok:
                            fut.set_result(value)
                        else:
                            fut.set_exception(RuntimeError(f"model process: {value}"))
                elif kind == "ready":
                    self.info = msg[1]
                    self._stats_at = time.monotonic()
                    self._ready.set()
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("model link failed")
        self._lost()

    def _take_frame(self, seq: int, key: int, i: int, computed_at: float, h: int, w: int) -> None:
        image = self.frames.slots[seq % self.frames.n][: h * w * 3].reshape(h, w, 3).copy()  # [H,W,3] u8
        self.frames.consumed[0] = seq + 1
        lane = self._lanes.get(key)
        if lane is not None:
            try:
                lane.deliver(i, image, computed_at)
            except Exception:
                log.exception("delivering frame %d failed", i)

    def _lost(self) -> None:
        if not self._gone:
            log.error("the model process is gone: no more frames; /health fails")
        self._gone = True
        self._ready.set()
        self._fail_calls("the model process is gone")

    def _fail_calls(self, why: str) -> None:
        calls, self._calls = self._calls, {}
        for fut in calls.values():
            if fut.set_running_or_notify_cancel():
                fut.set_exception(ConnectionError(why))

    def _beat(self) -> None:
        while not self._gone:
            try:
                n = int(self.local_sessions())
            except Exception:
                n = 0
            self._send(("beat", n))
            time.sleep(STATS_S)
