"""Sessions per server: ramp real aiortc peers until fresh frames fall below 95%.

    python benchmarks/serve_capacity.py --preset bundled --seconds 15 --json out.json
    python benchmarks/serve_capacity.py --preset tiny --seconds 6 --max-sessions 3     # quick
    python benchmarks/serve_capacity.py --workers 2 ...    # 2 media worker processes, one model process

Starts ``python -m rt_engine.serve`` as a separate process (as deployed). Stage k then runs k peers
at once on loopback, each sending speech as its microphone, for ``--seconds``. The peers run in this
process, on the same cores as the server. The ramp stops at the first stage where a session gets
less than 95% of its frames fresh, or where the server refuses one. ``--admission count`` switches
off the server's capacity admission, so the ramp finds where freshness really drops.

Per stage, the JSON reports:
- per session: fresh share, fresh and delivered fps;
- model utilisation: model-busy seconds per second;
- server CPU per session excluding the model, in % of one core: the server's own split of its CPU
  time by thread (``rt_engine_cpu_seconds{part=...}`` in /metrics, ``rt_engine/serve/cputime.py``:
  the model thread and the runtimes' native worker pools are the model, the rest is the server),
  divided by wall time and sessions; ``..._by_busy`` keeps the older estimate (CPU time less
  model-busy seconds times the warm-up's CPU per busy second), which over-subtracts under contention;
- frames computed and then late;
- what /health said about capacity;
- the model's batch size histogram over the stage (with ``--workers N``: the model process's, which
  batches the sessions of all workers) and, with ``--workers N``, the sessions per worker.

Server CPU is the CPU time of the server process and all its children (the model process and the
workers with ``--workers N``).

``sessions_held`` is the last stage where every session got 95% or more of its frames fresh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.serve_latency import ServerProcess, emit, random_checkpoint  # noqa: E402

log = logging.getLogger("serve_capacity")
FRESH_TARGET = 0.95


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="model file; default: a random --preset model")
    ap.add_argument(
        "--preset",
        default="bundled",
        choices=["tiny", "small", "official", "bundled"],
        help="random model size when no --checkpoint ('bundled': the shipped default model)",
    )
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each stage")
    ap.add_argument("--max-sessions", type=int, default=6, help="last stage (and the server's --max-sessions)")
    ap.add_argument("--backend", default="auto", help="server --backend")
    ap.add_argument("--threads", type=int, default=0, help="server --threads")
    ap.add_argument("--lanes", type=int, default=0, help="server --lanes (0: auto)")
    ap.add_argument(
        "--admission",
        default="capacity",
        choices=["capacity", "count"],
        help="capacity: the server admits by measured model capacity (as deployed); count: only "
        "--max-sessions, so the ramp finds where freshness drops",
    )
    ap.add_argument(
        "--workers", type=int, default=1, help="server --workers: media worker processes (>= 2: plus a model process)"
    )
    ap.add_argument("--json", default=None, help="also write the result here")
    return ap


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (model process, media workers)."""
    import psutil

    total = 0.0
    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _batch_hist(text: str) -> dict[str, float]:
    """Cumulative batch size buckets of rt_engine_batch_size -> {le: count}."""
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^rt_engine_batch_size_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)
    }


def _batch_sizes(before: str, after: str) -> dict[str, int]:
    """Batches per size bucket during a stage ("<=1", "<=2", ...; not cumulative)."""
    h0, h1 = _batch_hist(before), _batch_hist(after)
    out, prev = {}, 0.0
    for le in h1:
        cum = h1[le] - h0.get(le, 0.0)
        label = "inf" if le == "+Inf" else f"{float(le):g}"
        if cum - prev:
            out[f"<={label}"] = int(cum - prev)
        prev = cum
    return out


def _metric(text: str, name: str, labels: str | None = None, missing: float = 0.0) -> float:
    """The first sample of ``name`` in Prometheus text (with ``labels``: the one with exactly that label
    set, e.g. ``part="model"``); ``missing`` when there is none."""
    lab = r"(?:{[^}]*})?" if labels is None else re.escape("{" + labels + "}")
    m = re.search(rf"^{name}{lab} ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else missing


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())


async def _stage(url: str, k: int, seconds: float) -> tuple[list, dict]:
    from benchmarks.client import probe_signal, run_client

    sig, onsets = probe_signal(seconds + 15)

    async def one(j: int):
        await asyncio.sleep(0.3 * j)  # clients arrive one after another, not in one instant
        try:
            return await run_client(
                url, seconds, sig, onsets, options={"audio": "mic", "pose": "idle"}, keep_audio=False
            )
        except RuntimeError as e:  # e.g. "offer rejected (503): ..."
            return str(e)

    async def mid_health() -> dict:  # while every peer streams
        await asyncio.sleep(0.3 * k + seconds / 2)
        try:
            return await asyncio.to_thread(_health, url)
        except OSError:
            return {}

    *results, health = await asyncio.gather(*[one(j) for j in range(k)], mid_health())
    return results, health


