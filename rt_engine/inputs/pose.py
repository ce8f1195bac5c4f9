"""Pose sources: video files, frame folders, built-in idle motion, a still pose.

All of them end as aligned 224x224 RGB crops that the pose encoder turns into pose codes.
Videos are resampled to 25 fps by the nearest earlier frame (:func:`iter_video`); the official
semantics play a pose clip forward then backward (:func:`rt_engine.inputs.image.pingpong_index`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from rt_engine.config import FPS
from rt_engine.errors import InputError
from rt_engine.inputs.image import IMAGE_EXTS, VIDEO_EXTS, list_frames, read_image

log = logging.getLogger(__name__)


def iter_video(path: str | Path, fps: float = FPS, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decode a video lazily, resampled to ``fps``: output frame k (time k/fps from the first frame)
    is the last decoded frame at or before that time. Yields [H,W,3] RGB uint8.

    The one 25 fps rule of the project: inference (:func:`read_video`) and the evaluation
    (``benchmarks.quality``) both use it."""
    import av

    p = Path(path)
    if not p.is_file():
        raise InputError(f"video file not found: {p}")
    k = 0
    t0 = prev = None  # time of the first frame; the last decoded frame
    t_prev = 0.0
    try:
        with av.open(str(p)) as c:
            if not c.streams.video:
                raise InputError(f"{p}: has no video track")
            vs = c.streams.video[0]
            for n, f in enumerate(c.decode(vs)):
                t = float(f.time) if f.time is not None else n / float(vs.average_rate or fps)
                t0 = t if t0 is None else t0
                t -= t0
                while prev is not None and k / fps + 1e-6 < t:  # frames before this one's time
                    if max_frames is not None and k >= max_frames:
                        return
                    yield prev
                    k += 1
                prev, t_prev = f.to_ndarray(format="rgb24"), t
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{p}: unreadable video ({type(e).__name__}: {e})") from None
    if prev is None:
        raise InputError(f"{p}: no video frames")
    n_out = max(1, int(math.floor(t_prev * fps + 1e-6)) + 1)  # up to the last frame's time
    while k < n_out and (max_frames is None or k < max_frames):
        yield prev
        k += 1


def read_video(path: str | Path, fps: float = FPS, max_frames: int | None = None) -> np.ndarray:
    """Decode a video to RGB uint8 frames resampled to ``fps`` (:func:`iter_video`). -> [N,H,W,3]"""
    return np.stack(list(iter_video(path, fps, max_frames)))


def read_frames(source: str | Path, max_frames: int | None = None) -> np.ndarray:
    """A video file, a folder of frames or a single image -> RGB frames [N,H,W,3] at 25 fps."""
    p = Path(source)
    if p.is_dir():
        files = list_frames(p)[:max_frames]
        return np.stack([read_image(f) for f in files])
    if p.suffix.lower() in IMAGE_EXTS:
        return read_image(p)[None]
    if p.suffix.lower() in VIDEO_EXTS or p.is_file():
        return read_video(p, max_frames=max_frames)
    raise InputError(f"pose source not found: {p}")


def align_frames(frames: np.ndarray, aligned: bool, name: str = "video") -> np.ndarray:
    """[N,H,W,3] RGB -> aligned VoxCeleb2-framed crops [N,224,224,3] (detected and smoothed unless
    ``aligned``)."""
    if aligned:
        if frames.shape[1:3] != (224, 224):
            frames = np.stack([cv2.resize(f, (224, 224), interpolation=cv2.INTER_AREA) for f in frames])
        return frames
    from rt_engine.inputs.face import FaceCropper

    with FaceCropper() as fc:  # its own instance: video smoothing keeps per-call state
        return fc.crop_video(frames, name=name)


def align_image(img: np.ndarray, aligned: bool, name: str = "image") -> np.ndarray:
    """[H,W,3] RGB -> aligned crop [224,224,3]."""
    return align_frames(img[None], aligned, name)[0] if aligned else _crop_one(img, name)


def _crop_one(img: np.ndarray, name: str) -> np.ndarray:
    from rt_engine.inputs.face import FaceCropper

    with FaceCropper() as fc:
        return fc.crop_image(img, name=name)


# ------------------------------------------------------------------------------------ idle motion
IDLE_KEY_FPS = 5  # idle poses are encoded at 5 key frames/s and interpolated to 25 fps


def idle_transforms(n: int, seed: int = 0, fps: float = FPS) -> np.ndarray:
    """Smooth small head motion: per frame (angle deg, dx, dy, scale) from sums of slow sinusoids
    with incommensurate periods (2.3-9 s). -> [n,4]"""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fps
    out = np.zeros((n, 4))
    amps = (2.5, 3.0, 2.0, 0.015)  # degrees, pixels, pixels, relative scale
    for j, a in enumerate(amps):
        periods = rng.uniform(2.3, 9.0, size=3)
        phases = rng.uniform(0, 2 * np.pi, size=3)
        w = np.array([0.6, 0.3, 0.1])
        out[:, j] = a * sum(wk * np.sin(2 * np.pi * t / pk + ph) for wk, pk, ph in zip(w, periods, phases, strict=True))
    out[:, 3] += 1.0
    return out


def idle_frames(aligned_rgb: np.ndarray, n: int, seed: int = 0, fps: float = IDLE_KEY_FPS) -> np.ndarray:
    """The identity crop moved by :func:`idle_transforms`, sampled at ``fps``. -> [n,224,224,3]"""
    tf = idle_transforms(n, seed, fps)
    h, w = aligned_rgb.shape[:2]
    out = []
    for ang, dx, dy, s in tf:
        m = cv2.getRotationMatrix2D((w / 2, h * 0.45), ang, s)
        m[:, 2] += (dx, dy)
        out.append(cv2.warpAffine(aligned_rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return np.stack(out)


def interpolate_codes(key_codes: np.ndarray, n: int, key_fps: float = IDLE_KEY_FPS, fps: float = FPS) -> np.ndarray:
    """Linear interpolation of key-frame pose codes [K,D] to n frames at ``fps``. -> [n,D]"""
    tk = np.arange(key_codes.shape[0]) / key_fps
    t = np.arange(n) / fps
    return np.stack([np.interp(t, tk, key_codes[:, d]) for d in range(key_codes.shape[1])], axis=1).astype(np.float32)
