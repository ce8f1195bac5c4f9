"""Training samples from a preprocessed cache (``python -m training.preprocess``).

A cache folder holds ``index.json`` and per clip ``clips/<id>/frames.mp4`` (aligned 224x224
crops at 25 fps), ``mel.npy`` ([T,80] log-mel, 100 rows/s) and ``meta.json``.

One sample, for target frame ``i`` of clip ``c``::

    target  official_crop(frame i)                           [3,224,224]  what G must produce
    mel     mel_window(mel, i)                               [1,80,20]    the 0.2 s around frame i
    ref     official_crop(frame j), j != i, same clip        [3,224,224]  identity branch input
    aug     official_crop(augment(frame i))                  [3,224,224]  non-identity branch input
    label   identity index                                   []
    opening mouth opening of frame i, z-scored in the clip   []           if the cache has mouth.npy
    opening_raw  the same as measured (lip gap / eye width)  []
    speech  True: the mel is this frame's own audio          []           bool
    neg_mel / neg_aug  N negatives (other clips, time shifts of the same clip)  [N,1,80,20] / [N,3,224,224]

With ``video_only_frac > 0`` (joint stage) that fraction of the samples comes from video-only clips
(``preprocess --keep-silent``): more faces for the identity and pose branches. Their mel is a window
of a random speech clip and ``speech`` is False, so the losses that tie the mouth to the audio leave
them out (their opening labels are NaN).

Batches are a pure function of (seed, step, rank): resuming at step k reproduces the data
order exactly, whatever happened before.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rt_engine.errors import InputError
from rt_engine.inputs import audio as audio_in
from rt_engine.inputs.image import official_crop, to_tensor
from training.augment import Look, augment_nonidentity

log = logging.getLogger(__name__)


@dataclass
class Clip:
    id: str
    identity: str
    label: int  # index into ClipStore.identities
    frames: np.ndarray  # [N,224,224,3] uint8 aligned crops
    mel: np.ndarray | None  # [T,80] float32, None for clips without speech
    valid: np.ndarray  # [F] frame indices that have both a frame and a full mel window
    opening: np.ndarray | None = None  # [N] mouth opening z-scored within the clip, NaN = no label
    opening_raw: np.ndarray | None = None  # [N] mouth opening as measured (inner-lip gap / eye width)


def read_holdout(path: str | Path | None) -> set[str]:
    """Identity labels listed in a holdout file (one per line, '#' starts a comment)."""
    if not path:
        return set()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"holdout file not found: {p}")
    out = set()
    for line in p.read_text().splitlines():
        tok = line.split("#", 1)[0].strip()
        if tok:
            out.add(tok.split()[0])
    return out


def decode_frames(path: Path) -> np.ndarray:
    """frames.mp4 of the cache -> [N,H,W,3] uint8 (every stored frame, already 25 fps)."""
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def load_opening(path: Path, n_frames: int) -> np.ndarray | None:
    """mouth.npy of ``python -m training.mouth_labels`` -> [N] opening as measured (inner-lip gap /
    eye width), NaN where there was no face. None when the clip has no labels."""
    if not path.is_file():
        return None
    x = np.load(path).astype(np.float32)
    if len(x) != n_frames:
        raise InputError(f"{path}: {len(x)} labels for {n_frames} frames (rerun training.mouth_labels --force)")
    return x


def z_score_opening(raw: np.ndarray | None) -> np.ndarray | None:
    """[N] measured opening -> z-scored within the clip (so the target is "more or less open than
    this speaker usually is"), clipped to +-3; NaN stays NaN. None passes through."""
    if raw is None:
        return None
    ok = np.isfinite(raw)
    if ok.sum() < 2:
        return np.full(len(raw), np.nan, np.float32)
    z = (raw - raw[ok].mean()) / max(float(raw[ok].std()), 1e-6)
    return np.clip(z, -3.0, 3.0).astype(np.float32)


def read_index(root: str | Path) -> list[dict]:
    """The clip entries of a cache's ``index.json`` (id, identity, n_frames, n_usable, has_audio, ...)."""
    idx_path = Path(root) / "index.json"
    if not idx_path.is_file():
        raise InputError(f"{root}: no index.json (run python -m training.preprocess first)")
    return json.loads(idx_path.read_text())["clips"]


class ClipStore:
    """All clips of a cache in memory, filtered by holdout and by what the stage needs."""

    def __init__(
        self,
        root: str | Path,
        holdout: set[str] | None = None,
        need_audio: bool = True,
        max_clips: int | None = None,
        only_ids: set[str] | None = None,
    ):
        self.root = Path(root)
        entries = read_index(self.root)
        holdout = holdout or set()
        kept = [
            e
            for e in entries
            if e["identity"] not in holdout
            and (e["has_audio"] or not need_audio)
            and (only_ids is None or e["id"] in only_ids)
        ]
        if max_clips is not None:
            kept = kept[:max_clips]
        if not kept:
            raise InputError(f"{self.root}: no usable clips (holdout {sorted(holdout)}, need_audio={need_audio})")
        self.identities = sorted({e["identity"] for e in kept})
        self.clips: list[Clip] = []
        for e in kept:
            d = self.root / "clips" / e["id"]
            frames = decode_frames(d / "frames.mp4")
            mel = np.load(d / "mel.npy") if e["has_audio"] else None
            if mel is not None:
                t = audio_in.target_frames(mel.shape[0])
                valid = t[t < len(frames)]
            else:
                valid = np.arange(len(frames), dtype=np.int64)
            if len(valid) < 2:
                log.warning("clip %s: fewer than 2 usable frames, left out", e["id"])
                continue
            raw = load_opening(d / "mouth.npy", len(frames))
            self.clips.append(
                Clip(
                    e["id"],
                    e["identity"],
                    self.identities.index(e["identity"]),
                    frames,
                    mel,
                    valid,
                    z_score_opening(raw),
                    raw,
                )
            )
        if not self.clips:
            raise InputError(f"{self.root}: every clip is too short")
        # sample clips in proportion to their usable frames
        sizes = np.array([len(c.valid) for c in self.clips], np.float64)
        # draw probabilities per pool: None any clip, True clips with speech, False video-only clips
        speech = np.array([c.mel is not None for c in self.clips])
        self.pool_p: dict[bool | None, np.ndarray] = {None: sizes / sizes.sum()}
        for kind in (True, False):
            w = np.where(speech == kind, sizes, 0.0)
            if w.sum() > 0:
                self.pool_p[kind] = w / w.sum()
        log.info(
            "data: %d clips, %d identities, %d frames (holdout %d identities)",
            len(self.clips),
            len(self.identities),
            int(sizes.sum()),
            len(holdout),
        )

    @property
    def has_opening(self) -> bool:
        """Every clip with speech has mouth-opening labels (video-only clips need none)."""
        return all(c.opening is not None for c in self.clips if c.mel is not None)

    @property
    def num_identities(self) -> int:
        return len(self.identities)

    def draw(self, rng: np.random.Generator, speech: bool | None = None) -> tuple[int, int]:
        """A random (clip index, frame index); ``speech`` True/False: from the clips with/without
        speech only (None: any clip)."""
        if speech not in self.pool_p:
            raise InputError(f"{self.root}: no clip {'with' if speech else 'without'} speech to draw from")
        c = int(rng.choice(len(self.clips), p=self.pool_p[speech]))
        return c, int(rng.choice(self.clips[c].valid))


def sample_negatives(
    rng: np.random.Generator,
    valid: list[np.ndarray],
    clip: int,
    frame: int,
    n: int,
    min_shift: int,
    same_frac: float = 0.5,
) -> list[tuple[int, int]]:
    """N negatives for the positive (clip, frame): a fraction ``same_frac`` from the same clip at
    least ``min_shift`` frames away (negative m is one when floor((m+1)*same_frac) > floor(m*same_frac):
    0.5 gives every second one), the rest from other clips. Falls back to the other kind when one
    kind does not exist. Never returns the positive itself.
    ``valid``: usable frame indices of every clip."""
    same = valid[clip][np.abs(valid[clip] - frame) >= min_shift]
    others = [k for k in range(len(valid)) if k != clip]
    out: list[tuple[int, int]] = []
    for m in range(n):
        want_same = int(np.floor((m + 1) * same_frac)) > int(np.floor(m * same_frac))
        use_same = len(same) > 0 and (want_same or not others)
        if use_same:
            out.append((clip, int(rng.choice(same))))
        elif others:
            k = others[int(rng.integers(len(others)))]
            out.append((k, int(rng.choice(valid[k]))))
        else:
            raise InputError(f"no negative possible for clip {clip}: one clip and no frame {min_shift} frames away")
    return out


@dataclass
class AugmentParams:
    color_strength: float = 0.2
    persp_margin: float = 0.1
    persp_shift: float = 0.06
    crop_min: float = 0.85


class Batcher:
    """Makes the batch of a given step; a pure function of (seed, step, rank)."""

    def __init__(
        self,
        store: ClipStore,
        batch_size: int,
        num_negatives: int,
        min_shift: int,
        seed: int,
        rank: int = 0,
        aug: AugmentParams | None = None,
        negatives: bool = True,
        same_frac: float = 0.5,
        video_only_frac: float = 0.0,
        look_p: float = 0.0,
        look_strength: float = 0.3,
    ):
        self.store = store
        if video_only_frac > 0 and (negatives or False not in store.pool_p or True not in store.pool_p):
            raise InputError(
                "video_only_frac needs clips with and without speech, and no negatives "
                "(video-only samples have no speech to contrast)"
            )
        self.video_only_frac = video_only_frac
        self.look_p = look_p  # share of samples given a new Look (mirror / recolour, all frames alike)
        self.look_strength = look_strength
        self.bs = batch_size
        self.n_neg = num_negatives
        self.min_shift = min_shift
        self.seed = seed
        self.rank = rank
        self.aug = aug or AugmentParams()
        self.negatives = negatives
        self.same_frac = same_frac
        self._valid = [c.valid for c in store.clips]

    def _net(self, img: np.ndarray) -> np.ndarray:
        return official_crop(img)

    def _aug(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a = self.aug
        return official_crop(augment_nonidentity(img, rng, a.color_strength, a.persp_margin, a.persp_shift, a.crop_min))

    def batch(self, step: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.seed, step, self.rank])
        clips = self.store.clips
        tgt, ref, aug, mel, lab, neg_mel, neg_aug, pos, opening, opening_raw = [], [], [], [], [], [], [], [], [], []
        speech = []
        for _ in range(self.bs):
            if self.video_only_frac > 0:  # (frac 0 draws exactly as before this option existed)
                c, i = self.store.draw(rng, speech=bool(rng.random() >= self.video_only_frac))
            else:
                c, i = self.store.draw(rng)
            clip = clips[c]
            speech.append(clip.mel is not None)
            j = int(rng.choice(clip.valid[clip.valid != i]))
            frame_i, frame_j = clip.frames[i], clip.frames[j]  # [H,W,3] u8
            if self.look_p > 0 and rng.random() < self.look_p:  # (p 0 draws exactly as before this option)
                look = Look.random(rng, self.look_strength)
                frame_i, frame_j = look(frame_i), look(frame_j)
            tgt.append(self._net(frame_i))
            ref.append(self._net(frame_j))
            aug.append(self._aug(frame_i, rng))
            lab.append(clip.label)
            pos.append((c, i))
            no_label = clip.opening is None or clip.mel is None  # video-only: not tied to any audio
            opening.append(np.nan if no_label else clip.opening[i])
            opening_raw.append(np.nan if no_label else clip.opening_raw[i])
            if clip.mel is not None:
                mel.append(audio_in.mel_window(clip.mel, i))
            elif self.video_only_frac > 0:  # someone else's speech: the mouth is not judged on it
                k, f = self.store.draw(rng, speech=True)
                mel.append(audio_in.mel_window(clips[k].mel, f))
            if self.negatives and clip.mel is not None:
                for k, f in sample_negatives(rng, self._valid, c, i, self.n_neg, self.min_shift, self.same_frac):
                    neg_mel.append(audio_in.mel_window(clips[k].mel, f))
                    neg_aug.append(self._aug(clips[k].frames[f], rng))
        out = {
            "target": to_tensor(np.stack(tgt)),
            "ref": to_tensor(np.stack(ref)),
            "aug": to_tensor(np.stack(aug)),
            "label": torch.tensor(lab, dtype=torch.long),
            "pos": torch.tensor(pos, dtype=torch.long),
            "speech": torch.tensor(speech, dtype=torch.bool),
        }  # [B] the mel is this frame's audio
        if self.store.has_opening:
            out["opening"] = torch.tensor(opening, dtype=torch.float32)  # [B] z-scored, NaN = no label
            out["opening_raw"] = torch.tensor(opening_raw, dtype=torch.float32)  # [B] as measured
        if len(mel) == self.bs:
            out["mel"] = torch.from_numpy(np.stack(mel))  # [B,1,80,20]
        if neg_mel and len(neg_mel) == self.bs * self.n_neg:
            n = self.n_neg
            out["neg_mel"] = torch.from_numpy(np.stack(neg_mel)).reshape(self.bs, n, 1, 80, -1)  # [B,N,1,80,20]
            out["neg_aug"] = to_tensor(np.stack(neg_aug)).reshape(self.bs, n, 3, *out["aug"].shape[-2:])
        return out
