"""The held-out clips (identities in training/holdout.txt) as a folder for the evaluation tool.

    python -m training.holdout ../shared/data/train.csv runs/holdout_clips
    python -m benchmarks.quality --clips runs/holdout_clips --out runs/eval_default

For each held-out talking video with speech the folder gets ``<id>.mp4`` (a symlink to the video)
and, when its speech is a separate file, ``<id>.flac`` beside it (the pairing of
:func:`training.preprocess.index_csv`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from training.data import read_holdout
from training.preprocess import index_csv

HOLDOUT = Path(__file__).resolve().parent / "holdout.txt"


def write_holdout_folder(table: str | Path, out: str | Path, holdout: str | Path = HOLDOUT) -> list[str]:
    """Link the held-out clips of ``table`` into ``out``; returns their ids."""
    ids = read_holdout(holdout)
    sources, _ = index_csv(table)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    done = []
    for s in sources:
        if s.identity not in ids or not s.want_audio:
            continue
        video = Path(s.video).resolve()
        links = [(d / f"{s.id}{video.suffix}", video)]
        if s.audio:
            audio = Path(s.audio).resolve()
            links.append((d / f"{s.id}{audio.suffix}", audio))
        for link, target in links:
            if link.is_symlink() or link.exists():
                link.unlink()
            os.symlink(target, link)
        done.append(s.id)
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.holdout", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("table", help="data table, e.g. ../shared/data/train.csv")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--holdout", default=str(HOLDOUT))
    args = ap.parse_args(argv)
    done = write_holdout_folder(args.table, args.out, args.holdout)
    print(f"linked {len(done)} held-out clips into {args.out}: {', '.join(done)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
