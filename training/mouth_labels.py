"""Per-frame mouth-opening labels for a preprocessed cache (the lip-sync signal of ``w_open``).

For every clip of the cache, writes ``clips/<id>/mouth.npy``: [N] float32, the inner-lip gap over
the outer eye-corner distance from dlib's 68 landmarks (the same measure as the evaluation's mouth
correlation, ``rt_engine.inputs.landmarks.mouth_opening``), NaN where no face was found. Resumable: clips
that already have the file are skipped.

    python -m training.mouth_labels runs/data/train

Why: 7 minutes of video are too little for the generator to discover from pixel losses alone
which sounds open the mouth. With these labels the audio content feature is also trained to
predict the opening (a small head, ``w_open``), so the mouth code carries it from the start.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.data import decode_frames, read_index

log = logging.getLogger(__name__)


def label_clip(frames: np.ndarray, analyzer) -> np.ndarray:
    """[N,224,224,3] u8 aligned crops -> [N] mouth opening (NaN where no face)."""
    from rt_engine.inputs.landmarks import mouth_opening

    return mouth_opening(analyzer.landmarks(frames)).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", help="folder written by python -m training.preprocess")
    ap.add_argument("--force", action="store_true", help="recompute clips that already have labels")
    ap.add_argument(
        "--all",
        action="store_true",
        help="label video-only clips too (training needs labels of the clips with speech only)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from rt_engine.inputs.landmarks import FaceAnalyzer

    root = Path(args.cache)
    clips = [e for e in read_index(root) if args.all or e.get("has_audio", True)]
    analyzer = FaceAnalyzer()
    found = total = 0
    for e in tqdm(clips, desc="mouth labels", unit="clip"):
        d = root / "clips" / e["id"]
        out = d / "mouth.npy"
        if out.is_file() and not args.force:
            lab = np.load(out)
        else:
            lab = label_clip(decode_frames(d / "frames.mp4"), analyzer)
            np.save(out, lab)
        found += int(np.isfinite(lab).sum())
        total += len(lab)
    log.info("%d clips, landmarks on %d of %d frames", len(clips), found, total)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
