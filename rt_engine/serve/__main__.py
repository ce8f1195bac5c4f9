"""``python -m rt_engine.serve``: serve the live talking face over WebRTC.

python -m rt_engine.serve                       # bundled model, http://127.0.0.1:8080/
python -m rt_engine.serve --checkpoint m.safetensors --port 9000
python -m rt_engine.serve --host 0.0.0.0 --token SECRET   # other addresses need a token
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import sys

from rt_engine.cli import HelpFormatter, cli_main
from rt_engine.errors import CheckpointError, ConfigError

log = logging.getLogger("rt_engine.serve")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rt_engine.serve", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="model (.safetensors or official folder); None: the bundled one")
    ap.add_argument("--host", default="127.0.0.1", help="bind address")
    ap.add_argument("--port", type=int, default=8080, help="HTTP port of the page and the API")
    ap.add_argument("--token", default=None, help="required on /offer and /upload; mandatory off loopback")
    ap.add_argument(
        "--max-sessions",
        type=int,
        default=4,
        help="upper bound on sessions; within it a session is admitted only while the measured "
        "model time serves it at the full fresh rate",
    )
    ap.add_argument(
        "--no-capacity-admission",
        action="store_true",
        help="admit by --max-sessions alone (benchmarks that look for the real limit)",
    )
    ap.add_argument(
        "--max-pending", type=int, default=4, help="answered offers not yet connected (they hold no session slot)"
    )
    ap.add_argument(
        "--connect-timeout", type=float, default=5.0, help="an answered offer must connect within this many seconds"
    )
    ap.add_argument(
        "--ice-any-address",
        action="store_true",
        help="let WebRTC media bind every local address (otherwise only where --host binds)",
    )
    ap.add_argument(
        "--backend",
        default="auto",
        help="runner backend: auto (fastest that passes a fidelity check), torch, torch-fast, torch-cuda, "
        "onnxruntime, openvino, tensorrt",
    )
    ap.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 where the CPU runs it natively (AVX512-BF16/AMX), else fp32",
    )
    ap.add_argument(
        "--encoder-precision",
        default=None,
        choices=["fp32"],
        help="OpenVINO only: run the identity, pose and audio encoders in fp32 under a bf16 generator "
        "(official size, real inputs: 51.8 dB from the fp32 reference instead of 38.1; docs/benchmarks.md)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="model threads: torch intra-op threads and OpenVINO/onnxruntime inference threads (0: one per core)",
    )
    ap.add_argument(
        "--codec-threads",
        type=int,
        default=0,
        help="threads of the event loop's executor, where aiortc encodes and decodes video and "
        "faces are cropped (0: one per core)",
    )
    ap.add_argument("--max-batch", type=int, default=8, help="largest batch of frames per model call")
    ap.add_argument(
        "--lanes",
        type=int,
        default=0,
        help="model calls at once, each on its own share of the model threads (OpenVINO streams; 0: one "
        "per model thread where one frame on one thread takes at most 40 ms, else 1; docs/serving.md)",
    )
    ap.add_argument(
        "--mouth-gain", type=float, default=1.0, help="how far the mouth moves: 1 as trained, 0 closed, up to 3 wider"
    )
    ap.add_argument(
        "--margin-ms",
        type=float,
        default=80.0,
        help="budget after the 120 ms audio lookahead for audio packet arrival (Opus: 20 ms packets) "
        "and compute; frames not ready by then are held (80 ms: two frames)",
    )
    ap.add_argument("--peer-timeout", type=float, default=10.0, help="close sessions whose media stopped (s)")
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="media worker processes (HTTP/WebRTC, codecs) on the one port; 1: everything in this process. "
        "With 2 or more, one model process batches the frames of all of them (docs/serving.md)",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def _thread_budget(model: int, codec: int) -> tuple[int, int]:
    """Explicit thread budgets (docs/serving.md, "Threads"): -> (model threads, codec threads).
    Set before the runner is made: the OpenVINO and onnxruntime backends size their pools from
    torch's thread count. Process-wide, so here and not in the library."""
    import torch

    cores = os.cpu_count() or 1
    model, codec = model or cores, codec or cores
    torch.set_num_threads(model)
    try:
        torch.set_num_interop_threads(1)  # the model thread runs one graph at a time
    except RuntimeError:  # already fixed by earlier parallel work
        pass
    # The model thread runs many small ops with Python in between; with the default 5 ms GIL switch
    # interval the asyncio thread (pacing, RTP) waits up to 5 ms each time it wants the GIL back.
    sys.setswitchinterval(0.001)
    log.info("threads: model %d, codec/executor %d, input 1, event loop 1 (%d cores)", model, codec, cores)
    return model, codec


