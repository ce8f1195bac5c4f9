"""Barge-in of the avatar stream: how many frames until the mouth is closed after ``clear()``, and
whether the stream's timestamps jump.

    python -m benchmarks.barge_in [--checkpoint M] [--backend torch] [--trials 5] [--out DIR]

One avatar stream (still pose, so that a closed mouth is one exact image) plays the bundled speech
pushed as 24 kHz TTS chunks; after a random 0.6-1.6 s of it, ``clear()``. Per trial it records, for
the frames after the call: whether each shows the closed mouth (pixel-identical within 2 levels to
the generator's image of the silence window with the same pose), whether it was generated fresh or
held because compute was late, the frame index steps (1 everywhere = no timestamp jump), the audio
contiguity (each frame's audio starts where the previous one ended) and whether any speech sample
is sent from the cut on. Then 0.6 s of silence (idle frames) and the next trial.

Writes ``<name>.json`` (default barge_in.json) into ``--out`` (default benchmarks/out/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rt_engine.cli import cli_main
from rt_engine.errors import ConfigError

log = logging.getLogger("benchmarks.barge_in")


def closed_image(avatar) -> np.ndarray:
    """The still-pose frame of silence: [H,W,3] u8."""
    from rt_engine.inputs.audio import silence_window
    from rt_engine.inputs.image import to_uint8

    s = avatar.session
    r, sched = s.engine.runner, s.engine.scheduler
    win = torch.from_numpy(silence_window().copy())[None]  # [1,1,80,20]
    pose = torch.from_numpy(np.asarray(s.pose.code_for(0), np.float32))[None]  # [1,12]
    mouth = sched.mouth_gain(r, r.encode_audio(win))
    return to_uint8(r.generate(s.id0, s.id1, mouth, pose, noise=sched.cfg.noise))[0]


async def run_trials(engine, trials: int, seed: int) -> dict:
    from rt_engine.assets import DEFAULT_SPEECH
    from rt_engine.inputs.audio import load_audio
    from rt_engine.stream.avatar import AvatarStream

    rng = np.random.default_rng(seed)
    pcm = (load_audio(DEFAULT_SPEECH, 24000)[: 24000 * 3] * 32767 * 0.8).astype(np.int16)
    av = await AvatarStream.open(engine, pose="still")
    ref = closed_image(av)
    out = []
    it = av.frames()
    prev = None
    for _ in range(trials):
        for k in range(0, pcm.size, 480):
            av.push_audio(pcm[k : k + 480], 24000)
        speak_frames = int(rng.uniform(0.6, 1.6) * 25)
        before, after = [], []
        while len(before) < speak_frames:
            f = await it.__anext__()
            before.append(f)
        cut = av.clear()
        t_clear = time.monotonic()
        while len(after) < 15:  # 0.6 s of silence after the call
            after.append(await it.__anext__())
        elapsed = time.monotonic() - t_clear
        frames = ([prev] if prev is not None else []) + before + after
        prev = after[-1]
        closed = [int(np.abs(f.image.astype(int) - ref.astype(int)).max()) <= 2 for f in after]
        open_idx = [k for k, c in enumerate(closed) if not c]
        to_closed = (max(open_idx) + 1) if open_idx else 0  # frames after clear() until closed for good
        steps = [b.index - a.index for a, b in zip(frames, frames[1:], strict=False)]
        audio_gaps = [b.audio_start - (a.audio_start + a.audio.size) for a, b in zip(frames, frames[1:], strict=False)]
        speech_after_cut = float(
            max((np.abs(f.audio).max() for f in after if f.audio_start >= cut * 1920), default=0.0)
        )
        out.append(
            {
                "speech_frames_before": speak_frames,
                "speaking_before": int(sum(np.abs(f.image.astype(int) - ref.astype(int)).max() > 2 for f in before)),
                "cut_frame_offset": cut - after[0].index,  # cut relative to the first frame after clear()
                "frames_until_closed": to_closed,
                "held_after": int(sum(not f.fresh for f in after)),
                "max_index_step": max(steps),
                "index_steps_not_1": int(sum(s != 1 for s in steps)),
                "audio_gap_samples_max": int(max(abs(g) for g in audio_gaps)),
                "speech_peak_after_cut": round(speech_after_cut, 6),
                "fps_after_clear": round((after[-1].index - before[-1].index) / elapsed, 2),
            }
        )
        log.info("trial: %s", out[-1])
    d = av.describe()
    await av.close()
    return {"trials": out, "session": d}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="model; default: bundled")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--margin-ms", type=float, default=200.0, help="compute margin of the stream")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--name", default="barge_in", help="output file name (without .json)")
    return ap


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.trials < 1:
        raise ConfigError("--trials must be >= 1")
    from benchmarks.latency import cpu_info
    from rt_engine.integrations import load_engine

    engine = load_engine(args.checkpoint, args.backend, margin_ms=args.margin_ms, threads=args.threads)
    load0 = os.getloadavg()
    try:
        res = asyncio.run(run_trials(engine, args.trials, args.seed))
    finally:
        engine.close()
    t = res["trials"]
    res.update(
        {
            "benchmark": "barge_in",
            "model": engine.runner.describe(),
            "margin_ms": args.margin_ms,
            "summary": {
                # from which frame after clear() on the frames are made with a closed mouth (1: the 2nd)
                "cut_frame_offset_max": max(x["cut_frame_offset"] for x in t),
                # frames after clear() until the mouth is closed for good as sent (held frames repeat the
                # previous image: on a machine too slow for 25 fps this exceeds the offset)
                "frames_until_closed_max": max(x["frames_until_closed"] for x in t),
                "frames_until_closed_median": float(np.median([x["frames_until_closed"] for x in t])),
                "held_after_total": sum(x["held_after"] for x in t),
                "max_index_step": max(x["max_index_step"] for x in t),
                "audio_gap_samples_max": max(x["audio_gap_samples_max"] for x in t),
                "speech_peak_after_cut_max": max(x["speech_peak_after_cut"] for x in t),
            },
            "host": {**cpu_info(), "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        }
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
