"""Facial landmarks for measurements: 68-point landmarks, identity embeddings, mouth opening.

Used by the evaluation (``benchmarks/metrics.py``) and by training (``training/mouth_labels.py``),
so it lives in the runtime package. The heavy tools are imported lazily: landmarks and the
face-identity embedding need ``dlib-bin`` + ``face-recognition-models`` (its .dat files are
located with importlib; its ``__init__`` imports the removed pkg_resources, so it is never
imported). The face box comes from a mediapipe :class:`~rt_engine.inputs.face.FaceCropper`, passed
in or made once per analyzer, mapped to the box shape dlib's predictor expects.

Frames are RGB uint8 ``[N,H,W,3]``; landmark arrays ``[N,68,2]`` hold NaN where no face was found.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

MOUTH = list(range(48, 68))  # dlib 68-point mouth
JAW = list(range(0, 17))  # dlib 68-point jaw contour (pose LMD)
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))  # upper / lower inner-lip points
EYE_OUTER = (36, 45)

# mediapipe detector box -> dlib frontal-detector box, measured on 80 demo VoxCeleb2 frames where
# dlib's HOG detector also finds the face: same centre x, centre y + 1.3% of the height, size x0.885.
_BOX_SCALE = 0.885
_BOX_DY = 0.013


def as_video(x: np.ndarray) -> np.ndarray:
    """[H,W,3] or [N,H,W,3] frames -> [N,H,W,3]; anything else is a ValueError."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected [N,H,W,3] frames, got {x.shape}")
    return x


def _dlib_model_path(name: str) -> str:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("landmarks need: pip install dlib-bin face-recognition-models")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise ImportError(f"face-recognition-models lacks {path}")
    return str(path)


class FaceAnalyzer:
    """68-point landmarks and 128-d identity embeddings: mediapipe boxes + dlib models."""

    def __init__(self, cropper=None) -> None:
        try:
            import dlib
        except ImportError as e:  # pragma: no cover
            raise ImportError("landmarks need: pip install dlib-bin face-recognition-models") from e
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(_dlib_model_path("shape_predictor_68_face_landmarks.dat"))
        self._encoder = None
        if cropper is None:
            from rt_engine.inputs.face import FaceCropper

            cropper = FaceCropper()
        self.cropper = cropper

    def _rect(self, img: np.ndarray):
        face = self.cropper.detect(img)
        if face is None:
            return None
        w, h = face.x1 - face.x0, face.y1 - face.y0
        cx, cy = (face.x0 + face.x1) / 2, (face.y0 + face.y1) / 2 + _BOX_DY * h
        hw, hh = _BOX_SCALE * w / 2, _BOX_SCALE * h / 2
        return self._dlib.rectangle(int(round(cx - hw)), int(round(cy - hh)), int(round(cx + hw)), int(round(cy + hh)))

    def landmarks(self, frames: np.ndarray) -> np.ndarray:
        """[N,H,W,3] uint8 RGB -> [N,68,2] float32 (x, y) pixels, NaN rows where no face."""
        frames = as_video(frames)
        out = np.full((len(frames), 68, 2), np.nan, np.float32)
        for k, img in enumerate(frames):
            img = np.ascontiguousarray(img)
            rect = self._rect(img)
            if rect is None:
                continue
            shape = self._predictor(img, rect)
            out[k] = [(p.x, p.y) for p in shape.parts()]
        return out

    def embeddings(self, frames: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """dlib ResNet face descriptors [N,128] (NaN rows where landmarks are missing)."""
        if self._encoder is None:
            self._encoder = self._dlib.face_recognition_model_v1(
                _dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")
            )
        frames = as_video(frames)
        out = np.full((len(frames), 128), np.nan, np.float32)
        for k, (img, lm) in enumerate(zip(frames, landmarks, strict=True)):
            if not np.isfinite(lm).all():
                continue
            x0, y0 = np.floor(lm.min(0)).astype(int)
            x1, y1 = np.ceil(lm.max(0)).astype(int)
            pts = [self._dlib.point(int(round(x)), int(round(y))) for x, y in lm]
            shape = self._dlib.full_object_detection(self._dlib.rectangle(x0, y0, x1, y1), pts)
            out[k] = np.asarray(self._encoder.compute_face_descriptor(np.ascontiguousarray(img), shape))
        return out


def mouth_opening(lm: np.ndarray) -> np.ndarray:
    """Inner-lip gap / outer eye-corner distance per frame; [N,68,2] -> [N] (NaN where no face)."""
    lm = np.asarray(lm, np.float64)
    gap = np.mean([np.linalg.norm(lm[:, i] - lm[:, j], axis=-1) for i, j in INNER_LIP_PAIRS], axis=0)
    eyes = np.linalg.norm(lm[:, EYE_OUTER[0]] - lm[:, EYE_OUTER[1]], axis=-1)
    return gap / np.maximum(eyes, 1e-6)
