"""Face detection and cropping to the VoxCeleb2 framing that PC-AVS expects.

PC-AVS was trained on 224x224 VoxCeleb2 face crops. Those crops come from a face-track box
(scaled and shifted, never rotated), so a raw photo or video is brought to the same framing by a
scale + translation that maps a few stable facial landmarks onto their mean position in the
aligned crops (``TEMPLATE_224``), followed by ``cv2.warpAffine`` to 224x224.

Landmarks come from mediapipe (``mediapipe==0.10.21``, which ships its model files): the
full-range face detector finds the face anywhere in the image, then the 468-point face mesh runs
on a square crop around that box. mediapipe is imported lazily; without it, :class:`FaceCropper`
raises :class:`rt_engine.errors.InputError`.

Videos: the per-frame transforms are median-filtered and Gaussian-smoothed over a centred window
(a bounded look-ahead buffer, so memory stays bounded for long clips); frames where detection
fails hold the last good transform (or the first good one for frames before it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from rt_engine.assets import DEFAULT_IDENTITY
from rt_engine.errors import InputError, NoFaceError

log = logging.getLogger(__name__)

# mediapipe face-mesh indices of the template keypoints: outer/inner eye corners, nose tip,
# mouth corners (image-left first).
KEYPOINT_INDICES: tuple[int, ...] = (33, 133, 362, 263, 1, 61, 291)
KEYPOINT_NAMES: tuple[str, ...] = (
    "eye_r_outer",
    "eye_r_inner",
    "eye_l_inner",
    "eye_l_outer",
    "nose_tip",
    "mouth_r",
    "mouth_l",
)

# Mean (x, y) pixel positions of KEYPOINT_INDICES in 224x224 aligned VoxCeleb2 crops.
# Measured by scripts/measure_face_template.py (mediapipe 0.10.21 face mesh, this module's
# detect()) over the PC-AVS demo crops in ../shared/data/demo (identity image, the 161 Pose_Source
# frames, the 363 Mouth_Source frames) and the 12 VoxCeleb2 224x224 clips under
# ../shared/data/train/pcavs (every 5th frame): 977 frames, a face found in all. Fitting each
# frame to this mean leaves 4.4 px mean residual with scale + translation and 3.0 px with an added
# rotation, whose angle averages 0.0 deg (std 6 deg = head roll, which the VoxCeleb2 crops keep):
# so the crop uses scale + translation only. tests/test_face.py re-measures it on the demo frames.
TEMPLATE_224 = np.array(
    [
        [68.98, 63.07],
        [89.62, 62.72],
        [118.13, 60.78],
        [142.11, 57.91],
        [99.04, 95.72],
        [86.74, 120.32],
        [128.62, 118.19],
    ],
    dtype=np.float32,
)  # [7,2]
TEMPLATE_SIZE = 224

# Mesh indices used to derive a dlib-style face box from the mesh (face oval + brows + chin).
_OVAL = (
    10,
    338,
    297,
    332,
    284,
    251,
    389,
    356,
    454,
    323,
    361,
    288,
    397,
    365,
    379,
    378,
    400,
    377,
    152,
    148,
    176,
    149,
    150,
    136,
    172,
    58,
    132,
    93,
    234,
    127,
    162,
    21,
    54,
    103,
    67,
    109,
)


@dataclass
class FaceBox:
    """One detected face, all coordinates in pixels of the image given to ``detect``."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    landmarks: np.ndarray  # [468,2] float32 (x, y) face-mesh points

    @property
    def keypoints(self) -> np.ndarray:
        """The template keypoints, [7,2] float32 (x, y)."""
        return self.landmarks[list(KEYPOINT_INDICES)]

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    def mesh_box(self) -> tuple[float, float, float, float]:
        """Tight box around the face oval of the mesh (forehead top to chin), (x0, y0, x1, y1)."""
        pts = self.landmarks[list(_OVAL)]
        return (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))


