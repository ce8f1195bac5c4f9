"""Glass-to-glass latency of the real server, driven by an aiortc client over loopback.

    python benchmarks/serve_latency.py --preset tiny --seconds 20           # random tiny model
    python benchmarks/serve_latency.py --checkpoint m.safetensors --json out.json

Starts ``python -m rt_engine.serve`` as a separate process (as deployed), connects a client that
sends a tone-burst signal as its microphone with the ``stamp`` option, and reports as JSON:
glass-to-glass latency (input sample captured -> first RTP packet of the frame showing it arrived;
also -> frame decoded) p50/p95, received frame rate, pts gaps, held/skipped/dropped frames (server
stats), first frame after the answer, and the A/V offset of every tone burst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))
log = logging.getLogger("serve_latency")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_checkpoint(preset: str, out_dir: str) -> str:
    import torch

    from rt_engine.config import model_preset
    from rt_engine.models.checkpoint import save_single
    from rt_engine.models.pcavs import PCAVS

    torch.manual_seed(0)
    return str(
        save_single(
            PCAVS(model_preset(preset)),
            Path(out_dir) / f"{preset}.safetensors",
            provenance={"kind": f"random {preset} model for benchmarks"},
        )
    )


class ServerProcess:
    """``python -m rt_engine.serve`` in a subprocess; stops it on exit."""

    def __init__(self, checkpoint: str | None, threads: int = 0, extra: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "rt_engine.serve", "--port", str(self.port), "--threads", str(threads)]
        if checkpoint:
            cmd += ["--checkpoint", checkpoint]
        cmd += extra or []
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = tempfile.NamedTemporaryFile("w+", prefix="rt_serve_", suffix=".log", delete=False)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> dict:
        t = time.monotonic()
        while time.monotonic() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); log: {self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    h = json.loads(r.read())
                if h.get("warm", True):  # start-up warm-up finished (as a load balancer's readiness check would)
                    h["ready_after_s"] = round(time.monotonic() - self.started, 2)
                    return h
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout} s; log: {self.tail()}")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def threads(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        return 0

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            return r.read().decode()

    def tail(self, n: int = 2000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-n:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: aiohttp's graceful shutdown closes every peer
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        Path(self.log.name).unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="model file; default: a random --preset model")
    ap.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny", "small", "official", "bundled"],
        help="random model size when no --checkpoint ('bundled': the shipped default model)",
    )
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--sessions", type=int, default=1, help="concurrent clients")
    ap.add_argument("--pose", default="idle", choices=["idle", "still"])
    ap.add_argument("--threads", type=int, default=0, help="server torch threads (0: default)")
    ap.add_argument("--backend", default="auto", help="server --backend (auto, openvino, torch-fast, ...)")
    ap.add_argument("--json", default=None, help="also write the result here")
    return ap


async def _clients(url: str, seconds: float, n: int, pose: str) -> list:
    from benchmarks.client import probe_signal, run_client

    sig, onsets = probe_signal(seconds + 10)
    return await asyncio.gather(
        *[
            run_client(url, seconds, sig, onsets, options={"audio": "mic", "pose": pose, "stamp": True})
            for _ in range(n)
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None and args.preset != "bundled":
            ckpt = random_checkpoint(args.preset, tmp)
        with ServerProcess(ckpt, args.threads, ["--backend", args.backend]) as server:
            health = server.wait_ready()
            results = asyncio.run(_clients(server.url, args.seconds, args.sessions, args.pose))
            metrics = server.metrics()
            rss = server.rss_mb()
    sessions = []
    for r in results:
        a = r.analyse()
        a["server"] = r.server_stats
        sessions.append(a)
    out = {
        "benchmark": "serve_latency",
        "model": health.get("model"),
        "checkpoint": args.checkpoint or ("bundled" if args.preset == "bundled" else f"random {args.preset}"),
        "seconds": args.seconds,
        "server_ready_after_s": health.get("ready_after_s"),  # process start -> /health says warm
        "sessions": sessions,
        "server_rss_mb": round(rss, 1),
        "model_stage": [
            line
            for line in metrics.splitlines()
            if line.startswith("rt_engine_stage_latency_seconds_sum")
            or line.startswith("rt_engine_stage_latency_seconds_count")
        ],
        "host": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
    }
    return emit(out, args.json)


def emit(out: dict, path: str | None) -> dict:
    """Print the result as JSON, and write it to ``path`` too when given."""
    text = json.dumps(out, indent=1)
    print(text)
    if path:
        Path(path).write_text(text)
    return out


if __name__ == "__main__":
    main()