def _part_cpu(text: str, part: str) -> float:
    # nan: not reported (media workers: no model there)
    return _metric(text, "rt_engine_cpu_seconds", f'part="{part}"', missing=math.nan)


def _round_or_none(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 1)  # JSON has no NaN


def run_stage(server: ServerProcess, k: int, seconds: float, cpu_per_busy: float) -> dict:
    m0, c0, t0 = server.metrics(), _cpu_s(server.proc.pid), time.monotonic()
    results, mid = asyncio.run(_stage(server.url, k, seconds))
    m1, c1, t1 = server.metrics(), _cpu_s(server.proc.pid), time.monotonic()
    wall = t1 - t0
    # the server's own split by thread (serve/cputime.py): the model's threads and runtime pools vs the rest
    model_cpu = _part_cpu(m1, "model") - _part_cpu(m0, "model")
    rest_cpu = _part_cpu(m1, "server") - _part_cpu(m0, "server")
    busy = _metric(m1, "rt_engine_model_busy_seconds") - _metric(m0, "rt_engine_model_busy_seconds")
    sessions, refused = [], []
    for r in results:
        if isinstance(r, str):
            refused.append(r)
            continue
        s = r.server_stats or {}
        sent = max(1, s.get("frames_sent", 0))
        sessions.append(
            {
                "fresh_share": round(s.get("frames_fresh", 0) / sent, 3),
                "fresh_fps": s.get("fresh_fps"),
                "fps": s.get("fps"),
                "frames_sent": s.get("frames_sent"),
                "frames_thinned": s.get("frames_thinned"),
                "latency_ms": s.get("latency_ms"),
                "algorithmic_latency_ms": s.get("algorithmic_latency_ms"),
            }
        )
    n = max(1, len(sessions))
    excl_model = max(0.0, (c1 - c0) - busy * cpu_per_busy)  # the older estimate, kept for comparison
    late = _metric(m1, "rt_engine_frames_computed_late_total") - _metric(m0, "rt_engine_frames_computed_late_total")
    model_process = mid.get("model_process") or {}
    return {
        "sessions": k,
        "per_session": sessions,
        "refused": refused,
        "min_fresh_share": min((s["fresh_share"] for s in sessions), default=0.0),
        "model_utilisation": round(busy / wall, 3),
        "server_cpu_pct_of_core": round(100 * (c1 - c0) / wall, 1),
        "server_cpu_per_session_excl_model_pct": _round_or_none(100 * rest_cpu / wall / n),
        "model_cpu_pct_of_core": _round_or_none(100 * model_cpu / wall),
        "server_cpu_per_session_excl_model_pct_by_busy": round(100 * excl_model / wall / n, 1),
        "frames_computed_late": late,
        "wall_s": round(wall, 1),
        "health_capacity_sessions": _health(server.url).get("capacity_sessions"),
        "batch_sizes": _batch_sizes(m0, m1),
        "sessions_by_worker": model_process.get("registered_by_worker"),  # mid-stage, as the model process saw them
    }


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted({f for f in ("avx2", "avx512_bf16", "amx_bf16", "amx_tile") if re.search(rf"\b{f}\b", text)})


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    stages = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None and args.preset != "bundled":
            ckpt = random_checkpoint(args.preset, tmp)
        extra = ["--backend", args.backend, "--max-sessions", str(args.max_sessions), "--workers", str(args.workers)]
        extra += ["--lanes", str(args.lanes)]
        if args.admission == "count":
            extra.append("--no-capacity-admission")
        with ServerProcess(ckpt, args.threads, extra) as server:
            health = server.wait_ready(timeout=240)
            cpu_per_busy = float(health.get("model_cpu_per_busy_s") or 0.0)
            for k in range(1, args.max_sessions + 1):
                stage = run_stage(server, k, args.seconds, cpu_per_busy)
                stages.append(stage)
                print(
                    json.dumps(
                        {
                            key: stage[key]
                            for key in (
                                "sessions",
                                "min_fresh_share",
                                "model_utilisation",
                                "server_cpu_per_session_excl_model_pct",
                                "frames_computed_late",
                                "batch_sizes",
                                "refused",
                            )
                        }
                    ),
                    flush=True,
                )
                if stage["refused"] or stage["min_fresh_share"] < FRESH_TARGET:
                    break
    held = max((s["sessions"] for s in stages if not s["refused"] and s["min_fresh_share"] >= FRESH_TARGET), default=0)
    out = {
        "benchmark": "serve_capacity",
        "model": health.get("model"),
        "checkpoint": args.checkpoint or ("bundled" if args.preset == "bundled" else f"random {args.preset}"),
        "admission": args.admission,
        "workers": args.workers,
        "seconds_per_stage": args.seconds,
        "sessions_held": held,
        "fresh_target": FRESH_TARGET,
        "model_fps_by_batch": health.get("model_fps"),
        "model_lanes": health.get("model_lanes"),
        "model_cpu_per_busy_s": cpu_per_busy,
        "stages": stages,
        "host": {
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "cpu_flags": _cpu_flags(),
            "note": "peers run on the same cores as the server",
        },
    }
    return emit(out, args.json)


if __name__ == "__main__":
    main()