def fit_scale_translation(src: np.ndarray, dst: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``dst ~ s * src + t`` for point sets [K,2]; returns (s, tx, ty)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    sc, dc = src - ms, dst - md
    s = float((sc * dc).sum() / max((sc * sc).sum(), 1e-12))
    t = md - s * ms
    return s, float(t[0]), float(t[1])


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (scale, rotation, translation) ``dst ~ A @ src + t``; [2,3] matrix."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    sc, dc = src - ms, dst - md
    cov = dc.T @ sc / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u @ vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    s = float(np.trace(np.diag(d) @ sign) / max(sc.var(0).sum(), 1e-12))
    m = np.zeros((2, 3))
    m[:, :2] = s * rot
    m[:, 2] = md - s * rot @ ms
    return m


def _params_to_matrix(p: np.ndarray) -> np.ndarray:
    """(log s, tx, ty) -> [2,3] affine matrix."""
    s = math.exp(float(p[0]))
    return np.array([[s, 0.0, p[1]], [0.0, s, p[2]]], np.float64)


def _check_image(img: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(f"{what}: expected an [H,W,3] uint8 RGB image, got {img.dtype} {img.shape}")
    return np.ascontiguousarray(img)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 (native libraries' logging) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class FaceCropper:
    """Detects a face and crops it to the 224x224 VoxCeleb2 framing of PC-AVS.

    ``smoothing`` is the standard deviation, in frames, of the Gaussian that smooths the crop
    transform of a video over time (0 disables smoothing).
    """

    def __init__(self, size: int = 224, smoothing: float = 4.0, min_confidence: float = 0.5) -> None:
        if size <= 0:
            raise InputError(f"crop size must be positive, got {size}")
        self.size = int(size)
        self.smoothing = float(smoothing)
        self.min_confidence = float(min_confidence)
        self.template = TEMPLATE_224 * (self.size / TEMPLATE_SIZE)  # [7,2]
        # After a video crop: per-frame (log s, tx, ty) before and after smoothing, [N,3] each.
        self.last_raw_params: np.ndarray | None = None
        self.last_params: np.ndarray | None = None
        try:
            with _quiet_native_stderr():  # with protobuf 6 its import prints a harmless AttributeError
                import mediapipe as mp  # heavy optional dependency, imported lazily
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise InputError(
                "face cropping needs mediapipe: pip install --no-deps mediapipe==0.10.21 "
                "absl-py attrs flatbuffers 'protobuf<5' matplotlib"
            ) from e
        with _quiet_native_stderr():  # mediapipe's C++ start-up chatter would bury our one-line errors
            self._det_full = mp.solutions.face_detection.FaceDetection(
                model_selection=1, min_detection_confidence=self.min_confidence
            )
            self._det_short = mp.solutions.face_detection.FaceDetection(
                model_selection=0, min_detection_confidence=self.min_confidence
            )
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True,
                max_num_faces=1,
                refine_landmarks=False,
                min_detection_confidence=self.min_confidence,
            )
            warm = np.zeros((64, 64, 3), np.uint8)  # first inference logs too
            for g in (self._det_full, self._det_short, self._mesh):
                g.process(warm)
            face = cv2.imread(str(DEFAULT_IDENTITY))
            if face is not None:  # the mesh's landmark stage logs once, on its first real face
                self._mesh.process(np.ascontiguousarray(cv2.resize(face, (256, 256))[..., ::-1]))

    def close(self) -> None:
        for g in (self._det_full, self._det_short, self._mesh):
            g.close()

    def __enter__(self) -> FaceCropper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- detection
    def _boxes(self, img: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        """Detector boxes (x0, y0, x1, y1, score) in pixels, best (largest * score) first."""
        h, w = img.shape[:2]
        out = []
        for det in (self._det_full, self._det_short):
            res = det.process(img)
            for d in res.detections or []:
                bb = d.location_data.relative_bounding_box
                x0, y0 = bb.xmin * w, bb.ymin * h
                out.append((x0, y0, x0 + bb.width * w, y0 + bb.height * h, float(d.score[0])))
            if out:
                break
        out.sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]) * b[4])
        return out

    def _mesh_in_square(self, img: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray | None:
        """Runs the face mesh on a 256x256 resampling of the square (cx, cy, side); [468,2] or None."""
        n = 256
        s = n / side
        m = np.array([[s, 0.0, n / 2 - s * cx], [0.0, s, n / 2 - s * cy]])
        src = img
        if s < 0.5:  # pre-shrink with area averaging against aliasing
            f = s * 1.5
            src = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
            m[:, :2] /= f
        crop = cv2.warpAffine(src, m, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        res = self._mesh.process(np.ascontiguousarray(crop))
        if not res.multi_face_landmarks:
            return None
        lm = res.multi_face_landmarks[0].landmark
        pts = np.array([[p.x * n, p.y * n] for p in lm], np.float64)  # [468,2] in crop pixels
        pts = (pts - m[:, 2]) / s  # back to image pixels
        return pts.astype(np.float32)

    def detect(self, img_rgb_u8: np.ndarray) -> FaceBox | None:
        """Finds the main face: detector box + 468 mesh landmarks (pixels), or None."""
        img = _check_image(img_rgb_u8, "detect")
        h, w = img.shape[:2]
        boxes = self._boxes(img)
        for x0, y0, x1, y1, score in boxes[:3]:
            side = 1.9 * max(x1 - x0, y1 - y0)
            pts = self._mesh_in_square(img, (x0 + x1) / 2, (y0 + y1) / 2 + 0.05 * side, side)
            if pts is not None:
                return FaceBox(x0, y0, x1, y1, score, pts)
        # Fallback: the face may fill the image (close-up) so that the detector misses it.
        side = 1.5 * max(h, w)
        pts = self._mesh_in_square(img, w / 2, h / 2, side)
        if pts is None:
            return None
        x0, y0 = pts.min(0)
        x1, y1 = pts.max(0)
        return FaceBox(float(x0), float(y0), float(x1), float(y1), 0.0, pts)

    # ---------------------------------------------------------------- transforms
    def transform_for(self, face: FaceBox) -> np.ndarray:
        """Crop parameters (log s, tx, ty) [3] that map the face onto the template."""
        s, tx, ty = fit_scale_translation(face.keypoints, self.template)
        return np.array([math.log(max(s, 1e-6)), tx, ty], np.float64)

    def warp(self, img: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Applies crop parameters (log s, tx, ty) -> [size,size,3] uint8."""
        m = _params_to_matrix(params)
        s = m[0, 0]
        src = img
        if s < 0.5:
            f = s * 1.5
            src = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
            m[:, :2] /= f
        return cv2.warpAffine(src, m, (self.size, self.size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    # ---------------------------------------------------------------- public API
    def crop_image(self, img_rgb_u8: np.ndarray, name: str = "image") -> np.ndarray:
        """[H,W,3] uint8 RGB -> [size,size,3] uint8 RGB crop; NoFaceError when no face is found."""
        img = _check_image(img_rgb_u8, name)
        face = self.detect(img)
        if face is None:
            raise NoFaceError(f"no face found in {name}")
        return self.warp(img, self.transform_for(face))

    def iter_crop_video(self, frames_rgb_u8: Iterable[np.ndarray], name: str = "video") -> Iterator[np.ndarray]:
        """Streaming form of :meth:`crop_video`: yields [size,size,3] crops with a bounded delay."""
        sigma = self.smoothing
        half = int(math.ceil(2.5 * sigma)) if sigma > 0 else 0
        weights = np.exp(-0.5 * (np.arange(-half, half + 1) / max(sigma, 1e-6)) ** 2)  # [2h+1]
        frames: deque[np.ndarray] = deque()  # frames not yet emitted
        params: list[np.ndarray] = []  # [3] per frame seen (held for failures)
        first_good: int | None = None
        emitted = 0
        n_fail = 0
        used: list[np.ndarray] = []  # smoothed params of the emitted frames

        def smoothed(t: int) -> np.ndarray:
            lo, hi = max(0, t - half), min(len(params), t + half + 1)
            window = np.stack(params[lo:hi])  # [W,3]
            if len(window) >= 5:  # median-of-3 against single-frame landmark glitches
                med = window.copy()
                med[1:-1] = np.median(np.stack([window[:-2], window[1:-1], window[2:]]), axis=0)
                window = med
            wts = weights[lo - t + half : hi - t + half]
            return (window * wts[:, None]).sum(0) / wts.sum()

        for k, frame in enumerate(frames_rgb_u8):
            frame = _check_image(frame, f"{name} frame {k}")
            face = self.detect(frame)
            if face is not None:
                p = self.transform_for(face)
                if first_good is None:
                    first_good = k
                    params.extend([p] * k)  # frames before the first face take its transform
            else:
                n_fail += 1
                p = params[-1] if params else None
            if p is not None:
                params.append(p)
            frames.append(frame)
            while first_good is not None and emitted + half < len(params) and frames:
                used.append(smoothed(emitted))
                yield self.warp(frames.popleft(), used[-1])
                emitted += 1
        if first_good is None:
            raise NoFaceError(f"no face found in {name}")
        while frames:
            used.append(smoothed(emitted))
            yield self.warp(frames.popleft(), used[-1])
            emitted += 1
        self.last_raw_params = np.stack(params)
        self.last_params = np.stack(used)
        if n_fail:
            log.info("%s: no face in %d of %d frames (held the last good crop)", name, n_fail, emitted)

    def crop_video(self, frames_rgb_u8: Iterable[np.ndarray], name: str = "video") -> np.ndarray:
        """Frames [H,W,3] uint8 RGB -> [N,size,size,3] uint8, temporally smoothed crops."""
        crops = list(self.iter_crop_video(frames_rgb_u8, name))
        if not crops:
            raise NoFaceError(f"no face found in {name} (no frames)")
        return np.stack(crops)


def alignment_error(face: FaceBox, size: int = 224) -> tuple[float, float]:
    """(|log scale|, shift in pixels) of the transform that would re-crop ``face`` to the template."""
    s, tx, ty = fit_scale_translation(face.keypoints, TEMPLATE_224 * (size / TEMPLATE_SIZE))
    return abs(math.log(max(s, 1e-6))), math.hypot(tx, ty)


def looks_aligned(
    img_rgb_u8: np.ndarray, cropper: FaceCropper, max_log_scale: float = 0.12, max_shift: float = 12.0
) -> bool:
    """True for a 224x224 image whose face already sits at the template framing (``cropper`` detects it).

    The bounds (12% scale, 12 px shift) cover the spread of the aligned VoxCeleb2 demo crops
    themselves (head pose moves the landmarks within a fixed crop).
    """
    img = np.asarray(img_rgb_u8)
    if img.ndim != 3 or img.shape[:2] != (TEMPLATE_SIZE, TEMPLATE_SIZE):
        return False
    face = cropper.detect(img)
    if face is None:
        return False
    dlog, shift = alignment_error(face)
    return dlog <= max_log_scale and shift <= max_shift
