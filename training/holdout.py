"""The held-out clips (identities in training/holdout.txt) as a folder for the evaluation tool.

    python -m training.holdout ../shared/data/train.csv runs/holdout_clips
    python -m benchmarks.quality --clips runs/holdout_clips --out runs/eval_default
    python -m training.holdout ../shared/data/train.csv runs/seen_clips --ids m0080,m0134,m0152,m0397

``--ids`` links the named clips instead, whatever their identity: the model card's trained-identity
clips (one talking clip each of obama, vox_id06811, vox_id07961 and woman_coat_latentsync) are made so.

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


def write_holdout_folder(
    table: str | Path, out: str | Path, holdout: str | Path = HOLDOUT, clip_ids: set[str] | None = None
) -> list[str]:
    """Link the held-out clips of ``table`` (or the clips named by ``clip_ids``) into ``out``; returns
    their ids."""
    ids = read_holdout(holdout)
    sources, _ = index_csv(table)
    if clip_ids is not None:  # a clip id, or the table row id it starts with (m0080 for m0080_Obama_clip1)
        names = {n: s.id for s in sources if s.want_audio for n in (s.id, s.id.split("_", 1)[0])}
        unknown = clip_ids - set(names)
        clip_ids = {names[n] for n in clip_ids - unknown}
        if unknown:
            raise SystemExit(f"error: no talking clip with id {', '.join(sorted(unknown))} in {table}")
    else:
        clip_ids = {s.id for s in sources if s.identity in ids}
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    done = []
    for s in sources:
        if not s.want_audio or s.id not in clip_ids:
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
    ap.add_argument("--ids", default=None, help="comma list of clip ids to link instead of the held-out clips")
    args = ap.parse_args(argv)
    clip_ids = {x.strip() for x in args.ids.split(",") if x.strip()} if args.ids else None
    done = write_holdout_folder(args.table, args.out, args.holdout, clip_ids)
    what = "named" if clip_ids is not None else "held-out"
    print(f"linked {len(done)} {what} clips into {args.out}: {', '.join(done)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
