"""``python -m rt_engine.serve --workers N`` (N >= 2): N media worker processes and one model process.

::

                  ┌ media worker 0 (aiohttp + aiortc, input thread, codecs) ┐  job ring, frame ring,
    clients ──────┤ media worker 1 ...                                      ├─ pipe per worker ── model process
    (one port,    └ media worker N-1                                        ┘  (shared memory)    (Scheduler + Runner)
    SO_REUSEPORT)

* The parent process (this module's :func:`serve_split`) creates every shared-memory ring, starts
  the model process and the workers, and waits. On SIGINT/SIGTERM it stops the workers (aiohttp's
  graceful shutdown closes their peers), then the model process, and unlinks the rings. Children
  get SIGTERM when the parent dies (``PR_SET_PDEATHSIG``), so none is left orphaned.
* The model process (:func:`model_main`) builds the runner and one
  :class:`~rt_engine.stream.scheduler.Scheduler`, served by :class:`~rt_engine.stream.remote.ModelServer`.
* A media worker (:func:`worker_main`) runs the same app as one process, with a
  :class:`~rt_engine.stream.remote.SchedulerClient` in place of the scheduler; it never loads the
  model. It listens on the public port with ``SO_REUSEPORT`` (the kernel spreads connections over the
  workers) and on a private 127.0.0.1 port, where the other workers forward ``/stats/<sid>`` and
  ``/close/<sid>`` of its sessions (session ids start with ``w<k>-``).
* A worker whose model process died answers ``/health`` with 503 and refuses offers; the parent keeps
  it up (a load balancer sees the failure). A dead worker's sessions are forgotten by the model process.

Uploads go into one folder that the parent makes and every worker shares, so an upload and the offer
that names it may reach different workers.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from multiprocessing.connection import Connection

from rt_engine.stream.remote import RingNames

log = logging.getLogger("rt_engine.serve")

STOP_TIMEOUT_S = 10.0


def _die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux), so a killed server leaves no orphans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# ---------------------------------------------------------------------------------- model process
def model_main(args: argparse.Namespace, conns: list[Connection], names: list[RingNames]) -> None:
    """The model process: the runner, one scheduler, a ModelServer over every worker's rings."""
    _die_with_parent()
    from rt_engine.serve.__main__ import _thread_budget, make_runner, scheduler_config, setup_logging

    setup_logging(args.verbose, "model")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from rt_engine.stream.remote import FRAME_SLOTS, JOB_DTYPE, JOB_SLOTS, ModelServer, ShmRing, frame_dtype
    from rt_engine.stream.scheduler import Metrics, Scheduler

    model_threads, _ = _thread_budget(args.threads, 1)
    runner = make_runner(args)
    scheduler = Scheduler(runner, scheduler_config(args), Metrics(), threads=model_threads).start()
    rings = [
        (ShmRing.attach(n.jobs, JOB_DTYPE, JOB_SLOTS), ShmRing.attach(n.frames, frame_dtype(), FRAME_SLOTS))
        for n in names
    ]
    server = ModelServer(scheduler, [(c, j, f) for c, (j, f) in zip(conns, rings, strict=True)]).start()
    log.info("model %s; serving %d media workers", runner.describe(), len(conns))
    server.wait(stop)
    log.info("model process stopping")
    server.stop()
    scheduler.stop()
    for j, f in rings:
        j.close()
        f.close()


