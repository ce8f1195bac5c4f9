"""How lip-aware is a run's speech-content space? Within-clip audio-visual retrieval.

For each clip, every K-th frame's visual content (pose encoder's non-identity feature -> content
head) is matched against the audio content of every sampled frame *of the same clip* by cosine
similarity. Other clips are left out on purpose: voice and face tell clips apart, so cross-clip
retrieval says nothing about lips. Chance is 1/n for top-1.

    python -m training.sync_eval runs/default/content2/last.pt --data runs/data/train --clips 6
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rt_engine.config import ModelConfig
from rt_engine.errors import CheckpointError
from rt_engine.inputs.audio import mel_window
from rt_engine.inputs.image import official_crop, to_tensor
from rt_engine.models.pcavs import PCAVS
from training.data import ClipStore, read_holdout, read_index
from training.nets import Heads

log = logging.getLogger(__name__)


def load_run(path: str | Path) -> tuple[PCAVS, Heads, dict]:
    """A training checkpoint (.pt) -> model and heads in eval mode, and the checkpoint's config."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    mc = ModelConfig.from_dict(ck["model_config"])
    model = PCAVS(mc)
    model.load_state_dict(ck["model"])
    heads = Heads(mc, max(1, len(ck["identities"])))
    missing = [k for k in heads.state_dict() if k.startswith("visual_content.") and k not in ck["heads"]]
    if missing:
        raise CheckpointError(f"{path}: no visual content head ({missing[0]} missing); pass a content or joint run")
    heads.load_state_dict(ck["heads"], strict=False)  # other heads may be missing in older runs
    return model.eval(), heads.eval(), ck["config"]


@torch.no_grad()
def clip_retrieval(
    model: PCAVS, heads: Heads, frames: np.ndarray, mel: np.ndarray, valid: np.ndarray, every: int = 2, max_n: int = 100
) -> dict[str, float]:
    """frames [N,224,224,3] u8, mel [T,80], valid frame indices -> top-1 / within-one-sample accuracy."""
    idx = valid[::every][:max_n]
    imgs = to_tensor(np.stack([official_crop(frames[i]) for i in idx]))  # [n,3,224,224]
    mels = torch.from_numpy(np.stack([mel_window(mel, int(i)) for i in idx]))  # [n,1,80,20]
    v = F.normalize(heads.visual_content(model.pose_encoder.noid_feature(imgs)).float(), dim=1)  # [n,D]
    a = F.normalize(model.audio_encoder(mels).float(), dim=1)  # [n,D]
    sim = v @ a.T  # [n,n] visual i against audio j
    n = len(idx)
    ar = torch.arange(n)
    v2a, a2v = sim.argmax(1), sim.argmax(0)
    return {
        "n": n,
        "chance_top1": 1.0 / n,
        "v2a_top1": (v2a == ar).float().mean().item(),
        "a2v_top1": (a2v == ar).float().mean().item(),
        "v2a_within1": ((v2a - ar).abs() <= 1).float().mean().item(),
        "pos_minus_mean_sim": (sim.diag().mean() - sim.mean()).item(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="training checkpoint (.pt) with the content head")
    ap.add_argument("--data", default="runs/data/train", help="preprocessed cache")
    ap.add_argument("--holdout", default="", help="evaluate only these identities (holdout file); default: all")
    ap.add_argument("--clips", type=int, default=8, help="number of clips (the longest ones)")
    ap.add_argument("--every", type=int, default=2, help="sample every K-th usable frame")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, heads, _ = load_run(args.checkpoint)
    keep = read_holdout(args.holdout) if args.holdout else None
    entries = [e for e in read_index(args.data) if e["has_audio"] and (keep is None or e["identity"] in keep)]
    longest = {e["id"] for e in sorted(entries, key=lambda e: -e.get("n_usable", 0))[: args.clips]}
    store = ClipStore(args.data, None, need_audio=True, only_ids=longest)  # decodes only those
    clips = sorted(store.clips, key=lambda c: -len(c.valid))
    rows = {}
    for c in clips:
        rows[c.id] = clip_retrieval(model, heads, c.frames, c.mel, c.valid, args.every)
        log.info("%s: %s", c.id, {k: round(v, 3) for k, v in rows[c.id].items()})
    keys = ("v2a_top1", "a2v_top1", "v2a_within1", "chance_top1", "pos_minus_mean_sim")
    mean = {k: float(np.mean([r[k] for r in rows.values()])) for k in keys}
    log.info("mean over %d clips: %s", len(rows), {k: round(v, 3) for k, v in mean.items()})
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"checkpoint": str(args.checkpoint), "mean": mean, "clips": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
