"""Soak and churn runs of the real server (not CI).

    python benchmarks/soak.py --minutes 60               # one session for an hour
    python benchmarks/soak.py --churn 100                # 100 connect/disconnect cycles

Soak: one aiortc client streams a looping tone-burst microphone signal with the ``stamp`` option;
every ``--window`` seconds it reports, for that window, the A/V offset of each burst (video slot
arrival minus burst arrival), received fps, pts gaps, fresh/held frames, and the server's RSS and
thread count. The summary gives the worst A/V offset, the RSS growth after the first window and
the pts gaps against the frames the server reports as skipped (the drop policy).

Churn: sequential short sessions; reports server threads, RSS and open sessions before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.serve_latency import ServerProcess, random_checkpoint  # noqa: E402


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())


async def soak(server: ServerProcess, minutes: float, window_s: float, out) -> dict:
    from benchmarks.client import ClientResult, probe_signal, run_client

    period_s = 20.0
    sig, base = probe_signal(period_s)
    n_loops = int(minutes * 60 / period_s) + 3
    onsets = [o + k * sig.size for k in range(n_loops) for o in base]
    res = ClientResult()
    stop = asyncio.Event()
    windows: list[dict] = []

    async def sampler():
        t_end = time.monotonic() + minutes * 60
        while time.monotonic() < t_end:
            await asyncio.sleep(window_s)
            w = res.take_window()
            a = w.analyse()
            row = {
                "t_min": round((time.monotonic() - t_start) / 60, 2),
                "frames": a.get("video_frames"),
                "fps": a.get("fps"),
                "fresh": a.get("frames_fresh"),
                "pts_gaps": a.get("pts_gaps_over_1"),
                "max_gap": a.get("max_pts_gap_frames"),
                "av_offset_ms": a.get("av_offset_ms"),
                "g2g_ms": a.get("glass_to_glass_ms"),
                "rss_mb": round(server.rss_mb(), 1),
                "threads": server.threads(),
            }
            windows.append(row)
            print(json.dumps(row), file=out, flush=True)
        stop.set()

    t_start = time.monotonic()
    task = asyncio.ensure_future(sampler())
    await run_client(
        server.url,
        minutes * 60 + 60,
        sig,
        onsets,
        loop_signal=True,
        stop=stop,
        result=res,
        options={"audio": "mic", "pose": "idle", "stamp": True},
    )
    await task
    offs = [abs(o) for w in windows for o in (w["av_offset_ms"] or [])]
    rss = [w["rss_mb"] for w in windows]
    n_frames = sum(w["frames"] or 0 for w in windows)
    p95 = [w["g2g_ms"]["p95"] for w in windows if w["g2g_ms"]]
    late = len(windows) // 2  # RSS slope over the second half (after start-up allocations settle)
    slope = (
        (rss[-1] - rss[late]) / max(windows[-1]["t_min"] - windows[late]["t_min"], 1e-9) if len(windows) > 3 else None
    )
    return {
        "mode": "soak",
        "minutes": minutes,
        "windows": len(windows),
        "av_offset_max_abs_ms": max(offs) if offs else None,
        "bursts_measured": len(offs),
        "fps_min": min(w["fps"] for w in windows if w["fps"]) if windows else None,
        "frames_received": n_frames,
        "fresh_share": round(sum(w["fresh"] or 0 for w in windows) / n_frames, 4) if n_frames else None,
        "av_offset_over_40ms": sum(o > 40 for o in offs),
        "g2g_p95_ms_worst_window": max(p95) if p95 else None,
        "g2g_p95_ms_median_window": float(sorted(p95)[len(p95) // 2]) if p95 else None,
        "rss_slope_second_half_mb_per_min": round(slope, 3) if slope is not None else None,
        "pts_gaps_total": sum(w["pts_gaps"] or 0 for w in windows),
        "max_gap_frames": max((w["max_gap"] or 0) for w in windows) if windows else None,
        "server_frames_skipped": (res.server_stats or {}).get("frames_skipped"),
        "server_stats": res.server_stats,
        "rss_first_mb": rss[0] if rss else None,
        "rss_last_mb": rss[-1] if rss else None,
        "rss_growth_after_first_window_mb": round(rss[-1] - rss[0], 1) if rss else None,
        "threads_first": windows[0]["threads"] if windows else None,
        "threads_last": windows[-1]["threads"] if windows else None,
    }


async def churn(server: ServerProcess, cycles: int, out) -> dict:
    from benchmarks.client import run_client

    opts = {"audio": "file", "pose": "still"}
    await run_client(server.url, 1.0, options=opts)  # warm-up: first-use allocations
    await asyncio.sleep(1.0)
    t0, r0 = server.threads(), server.rss_mb()
    frames, by_cycle = [], []
    for k in range(cycles):
        res = await run_client(server.url, 1.0, options=opts)
        frames.append(res.analyse()["video_frames"])
        if (k + 1) % 10 == 0:
            by_cycle.append(
                {
                    "cycle": k + 1,
                    "threads": server.threads(),
                    "rss_mb": round(server.rss_mb(), 1),
                    "sessions": _health(server.url)["sessions"],
                }
            )
            print(json.dumps(by_cycle[-1]), file=out, flush=True)
    await asyncio.sleep(3.0)
    return {
        "mode": "churn",
        "cycles": cycles,
        "min_frames_per_cycle": min(frames),
        "threads_before": t0,
        "threads_after": server.threads(),
        "rss_before_mb": round(r0, 1),
        "rss_after_mb": round(server.rss_mb(), 1),
        "sessions_after": _health(server.url)["sessions"],
        "every_10_cycles": by_cycle,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--window", type=float, default=30.0, help="seconds per reported window")
    ap.add_argument("--churn", type=int, default=0, help="run N connect/disconnect cycles instead")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "official", "bundled"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--backend", default="auto", help="server --backend (auto, openvino, torch-fast, ...)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None and args.preset != "bundled":
            ckpt = random_checkpoint(args.preset, tmp)
        with ServerProcess(ckpt, args.threads, ["--backend", args.backend]) as server:
            server.wait_ready()
            if args.churn:
                summary = asyncio.run(churn(server, args.churn, sys.stdout))
            else:
                summary = asyncio.run(soak(server, args.minutes, args.window, sys.stdout))
            summary["server_exit_code"] = server.stop()
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return summary


if __name__ == "__main__":
    main()
