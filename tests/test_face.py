"""Face detection + crop to the VoxCeleb2 framing (rt_engine.inputs.face)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 not installed (pip install --no-deps ...)")
cv2 = pytest.importorskip("cv2")

from rt_engine.errors import NoFaceError  # noqa: E402
from rt_engine.inputs.face import (  # noqa: E402
    TEMPLATE_224,
    FaceCropper,
    fit_scale_translation,
    looks_aligned,
)

SHARED = Path(os.environ.get("RT_ENGINE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DEMO = SHARED / "data" / "demo" / "pcavs" / "misc"
TRAIN = SHARED / "data" / "train"
needs_demo = pytest.mark.skipif(not DEMO.is_dir(), reason=f"shared demo data absent ({DEMO})")


def _read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def cropper():
    with FaceCropper() as fc:
        yield fc


@pytest.fixture(scope="module")
def demo_crop() -> np.ndarray:
    if not DEMO.is_dir():
        pytest.skip(f"shared demo data absent ({DEMO})")
    return _read_rgb(DEMO / "Input_unz/Input/517600055/000000.jpg")  # [224,224,3]


def test_fit_scale_translation_exact():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (7, 2))
    s, tx, ty = fit_scale_translation(src, 0.37 * src + [5.0, -3.0])
    assert (s, tx, ty) == pytest.approx((0.37, 5.0, -3.0), abs=1e-9)


@needs_demo
def test_template_remeasured_on_demo_frames(cropper):
    """Mean keypoints of aligned demo crops sit at TEMPLATE_224 (re-measures the constants)."""
    files = sorted((DEMO / "Pose_Source_unz/Pose_Source/517600078").glob("*.jpg"))[::8]
    files += sorted((DEMO / "Mouth_Source_unz/Mouth_Source/681600002").glob("*.jpg"))[::16]
    kps = []
    for f in files:
        face = cropper.detect(_read_rgb(f))
        assert face is not None, f
        kps.append(face.keypoints)
    mean = np.mean(kps, axis=0)  # [7,2]
    # The constants average 977 frames of 14 identities; the demo frames alone land ~1 px away.
    err = np.linalg.norm(mean - TEMPLATE_224, axis=1)
    assert err.mean() < 3.0 and err.max() < 5.0, err


@needs_demo
def test_recrop_of_padded_aligned_crop(cropper, demo_crop):
    """Scaled and shifted into a bigger canvas, an aligned crop crops back to nearly itself."""
    direct = cropper.crop_image(demo_crop)
    face0 = cropper.detect(direct)
    for scale, (ox, oy), size in [(1.8, (130, 60), (480, 640)), (0.8, (300, 220), (720, 900))]:
        big = cv2.resize(demo_crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        canvas = np.full((*size, 3), 90, np.uint8)
        canvas[oy : oy + big.shape[0], ox : ox + big.shape[1]] = big
        out = cropper.crop_image(canvas, "canvas")
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        face = cropper.detect(out)
        lm_err = np.linalg.norm(face.keypoints - face0.keypoints, axis=1).mean()
        assert lm_err < 1.5, (scale, lm_err)
        inner = (slice(16, 208), slice(16, 208))  # away from the canvas border
        mad = np.abs(out[inner].astype(np.float32) - direct[inner].astype(np.float32)).mean()
        assert mad < 5.0, (scale, mad)


@needs_demo
def test_looks_aligned(demo_crop, cropper):
    assert looks_aligned(demo_crop, cropper)
    small = np.full_like(demo_crop, 90)
    small[56:168, 56:168] = cv2.resize(demo_crop, (112, 112), interpolation=cv2.INTER_AREA)
    assert not looks_aligned(small, cropper)
    assert not looks_aligned(np.zeros((100, 100, 3), np.uint8), cropper)


@pytest.mark.parametrize("kind", ["noise", "flat"])
def test_no_face_raises(cropper, kind):
    rng = np.random.default_rng(1)
    img = (
        rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
        if kind == "noise"
        else np.full((300, 400, 3), 128, np.uint8)
    )
    with pytest.raises(NoFaceError, match="no face found in"):
        cropper.crop_image(img, kind)
    with pytest.raises(NoFaceError):
        cropper.crop_video([img, img], kind)


@needs_demo
def test_video_holds_last_transform_through_missed_frames(cropper, demo_crop):
    flat = np.full_like(demo_crop, 128)
    out = cropper.crop_video([flat, demo_crop, demo_crop, flat, demo_crop], "mixed")
    assert out.shape == (5, 224, 224, 3)
    raw = cropper.last_raw_params
    np.testing.assert_allclose(raw[0], raw[1])  # before the first face: the first good transform
    np.testing.assert_allclose(raw[3], raw[2])  # a miss holds the last good transform


def _centres(params: np.ndarray, size: int = 224) -> np.ndarray:
    """Crop centre in source pixels per frame, [N,2]."""
    s = np.exp(params[:, :1])
    return (size / 2 - params[:, 1:]) / s


@pytest.mark.skipif(
    not (TRAIN / "retalking/examples/face/1.mp4").is_file(), reason=f"shared train clip absent ({TRAIN})"
)
def test_video_crop_is_smooth(cropper):
    av = pytest.importorskip("av")
    frames = []
    with av.open(str(TRAIN / "retalking/examples/face/1.mp4")) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i >= 60:
                break
            frames.append(f.to_ndarray(format="rgb24"))  # [700,700,3]
    out = cropper.crop_video(frames, "retalking 1.mp4")
    assert out.shape == (60, 224, 224, 3)
    raw, smooth = _centres(cropper.last_raw_params), _centres(cropper.last_params)
    scale = math.exp(float(cropper.last_params[:, 0].mean()))  # source px -> crop px
    jitter_raw = np.linalg.norm(np.diff(raw, 2, axis=0), axis=1).mean() * scale
    jitter = np.linalg.norm(np.diff(smooth, 2, axis=0), axis=1).mean() * scale
    assert jitter < 0.2, (jitter, jitter_raw)  # crop px / frame^2
    assert jitter < 0.5 * jitter_raw
    # the face stays at the template framing in every output frame
    for k in (0, 30, 59):
        face = cropper.detect(out[k])
        s, tx, ty = fit_scale_translation(face.keypoints, TEMPLATE_224)
        assert abs(math.log(s)) < 0.15 and math.hypot(tx, ty) < 15, (k, s, tx, ty)
