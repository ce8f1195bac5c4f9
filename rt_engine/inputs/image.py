"""Image front end: the official crop / resize / normalisation of aligned 224x224 face crops.

Steps (identical for the identity image and every pose frame):
decode (OpenCV, BGR) -> rows 0:192, cols 16:208 -> cv2.resize to 224x224 (uint8 bilinear)
-> RGB -> ``x = u8 / 127.5 - 1`` (no mean/std normalisation).
Raw photos and videos that are not aligned crops are first cropped to the VoxCeleb2 framing by
:mod:`rt_engine.inputs.face`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from rt_engine.errors import InputError

ALIGNED_SIZE = 224
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8. -> [H,W,3]"""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image file not found: {p}")
    bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if bgr is None:
        raise InputError(f"{p}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_image_bytes(data: bytes, name: str = "upload") -> np.ndarray:
    """Decode image bytes (upload) to RGB uint8. -> [H,W,3]"""
    arr = np.frombuffer(data, np.uint8)
    bgr = cv2.imdecode(arr, cv2.IMREAD_COLOR) if arr.size else None
    if bgr is None:
        raise InputError(f"{name}: not a readable image (jpg, png, bmp or webp)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def official_crop(aligned_rgb: np.ndarray) -> np.ndarray:
    """[224,224,3] u8 aligned crop -> [224,224,3] u8 network crop (top 192 rows, 16 px each side,
    resized back to 224 with OpenCV's uint8 bilinear)."""
    if aligned_rgb.shape[:2] != (ALIGNED_SIZE, ALIGNED_SIZE):
        aligned_rgb = cv2.resize(aligned_rgb, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=cv2.INTER_AREA)
    crop = np.ascontiguousarray(aligned_rgb[0:192, 16:208])
    return cv2.resize(crop, (ALIGNED_SIZE, ALIGNED_SIZE))


def to_tensor(u8: np.ndarray) -> Tensor:
    """[N,H,W,3] or [H,W,3] uint8 RGB -> [N,3,H,W] float32 in [-1,1] (u8 / 127.5 - 1)."""
    a = torch.from_numpy(np.ascontiguousarray(u8))
    if a.ndim == 3:
        a = a[None]
    return a.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: Tensor, inplace: bool = False) -> np.ndarray:
    """[N,3,H,W] in [-1,1] -> [N,H,W,3] uint8, truncating like the official ``tensor2im``.
    ``inplace``: scale a float32 CPU ``x`` in place (no temporaries; ``x`` is consumed) and return
    a contiguous array; the numbers are the same either way."""
    if inplace and x.dtype == torch.float32 and x.device.type == "cpu":
        y = x.detach().add_(1).div_(2).mul_(255).clamp_(0, 255)
        return y.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    y = ((x.detach().float().cpu() + 1) / 2 * 255).clamp(0, 255)
    return y.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def list_frames(folder: str | Path) -> list[Path]:
    """Image files of a frames folder, in name order."""
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"frames folder not found: {d}")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise InputError(f"{d}: no image frames (.jpg/.png) inside")
    return files


def pingpong_index(i: int, n: int) -> int:
    """Official pose-frame index of target frame i over an n-frame clip (forward, then backward)."""
    if n <= 0:
        raise ValueError("empty pose clip")
    return i % n if (i // n) % 2 == 0 else n - 1 - (i % n)