async def _process_setup(app, codec_threads: int) -> None:
    """Process-wide settings of the server process: the loop's executor size, and, once start-up has
    warmed the model, the start-up heap frozen out of the garbage collector's way."""
    from rt_engine.serve.app import FREEZE_TASK, after_warm_up, freeze_startup_heap

    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(codec_threads, thread_name_prefix="rt-engine-exec"))

    async def freeze() -> None:
        await after_warm_up(app)
        log.info("froze %d start-up objects out of the garbage collector's way", freeze_startup_heap())

    app[FREEZE_TASK] = asyncio.ensure_future(freeze())


def setup_logging(verbose: bool, role: str = "") -> None:
    fmt = "%(asctime)s %(levelname)s " + (f"[{role}] " if role else "") + "%(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt)
    for noisy in ("aioice", "aiortc", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def server_config(args: argparse.Namespace):
    """The validated :class:`~rt_engine.serve.app.ServerConfig` of the command line."""
    from rt_engine.serve.app import ServerConfig

    return ServerConfig(
        host=args.host,
        port=args.port,
        token=args.token,
        max_sessions=args.max_sessions,
        peer_timeout_s=args.peer_timeout,
        max_pending=args.max_pending,
        connect_timeout_s=args.connect_timeout,
        ice_any_address=args.ice_any_address,
        admit_by_capacity=not args.no_capacity_admission,
        upload_dir=getattr(args, "upload_dir", None),  # set by serve_split for its media workers
    ).validate()


def scheduler_config(args: argparse.Namespace):
    from rt_engine.stream.scheduler import SchedulerConfig

    return SchedulerConfig(max_batch=args.max_batch, mouth_gain=args.mouth_gain, lanes=args.lanes).validate()


def make_runner(args: argparse.Namespace):
    from rt_engine.backends import make_runner as make

    try:
        return make(args.checkpoint, args.precision, args.backend, encoder_precision=args.encoder_precision)
    except CheckpointError as e:
        if args.checkpoint is None:
            raise CheckpointError(
                f"{e}; pass --checkpoint PATH (a .safetensors model or an official "
                f"checkpoint folder) until the bundled model ships"
            ) from None
        raise


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from aiohttp import web

    from rt_engine.serve.app import create_app
    from rt_engine.stream.clock import ClockConfig
    from rt_engine.stream.session import Engine

    cfg = server_config(args)
    sched_cfg = scheduler_config(args)
    if not 1 <= args.workers <= 64:
        raise ConfigError(f"--workers must be in [1, 64], got {args.workers}")
    if args.workers > 1:
        from rt_engine.serve.workers import serve_split

        return serve_split(args)
    model_threads, codec_threads = _thread_budget(args.threads, args.codec_threads)
    runner = make_runner(args)
    engine = Engine(runner, sched_cfg, ClockConfig(margin_s=args.margin_ms / 1e3), threads=model_threads)
    app = create_app(engine, cfg, warm_default=True)
    app.on_startup.append(lambda app: _process_setup(app, codec_threads))
    log.info("model %s; serving http://%s:%d/", runner.describe(), args.host, args.port)
    try:
        web.run_app(app, host=args.host, port=args.port, print=None, shutdown_timeout=5.0)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
