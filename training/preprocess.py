"""Raw talking videos -> the training cache: aligned 224x224 crops at 25 fps + 16 kHz log-mel.

    python -m training.preprocess --csv ../shared/data/train.csv --out runs/data/train --workers 2
    python -m training.preprocess --voxceleb2 /data/vox2/dev/mp4 --out runs/data/vox2 --workers 16
    python -m training.preprocess --lrw /data/lrw --out runs/data/lrw
    python -m training.preprocess --folder my_videos/ --out runs/data/mine

Sources (one of):

* ``--csv``: a data table like ``../shared/data/train.csv``: rows of kind ``talking_video``;
  video files without an audio track are paired with the wav the notes name ("aligned 16k wav
  at samples/.../x.wav", stored next to it as .flac); clips noted as silent, video-only or with
  unverified speech are skipped (``--keep-silent`` keeps them as video-only clips: for the identity
  stage, and for the joint stage's ``video_only_frac``, which adds their faces without their mouths).
* ``--voxceleb2``: ``<root>/<speaker id>/<youtube id>/<utterance>.mp4`` (identity = speaker id).
* ``--lrw``: ``<root>/<WORD>/<split>/<WORD>_<n>.mp4``; LRW has no speaker labels, so every clip is
  its own identity class.
* ``--folder``: every video below a folder; identity = the sub-folder name (or the file stem for
  videos directly inside); audio from the container or a .wav/.flac with the same stem.

Per clip the cache holds ``clips/<id>/frames.mp4`` (face-tracked crops, the engine's
:class:`rt_engine.inputs.face.FaceCropper`; clips that already are aligned 224x224 crops are kept
as they are), ``mel.npy`` ([T,80], :func:`rt_engine.inputs.audio.audio_features`) and
``meta.json``. Finished clips are skipped on a rerun (resumable); ``index.json`` lists the usable
clips and ``report.json`` the skipped ones with the reason (no face, too short, no audio, ...).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from rt_engine.cli import cli_main
from rt_engine.config import FPS
from rt_engine.errors import InputError, NoFaceError, RtEngineError
from rt_engine.inputs.image import VIDEO_EXTS

log = logging.getLogger(__name__)

MIN_FRAMES = 10  # clips with fewer usable frames (0.4 s) are skipped
NO_SPEECH_MARKERS = ("NO audio", "NO usable audio", "audio track silent", "speech not verified")


@dataclass
class Source:
    id: str  # unique clip id (file-system safe)
    video: str
    audio: str | None  # None: the video's own audio track
    identity: str
    want_audio: bool = True  # False: video-only clip (identity stage, joint video_only_frac)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")


# ------------------------------------------------------------------------------------ indexes
def index_csv(path: str | Path, keep_silent: bool = False) -> tuple[list[Source], list[dict]]:
    """Rows of kind talking_video of a data table -> sources, plus rows skipped up front."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data table not found: {p}")
    base = p.parent
    out, skipped = [], []
    with p.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("kind") != "talking_video":
                continue
            video = base / row["file"]
            notes = row.get("notes", "")
            audio: str | None = None
            m = re.search(r"wav at (\S+?\.wav)", notes)
            if m:  # separate, aligned speech file: path is relative to the source repository root
                rel = (
                    row["file"][: len(row["file"]) - len(row["path_in_repo"])]
                    if row.get("path_in_repo") and row["file"].endswith(row["path_in_repo"])
                    else str(Path(row["file"]).parent) + "/"
                )
                cand = [base / rel / m.group(1), base / rel / Path(m.group(1)).with_suffix(".flac")]
                hit = next((c for c in cand if c.is_file()), None)
                if hit is None:
                    skipped.append({"id": row["id"], "video": str(video), "reason": f"paired audio missing: {cand[0]}"})
                    continue
                audio = str(hit)
            no_speech = not m and (any(k in notes for k in NO_SPEECH_MARKERS) or "silent" in row.get("audio_sr", ""))
            if no_speech and not keep_silent:
                skipped.append({"id": row["id"], "video": str(video), "reason": "no usable speech audio (per notes)"})
                continue
            ident = row.get("identity_label") or row["id"]
            out.append(
                Source(
                    _safe(f"{row['id']}_{Path(row['file']).stem}"), str(video), audio, ident, want_audio=not no_speech
                )
            )
    return out, skipped


