"""Media worker processes and one model process (``python -m rt_engine.serve --workers N``).

* the shared-memory transport in one process (ModelServer and SchedulerClient over a real pipe and
  real rings), with a fake runner whose frames show which session and frame they were made for;
* two real aiortc peers on two media workers of one server, batched by its one model process;
* a killed model process: every worker's /health turns 503 and offers are refused; SIGTERM of the
  parent ends every child and unlinks the shared memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rt_engine.stream.remote import ModelServer, RingNames, SchedulerClient, create_rings
from rt_engine.stream.scheduler import FrameJob, Metrics, Scheduler, SchedulerConfig

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------- transport
class FakeRunner:
    """Frames [B,3,16,16] whose pixels are (identity value + pose[0]) / 255 * 2 - 1: each frame says
    which session (id0[0,0]) and which frame (pose[0]) it was made for."""

    cfg = SimpleNamespace(size=16, pose_dim=12, name="fake")

    def describe(self) -> str:
        return "fake"

    def encode_audio(self, wins: torch.Tensor) -> torch.Tensor:  # [B,1,80,20] -> [B,500]
        return torch.zeros(wins.shape[0], 500)

    def generate(self, id0, id1, mouth, pose, noise=None) -> torch.Tensor:  # -> [B,3,16,16]
        v = (id0[:, 0] + pose[:, 0]).expand(pose.shape[0])  # [B]
        return (v / 255 * 2 - 1)[:, None, None, None].expand(-1, 3, 16, 16).contiguous()

    def encode_identity(self, x: torch.Tensor):  # [1,3,224,224] -> ([1,4], [1,2,7,7])
        return torch.full((1, 4), float(x.mean())), torch.zeros(1, 2, 7, 7)

    def encode_pose(self, x: torch.Tensor) -> torch.Tensor:  # [N,3,224,224] -> [N,12]
        return torch.arange(x.shape[0], dtype=torch.float32)[:, None].repeat(1, 12)


class Lane:
    def __init__(self, base: float):
        self.sid = f"lane{base:g}"
        self.id0, self.id1 = torch.full((1, 4), base), torch.zeros(1, 2, 7, 7)
        self.frames: dict[int, np.ndarray] = {}
        self.drops: dict[int, str] = {}
        self.got = concurrent.futures.Future()
        self.want = 0

    def deliver(self, i: int, image: np.ndarray, computed_at: float) -> None:
        self.frames[i] = image
        self._check()

    def dropped(self, i: int, reason: str) -> None:
        self.drops[i] = reason
        self._check()

    def _check(self) -> None:
        if len(self.frames) + len(self.drops) >= self.want and not self.got.done():
            self.got.set_result(None)


def _jobs(lane: Lane, idx: range, due: float) -> list[FrameJob]:
    return [FrameJob(lane, i, np.zeros((1, 80, 20), np.float32), np.full(12, i, np.float32), due) for i in idx]


def test_shared_memory_round_trip_jobs_frames_drops_and_calls():
    """Jobs of two sessions through the job ring into one scheduler, frames back through the frame
    ring to the right session with the right content, late jobs back as drops, named calls answered,
    forgotten sessions get nothing, and a closed model end makes the client dead."""
    ctx = multiprocessing.get_context("spawn")
    (jobs_ring, frames_ring), (a, b) = create_rings(), ctx.Pipe(duplex=True)
    sched = Scheduler(FakeRunner(), SchedulerConfig(max_batch=8), Metrics()).start()
    server = ModelServer(sched, [(a, jobs_ring, frames_ring)]).start()
    client = SchedulerClient(0, b, RingNames(jobs_ring.name, frames_ring.name)).start(timeout=10)
    try:
        assert client.runner.describe() == "fake" and client.cfg.max_batch == 8
        x = np.full((1, 3, 224, 224), 0.5, np.float32)
        id0, id1 = client.call("encode_identity", x).result(10)
        assert id0.shape == (1, 4) and np.allclose(id0, 0.5) and id1.shape == (1, 2, 7, 7)
        assert client.call("encode_pose", np.zeros((3, 3, 224, 224), np.float32)).result(10)[:, 0].tolist() == [0, 1, 2]
        with pytest.raises(TypeError, match="named calls only"):
            client.call("nope").result(10)  # not a named call: refused before it is sent
        with pytest.raises(TypeError):
            client.call(lambda r: r).result(10)  # closures cannot cross processes

        s1, s2 = Lane(100.0), Lane(200.0)
        s1.want = s2.want = 20
        due = time.monotonic() + 5.0
        client.submit(_jobs(s1, range(10), due) + _jobs(s2, range(10), due))
        client.submit(_jobs(s1, range(10, 20), time.monotonic() - 1.0))  # already late: dropped
        client.submit(_jobs(s2, range(10, 20), due))
        s1.got.result(10)
        s2.got.result(10)
        for base, lane in ((100, s1), (200, s2)):
            for i, img in lane.frames.items():
                assert img.shape == (16, 16, 3) and img.dtype == np.uint8
                assert abs(int(img[0, 0, 0]) - (base + i)) <= 1, (base, i, img[0, 0, 0])
        assert sorted(s1.frames) == list(range(10)) and set(s1.drops) == set(range(10, 20))
        assert set(s1.drops.values()) == {"late"}
        assert sorted(s2.frames) == list(range(20)) and not s2.drops
        assert sched.batches < 30  # the jobs of both sessions were batched together

        # a forgotten session gets nothing more; the other goes on
        client.forget(s1)
        s2.want = 30
        s2.got = concurrent.futures.Future()
        client.submit(_jobs(s1, range(30, 40), time.monotonic() + 5) + _jobs(s2, range(20, 30), time.monotonic() + 5))
        s2.got.result(10)
        time.sleep(0.2)
        assert sorted(s1.frames) == list(range(10)) and sorted(s2.frames) == list(range(30))

        deadline = time.monotonic() + 5
        while not client.alive or client.remote_stats()["frames"] != sched.frames:  # stats every 0.1 s
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.remote_stats()["registered_by_worker"] == [1]  # s2 only: s1 was forgotten
        assert jobs_ring.consumed[0] == 50  # every job slot read back; the forgotten session sent none
        server.stop()  # the model end goes away: the client notices and fails what is asked from now on
        pending = client.call("encode_identity", x)
        with pytest.raises(ConnectionError):
            pending.result(5)
        deadline = time.monotonic() + 5
        while client.alive:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        server.stop()
        sched.stop()
        client.stop()
        jobs_ring.close()
        frames_ring.close()


def test_a_worker_that_stops_reading_never_blocks_the_model():
    """The model process writes to each worker through a bounded outbox and a sender thread: a worker
    that stops reading fills its pipe, then its outbox, and only its own messages are dropped; the
    caller (the model thread, delivering every worker's frames) never blocks."""
    from rt_engine.stream.remote import OUTBOX, _Link

    a, b = multiprocessing.get_context("spawn").Pipe(duplex=True)  # b: a worker that never reads
    jobs_ring, frames_ring = create_rings()
    link = _Link(0, a, jobs_ring, frames_ring)
    try:
        t0 = time.monotonic()
        for _ in range(OUTBOX + 500):
            link.send(("stats", {"pad": b"x" * 8192}))
        assert time.monotonic() - t0 < 5.0  # no call waited for the pipe
        assert link.dropped_outbox >= 400 and not link.dead
    finally:
        link.close()
        a.close()
        b.close()
        jobs_ring.close()
        frames_ring.close()


# ---------------------------------------------------------------------------------- servers
def _get(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _shm_names() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("psm_*")}


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


@pytest.fixture
def split_server(tiny_checkpoint):
    from benchmarks.serve_latency import ServerProcess

    shm_before = _shm_names()
    extra = ["--workers", "2", "--backend", "torch", "--max-sessions", "4", "--no-capacity-admission"]
    extra += ["--margin-ms", "200"]  # a loaded test machine: content and batching are checked, not speed
    server = ServerProcess(str(tiny_checkpoint), 1, extra)
    try:
        health = server.wait_ready(timeout=180)
        deadline = time.monotonic() + 10  # both workers announced their private addresses
        while None in (health.get("model_process", {}).get("worker_urls") or [None]):
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
            health = _get(server.url + "/health")[1]
        children = _children(server.proc.pid)
        yield server, health, children
    finally:
        rc = server.stop()
    # a clean stop of the parent: exit code 0, no child left, the shared memory unlinked
    assert rc == 0, server.tail()
    import psutil

    def alive() -> list[int]:
        out = []
        for p in children:
            try:
                if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    deadline = time.monotonic() + 10  # a loaded machine: the children (and the resource tracker) may lag
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive()
    assert not left, [psutil.Process(p).cmdline() for p in left if psutil.pid_exists(p)]
    assert not (_shm_names() - shm_before)


def test_two_workers_one_model_batches_across_workers(split_server):
    """One peer on each media worker: both get fresh frames, each worker counts its session, the model
    process sees both and batches frames of the two workers together."""
    from benchmarks.client import probe_signal, run_client

    server, health, _ = split_server
    urls = health["model_process"]["worker_urls"]
    assert health["model_process"]["workers"] == 2 and len(urls) == 2
    during: dict = {}

    async def watch():
        await asyncio.sleep(4.0)
        during.update(await asyncio.to_thread(lambda: _get(server.url + "/health")[1]))

    async def run():
        sig, onsets = probe_signal(12.0)
        opts = {"audio": "mic", "pose": "idle", "stamp": True}
        return await asyncio.gather(*(run_client(u, 6.0, sig, onsets, options=opts) for u in urls), watch())

    r0, r1, _ = asyncio.run(run())
    metrics = server.metrics()
    print(json.dumps({"during": during.get("model_process"), "s0": r0.server_stats, "s1": r1.server_stats}))
    for r, k in ((r0, 0), (r1, 1)):
        a = r.analyse()
        assert r.server_stats["session"].startswith(f"w{k}-")
        assert a["frames_fresh"] >= 50, a  # 6 s at 25 fps: most frames fresh
        assert r.server_stats["frames_fresh"] >= 0.5 * r.server_stats["frames_sent"], r.server_stats
    assert during["model_process"]["sessions_by_worker"] == [1, 1]
    assert during["model_process"]["registered_by_worker"] == [1, 1]
    # the model process's batch sizes (in every worker's /metrics): some batch held more than one frame
    count = float(re.search(r"^rt_engine_batch_size_count (\S+)", metrics, re.M).group(1))
    le1 = float(re.search(r'^rt_engine_batch_size_bucket\{le="1(?:\.0)?"\} (\S+)', metrics, re.M).group(1))
    assert count > le1, (count, le1)


def test_dead_model_process_fails_health_and_offers(split_server):
    server, health, _ = split_server
    os.kill(health["model_process"]["model_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    codes: set[int] = set()
    while time.monotonic() < deadline:  # every worker (reached directly) fails /health
        codes = {_get(u + "/health")[0] for u in health["model_process"]["worker_urls"]}
        if codes == {503}:
            break
        time.sleep(0.2)
    assert codes == {503}
    from tests.test_serve import _offer_sdp

    sdp = asyncio.run(_offer_sdp())
    for u in health["model_process"]["worker_urls"]:
        req = urllib.request.Request(
            u + "/offer",
            data=json.dumps({"type": "offer", "sdp": sdp, "options": {"audio": "file"}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 503 and "model worker stopped" in e.value.read().decode()
    assert server.proc.poll() is None  # the workers stay up (a load balancer sees the 503)
