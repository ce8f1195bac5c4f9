"""Augmentations of the non-identity branch (paper Sec. 3.2).

The pose encoder sees the target frame after three changes that alter appearance but keep pose
and mouth shape, so it cannot pass identity through:

* :func:`color_transfer`: random per-channel gain and bias (random RGB channel changes);
* :func:`perspective`: source points outside the image by a random margin, target points moved
  symmetrically along x (a small out-of-plane tilt);
* :func:`centered_crop`: a random-size crop around the image centre, resized back.

All take and return ``[H,W,3]`` uint8 RGB and draw from a ``numpy.random.Generator``.

Not in the paper: :class:`Look` changes a whole joint-stage sample (target, identity reference and
the pose branch's frame) the same way, mirrored and/or recoloured, so that few identities look like
more: the generator must take colours and sides from the reference instead of remembering them.
"""

from __future__ import annotations

import cv2
import numpy as np


def gain_bias(img: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """img * gain + bias per channel (float32 [3] each), rounded and clipped. [H,W,3] u8"""
    out = img.astype(np.float32) * gain + bias
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def color_transfer(img: np.ndarray, rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
    """Per-channel gain in [1-s, 1+s] and bias in [-s/2, s/2] of the full range. [H,W,3] u8"""
    gain = rng.uniform(1 - strength, 1 + strength, size=3).astype(np.float32)  # [3]
    bias = rng.uniform(-strength / 2, strength / 2, size=3).astype(np.float32) * 255  # [3]
    return gain_bias(img, gain, bias)


class Look:
    """One mirror + per-channel gain/bias, applied identically to every frame of a sample."""

    def __init__(self, flip: bool, gain: np.ndarray, bias: np.ndarray) -> None:
        self.flip, self.gain, self.bias = bool(flip), gain.astype(np.float32), bias.astype(np.float32)  # [3], [3]

    @classmethod
    def random(cls, rng: np.random.Generator, strength: float = 0.3) -> Look:
        """Mirror with probability 1/2; gain in [1-s, 1+s] and bias in [-s/2, s/2] of the range per channel."""
        flip = bool(rng.random() < 0.5)
        gain = rng.uniform(1 - strength, 1 + strength, size=3)
        bias = rng.uniform(-strength / 2, strength / 2, size=3) * 255
        return cls(flip, gain, bias)

    def __call__(self, img: np.ndarray) -> np.ndarray:  # [H,W,3] u8 -> [H,W,3] u8
        return gain_bias(img[:, ::-1] if self.flip else img, self.gain, self.bias)


def perspective_points(w: int, h: int, margin: float, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Corner correspondences of the paper's perspective change.

    Source: the four corners pushed ``margin`` pixels outside the image (tl, tr, br, bl).
    Target: the same points with the top pair moved ``shift`` pixels towards the vertical centre
    line and the bottom pair moved ``shift`` pixels away from it (symmetric along x, y unchanged).
    Returns (src [4,2], dst [4,2]) float32.
    """
    m = float(margin)
    src = np.array([[-m, -m], [w - 1 + m, -m], [w - 1 + m, h - 1 + m], [-m, h - 1 + m]], np.float32)
    d = float(shift)
    dst = src.copy()
    dst[:, 0] += np.array([d, -d, d, -d], np.float32)  # tl right, tr left, br right, bl left
    return src, dst


def perspective_matrix(w: int, h: int, margin: float, shift: float) -> np.ndarray:
    """3x3 homography mapping the source points of :func:`perspective_points` to the target ones."""
    src, dst = perspective_points(w, h, margin, shift)
    return cv2.getPerspectiveTransform(src, dst)


def perspective(
    img: np.ndarray, rng: np.random.Generator, max_margin: float = 0.1, max_shift: float = 0.06
) -> np.ndarray:
    """Random perspective change: margin in [0, max_margin]*W, shift in [-max_shift, max_shift]*W."""
    h, w = img.shape[:2]
    margin = rng.uniform(0, max_margin) * w
    shift = rng.uniform(-max_shift, max_shift) * w
    hmat = perspective_matrix(w, h, margin, shift)
    return cv2.warpPerspective(img, hmat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def centered_box(w: int, h: int, scale: float) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a crop keeping ``scale`` of each side, centred on the image centre."""
    cw = max(1, int(round(w * scale)))
    ch = max(1, int(round(h * scale)))
    cw += (w - cw) % 2  # same margin left and right, so the box centre is the image centre
    ch += (h - ch) % 2
    x0 = (w - cw) // 2
    y0 = (h - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


def centered_crop(img: np.ndarray, rng: np.random.Generator, min_scale: float = 0.85) -> np.ndarray:
    """Centred crop of random scale in [min_scale, 1], resized back to the input size."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = centered_box(w, h, rng.uniform(min_scale, 1.0))
    return cv2.resize(np.ascontiguousarray(img[y0:y1, x0:x1]), (w, h), interpolation=cv2.INTER_LINEAR)


def augment_nonidentity(
    img: np.ndarray,
    rng: np.random.Generator,
    color_strength: float = 0.2,
    persp_margin: float = 0.1,
    persp_shift: float = 0.06,
    crop_min: float = 0.85,
) -> np.ndarray:
    """The full non-identity augmentation: colour -> perspective -> centred crop. [H,W,3] u8"""
    out = color_transfer(img, rng, color_strength)
    out = perspective(out, rng, persp_margin, persp_shift)
    return centered_crop(out, rng, crop_min)