def index_voxceleb2(root: str | Path) -> list[Source]:
    r = Path(root)
    return [
        Source(_safe(f"{v.parent.parent.name}_{v.parent.name}_{v.stem}"), str(v), None, v.parent.parent.name)
        for v in sorted(r.glob("*/*/*.mp4"))
    ]


def index_lrw(root: str | Path) -> list[Source]:
    r = Path(root)
    return [
        Source(_safe(f"{v.parent.parent.name}_{v.parent.name}_{v.stem}"), str(v), None, _safe(f"lrw_{v.stem}"))
        for v in sorted(r.glob("*/*/*.mp4"))
    ]


def index_folder(root: str | Path) -> list[Source]:
    r = Path(root)
    out = []
    for v in sorted(q for q in r.rglob("*") if q.suffix.lower() in VIDEO_EXTS):
        audio = next((str(v.with_suffix(e)) for e in (".wav", ".flac") if v.with_suffix(e).is_file()), None)
        ident = v.parent.name if v.parent != r else v.stem
        out.append(Source(_safe(str(v.relative_to(r).with_suffix(""))), str(v), audio, ident))
    return out


# ------------------------------------------------------------------------------------ one clip
class ClipFaces:
    """The face service of one preprocessing process: one FaceCropper for all its clips, made on
    first use (a rerun over cached clips, or clips skipped for their audio, never loads mediapipe).
    One caller at a time: a video crop keeps per-call smoothing state on the cropper."""

    def __init__(self) -> None:
        self._cropper = None

    def cropper(self):  # -> rt_engine.inputs.face.FaceCropper
        if self._cropper is None:
            from rt_engine.inputs.face import FaceCropper

            self._cropper = FaceCropper()
        return self._cropper

    def close(self) -> None:
        if self._cropper is not None:
            self._cropper.close()
            self._cropper = None

    def __enter__(self) -> ClipFaces:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_frames(path: Path, frames: np.ndarray, crf: int = 14) -> None:
    """[N,224,224,3] u8 -> H.264 mp4 at 25 fps (near-lossless, a few MB per minute)."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        vs.options = {"crf": str(crf), "preset": "veryfast"}
        for k, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            f.pts, f.time_base = k, Fraction(1, FPS)
            for pkt in vs.encode(f):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)


def process_clip(src: Source, out_root: str, faces: ClipFaces) -> dict:
    """Crop (with ``faces``), resample and cache one clip. Returns {'id', 'status': ok|cached|skipped, ...}."""
    import cv2

    from rt_engine.inputs import audio as audio_in
    from rt_engine.inputs.face import looks_aligned
    from rt_engine.inputs.pose import read_video

    cv2.setNumThreads(1)
    d = Path(out_root) / "clips" / src.id
    if (d / "meta.json").is_file():
        return {**json.loads((d / "meta.json").read_text()), "status": "cached"}
    base = {"id": src.id, "video": src.video}
    try:
        mel = None
        if src.want_audio:
            try:
                wav = audio_in.load_audio(src.audio or src.video)
            except InputError as e:
                return {**base, "status": "skipped", "reason": f"no audio ({e})"}
            if audio_in.is_silent(wav):
                return {**base, "status": "skipped", "reason": "no audio (silent track)"}
            _, mel = audio_in.audio_features(wav)
        frames = read_video(src.video)  # [N,H,W,3] at 25 fps
        if frames.shape[1:3] == (224, 224) and looks_aligned(frames[0], faces.cropper()):
            crops, how = frames, "already aligned"
        else:
            crops, how = faces.cropper().crop_video(frames, name=src.id), "face-tracked"  # [N,224,224,3]
        n_usable = len(frames)
        if mel is not None:
            t = audio_in.target_frames(mel.shape[0])
            n_usable = int((t < len(crops)).sum())
        if n_usable < MIN_FRAMES:
            return {**base, "status": "skipped", "reason": f"too short ({n_usable} usable frames < {MIN_FRAMES})"}
    except NoFaceError as e:
        return {**base, "status": "skipped", "reason": f"no face ({e})"}
    except RtEngineError as e:
        return {**base, "status": "skipped", "reason": f"unreadable ({e})"}
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_frames(tmp / "frames.mp4", crops)
    if mel is not None:
        np.save(tmp / "mel.npy", mel.astype(np.float32))
    meta = {**asdict(src), "n_frames": len(crops), "n_usable": n_usable, "has_audio": mel is not None, "crop": how}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks the clip complete
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return {**meta, "status": "ok"}


def process_clips(sources: list[Source], out_root: str) -> list[dict]:
    """One worker task: a run of clips sharing one face service (its cropper is made once per task)."""
    with ClipFaces() as faces:
        return [process_clip(s, out_root, faces) for s in sources]


# ------------------------------------------------------------------------------------ driver
def run(sources: list[Source], out: str | Path, workers: int = 1, pre_skipped: list[dict] | None = None) -> dict:
    """Process every source (in parallel), then write index.json and report.json."""
    from tqdm import tqdm

    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    ids = [s.id for s in sources]
    if len(set(ids)) != len(ids):
        raise InputError("clip ids are not unique; rename the inputs")
    results = []
    if workers <= 1:
        with ClipFaces() as faces:
            for s in tqdm(sources, desc="preprocess", unit="clip"):
                results.append(process_clip(s, str(out), faces))
    else:
        # consecutive runs of clips, a few per worker (balance) and at most 32 (progress, one cropper each)
        size = max(1, min(32, -(-len(sources) // (4 * workers))))
        chunks = [sources[i : i + size] for i in range(0, len(sources), size)]
        with (
            ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex,
            tqdm(total=len(sources), desc="preprocess", unit="clip") as bar,
        ):
            futs = [ex.submit(process_clips, c, str(out)) for c in chunks]
            for c, f in zip(chunks, futs, strict=True):  # in source order
                results.extend(f.result())
                bar.update(len(c))
    ok = [r for r in results if r["status"] in ("ok", "cached")]
    skipped = list(pre_skipped or []) + [r for r in results if r["status"] == "skipped"]
    keys = ("id", "identity", "n_frames", "n_usable", "has_audio", "video", "audio", "crop")
    index = {"fps": FPS, "clips": [{k: r.get(k) for k in keys} for r in ok]}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    report = {
        "ok": len(ok),
        "skipped": skipped,
        "seconds_with_audio": sum(r["n_usable"] for r in ok if r["has_audio"]) / FPS,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log.info("%d clips ready (%.1f s with speech), %d skipped", len(ok), report["seconds_with_audio"], len(skipped))
    for s in skipped:
        log.info("skipped %s: %s", s["id"], s["reason"])
    return report


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.preprocess", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--csv", help="data table (e.g. ../shared/data/train.csv)")
    g.add_argument("--voxceleb2", help="VoxCeleb2 mp4 root: <id>/<video>/<utt>.mp4")
    g.add_argument("--lrw", help="LRW root: <WORD>/<split>/<WORD>_<n>.mp4")
    g.add_argument("--folder", help="any folder of videos")
    ap.add_argument("--out", required=True, help="cache folder, e.g. runs/data/train")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument(
        "--keep-silent",
        action="store_true",
        help="csv: keep video-only clips (identity stage, joint --video-only-frac)",
    )
    ap.add_argument("--only", default=None, help="comma-separated clip ids to process (debugging)")
    ap.add_argument("--limit", type=int, default=None, help="process at most this many clips")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    pre: list[dict] = []
    if args.csv:
        sources, pre = index_csv(args.csv, args.keep_silent)
    elif args.voxceleb2:
        sources = index_voxceleb2(args.voxceleb2)
    elif args.lrw:
        sources = index_lrw(args.lrw)
    else:
        sources = index_folder(args.folder)
    if args.only:
        want = set(args.only.split(","))
        sources = [s for s in sources if s.id in want or s.id.split("_")[0] in want]
    if args.limit is not None:
        sources = sources[: args.limit]
    if not sources:
        raise InputError("no input videos found")
    run(sources, args.out, args.workers, pre)
    return 0


if __name__ == "__main__":
    sys.exit(main())