# ---------------------------------------------------------------------------------- media worker
def worker_main(args: argparse.Namespace, worker: int, conn: Connection, names: RingNames) -> None:
    """One media worker: the aiohttp/aiortc app over a SchedulerClient, on the shared port."""
    _die_with_parent()
    from rt_engine.serve.__main__ import server_config, setup_logging

    setup_logging(args.verbose, f"worker {worker}")
    import torch

    from rt_engine.serve.app import ROUTE, create_app
    from rt_engine.stream.clock import ClockConfig
    from rt_engine.stream.remote import SchedulerClient
    from rt_engine.stream.session import Engine

    torch.set_num_threads(1)  # tensors here are only image conversions; the model runs elsewhere
    sys.setswitchinterval(0.001)
    cores = os.cpu_count() or 1
    codec_threads = args.codec_threads or max(1, cores // args.workers)
    try:
        client = SchedulerClient(worker, conn, names).start()
    except (TimeoutError, ConnectionError) as e:
        log.error("no model process: %s", e)
        sys.exit(1)
    prefix = f"w{worker}-"
    engine = Engine(
        client.runner, clock_cfg=ClockConfig(margin_s=args.margin_ms / 1e3), scheduler=client, sid_prefix=prefix
    )
    client.local_sessions = lambda: len(engine.sessions)
    app = create_app(engine, server_config(args), warm_default=True)

    def route(sid: str) -> str | None:
        if not sid.startswith("w") or "-" not in sid or sid.startswith(prefix):
            return None
        try:
            return client.worker_url(int(sid[1 : sid.index("-")]))
        except ValueError:
            return None

    app[ROUTE] = route
    log.info("media worker %d: %s, %d codec threads", worker, client.runner.describe(), codec_threads)
    asyncio.run(_serve_worker(app, args.host, args.port, codec_threads, client))


async def _serve_worker(app, host: str, port: int, codec_threads: int, client) -> None:
    from aiohttp import web

    from rt_engine.serve.__main__ import _process_setup

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app.on_startup.append(lambda app: _process_setup(app, codec_threads))
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=True).start()
        # the private port the other workers forward this worker's /stats and /close to: bound here,
        # so its number is known without a private aiohttp name
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        client.announce(f"http://127.0.0.1:{sock.getsockname()[1]}")
        await stop.wait()
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------------- parent
def serve_split(args: argparse.Namespace) -> int:
    """Start the model process and ``args.workers`` media workers; run until SIGINT/SIGTERM."""
    from rt_engine.stream.remote import create_rings

    n = args.workers
    args.upload_dir = tempfile.mkdtemp(prefix="rt_engine_uploads_")  # one folder for every worker's uploads
    ctx = multiprocessing.get_context("spawn")  # nothing of this process (threads, locks) is inherited
    rings = [create_rings() for _ in range(n)]
    names = [RingNames(j.name, f.name) for j, f in rings]
    pipes = [ctx.Pipe(duplex=True) for _ in range(n)]
    stop = threading.Event()
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    model = ctx.Process(target=model_main, args=(args, [p[0] for p in pipes], names), name="rt-engine-model")
    workers = [
        ctx.Process(target=worker_main, args=(args, k, pipes[k][1], names[k]), name=f"rt-engine-worker-{k}")
        for k in range(n)
    ]
    rc = 0
    try:
        model.start()
        for w in workers:
            w.start()
        for a, b in pipes:  # the children hold their ends: a dead peer now reads as the end of the pipe
            a.close()
            b.close()
        log.info(
            "model process %d, media workers %s on http://%s:%d/",
            model.pid,
            [w.pid for w in workers],
            args.host,
            args.port,
        )
        model_reported = False
        while not stop.is_set():
            multiprocessing.connection.wait([model.sentinel, *(w.sentinel for w in workers)], timeout=0.5)
            if not model.is_alive() and not model_reported:
                model_reported = True
                log.error("the model process exited (%s): workers answer /health with 503", model.exitcode)
            if not any(w.is_alive() for w in workers):
                log.error("every media worker exited (%s)", [w.exitcode for w in workers])
                rc = 1
                break
    finally:
        _stop_all(workers, model)
        for j, f in rings:
            j.close()
            f.close()
        shutil.rmtree(args.upload_dir, ignore_errors=True)
        for sig, h in old.items():
            signal.signal(sig, h)
    log.info("stopped: model process and %d media workers ended, shared memory unlinked", n)
    return rc


def _stop_all(workers: list, model) -> None:
    """Workers first (they close their peers and forget their sessions), then the model process."""
    for group in (workers, [model]):
        for p in group:
            if p.is_alive():
                p.terminate()
        for p in group:
            p.join(STOP_TIMEOUT_S)
            if p.is_alive():
                log.warning("%s did not stop in %g s: killing it", p.name, STOP_TIMEOUT_S)
                p.kill()
                p.join(5)
