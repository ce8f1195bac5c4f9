"""Metrics of benchmarks.quality on known cases (real demo frames; skipped without ../shared)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("mediapipe", reason="mediapipe==0.10.21 not installed")
pytest.importorskip("dlib", reason="dlib-bin not installed")
pytest.importorskip("skimage", reason="scikit-image not installed")

from benchmarks import metrics as M  # noqa: E402
from benchmarks import quality as Q  # noqa: E402

SHARED = Path(os.environ.get("RT_ENGINE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DEMO = SHARED / "data" / "demo" / "pcavs" / "misc"
MOUTH_DIR = DEMO / "Mouth_Source_unz/Mouth_Source/681600002"
AUDIO = DEMO / "Audio_Source_unz/Audio_Source/681600002.flac"
N = 200  # frames of the demo clip used (8 s): enough for a stable audio-mouth offset

pytestmark = pytest.mark.skipif(not MOUTH_DIR.is_dir(), reason=f"shared demo data absent ({DEMO})")


@pytest.fixture(scope="module")
def analyzer():
    return M.FaceAnalyzer()


@pytest.fixture(scope="module")
def clip():
    sf = pytest.importorskip("soundfile")
    files = sorted(MOUTH_DIR.glob("*.jpg"))[:N]
    frames = np.stack([cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files])  # [N,224,224,3]
    wav, sr = sf.read(str(AUDIO), dtype="float32")
    assert sr == 16000
    return SimpleNamespace(frames=frames, wav=wav)


@pytest.fixture(scope="module")
def gt_landmarks(analyzer, clip):
    return analyzer.landmarks(clip.frames)  # [N,68,2]


def _delay(x: np.ndarray, k: int) -> np.ndarray:
    """x delayed by k frames (the first frame repeated)."""
    return np.concatenate([np.repeat(x[:1], k, 0), x[:-k]])


def test_identical_frames(analyzer, clip, gt_landmarks):
    f = clip.frames[:6]
    assert M.ssim(f, f) == pytest.approx(1.0)
    assert math.isinf(M.psnr(f, f))
    lm = gt_landmarks[:6]
    assert np.isfinite(lm).all()
    assert M.lmd(lm, lm, M.MOUTH) == 0.0 and M.lmd(lm, lm, M.JAW) == 0.0
    mouth = M.mouth_opening(gt_landmarks)
    assert M.curve_correlation(mouth, mouth) == pytest.approx(1.0)
    emb = analyzer.embeddings(f[:2], lm[:2])
    assert M.cosine_similarity(emb, emb) == pytest.approx(1.0)


def test_different_frames_score_lower(clip, gt_landmarks):
    a, b = clip.frames[:4], clip.frames[40:44]
    assert M.ssim(a, b) < 0.9 and M.psnr(a, b) < 30
    assert M.lmd(gt_landmarks[:4], gt_landmarks[40:44], M.MOUTH) > 1.0


def test_video_delayed_by_two_frames(analyzer, clip, gt_landmarks):
    delayed = _delay(clip.frames, 2)
    lm_d = analyzer.landmarks(delayed)
    m_gt, m_d = M.mouth_opening(gt_landmarks), M.mouth_opening(lm_d)
    lag, corr_at_lag = M.curve_offset(m_d, m_gt)
    assert lag == 2 and corr_at_lag > 0.99
    assert M.curve_correlation(m_d, m_gt) < 0.8  # lower than 1 at lag 0
    energy = M.speech_energy(clip.wav, 16000, len(clip.frames))
    av_gt, av_d = M.av_offset(energy, m_gt), M.av_offset(energy, m_d)
    assert av_d["offset"] - av_gt["offset"] == 2
    assert av_gt["z"] > 2.0  # the real audio-mouth alignment stands out from shifted audio
    # a still face has no mouth curve: the sync measures are undefined, not a crash
    still = M.av_offset(energy, np.full(len(energy), m_gt[0]))
    assert math.isnan(still["offset"])


def test_blur_lowers_cpbd(clip):
    f = clip.frames[:4]
    blurred = np.stack([cv2.GaussianBlur(x, (0, 0), 2.0) for x in f])
    sharp, soft = M.cpbd_sharpness(f), M.cpbd_sharpness(blurred)
    assert sharp > 0 and soft < 0.7 * sharp


def test_speech_energy_frame_count(clip):
    e = M.speech_energy(clip.wav[:16000], 16000)
    assert e.shape == (25,) and np.isfinite(e).all()


def test_syncnet_shapes(tmp_path, clip):
    torch = pytest.importorskip("torch")
    net = M.build_syncnet(None)
    path = tmp_path / "syncnet_v2.model"
    torch.save(net.state_dict(), path)  # the state-dict layout of syncnet_python's weights
    net = M.build_syncnet(path)
    cc = M.mfcc_13(clip.wav[:16000])
    assert cc.shape == (13, 99)  # python_speech_features: 1 + ceil((16000 - 400) / 160) frames
    res = M.lse(net, clip.frames[:12], clip.wav[: 12 * 640])
    assert set(res) == {"lse_c", "lse_d", "offset"} and all(np.isfinite(list(res.values())))


def _write_video(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def _write_wav(path: Path, wav: np.ndarray) -> None:
    import soundfile as sf

    sf.write(str(path), wav, 16000)


def test_cli_runs_and_skips_bad_clips(tmp_path, clip, monkeypatch):
    """End to end on a folder: a good aligned clip, a clip without a face, one without audio.

    The model is stood in by a fake render_arrays that returns the ground truth 2 frames late.
    """
    clips = tmp_path / "clips"
    good = clips / "good"
    good.mkdir(parents=True)
    for k, f in enumerate(clip.frames[:40]):
        cv2.imwrite(str(good / f"{k:06d}.jpg"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    _write_wav(clips / "good.wav", clip.wav[: 40 * 640])
    rng = np.random.default_rng(0)
    _write_video(clips / "noface.mp4", rng.integers(0, 256, (20, 96, 128, 3), dtype=np.uint8))
    _write_wav(clips / "noface.wav", clip.wav[: 20 * 640])
    _write_video(clips / "silent_film.mp4", np.repeat(cv2.resize(clip.frames[0], (128, 128))[None], 20, 0))

    def fake_render(identity, audio, pose, checkpoint=None, aligned=False, max_frames=None, **kw):
        t = math.ceil(len(audio) / 160) + 7
        inds = np.arange(2, t // 4 - 2)[:max_frames]
        src = np.repeat(identity[None], 200, 0) if isinstance(pose, str) else _delay(pose, 2)
        view = Q.model_view(src[np.minimum(inds, len(src) - 1)])
        frames = view.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0  # [N,3,224,224]
        return SimpleNamespace(frames=frames, frame_inds=inds)

    import rt_engine.render

    monkeypatch.setattr(rt_engine.render, "render_arrays", fake_render, raising=False)
    out = tmp_path / "out"
    assert Q.main(["--clips", str(clips), "--out", str(out), "-q", "--cpbd-frames", "3", "--csim-frames", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    reasons = {s["name"]: s["reason"] for s in res["skipped"]}
    assert "no face" in reasons["noface.mp4"]
    assert "no audio" in reasons["silent_film.mp4"]
    (c,) = res["clips"]
    gt, still, model = c["methods"]["gt"], c["methods"]["still"], c["methods"]["model"]
    assert gt["ssim"] == pytest.approx(1.0) and gt["lmd_mouth"] == 0 and gt["psnr"] == "inf"
    assert still["ssim"] < gt["ssim"] and still["lmd_mouth"] > 0
    assert model["mouth_lag"] == 2 and model["mouth_corr"] < 0.9
    assert gt["mouth_span"] == pytest.approx(1.0) and still["mouth_span"] == 0
    assert 0.5 < model["mouth_span"] < 2  # the same frames, two late
    assert c["methods"]["fixed_pose"]["lmd_pose"] > 0
    report = (out / "report.md").read_text()
    assert "Ground truth (ceiling)" in report and "LSE-C / LSE-D not computed" in report
    assert "## Mouth corr pooled over clips" in report
    pooled = res["pooled"]  # one clip: the ground truth's pooled mean is its own correlation, 1
    assert pooled["gt"]["mean_corr"] == pytest.approx(1.0) and pooled["still"]["undefined"] == 1
    assert pooled["model"]["mean_corr"] == pytest.approx(model["mouth_corr"])
    assert (out / c["plot"]).is_file()
    sheet = cv2.imread(str(out / c["frames_sheet"]))  # rows: gt, still, fixed_pose, model; 6 columns of 128 px
    assert sheet.shape == (4 * 128, 6 * 128, 3)
    gt_cell = cv2.cvtColor(sheet[20:128, :128], cv2.COLOR_BGR2RGB).astype(float)  # below the label
    first = cv2.resize(Q.model_view(clip.frames[2:3])[0], (128, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(gt_cell - first[20:]).mean() < 8  # the first column is target frame 2 (jpeg + resize)


def test_mouth_correlation_against_shifted_ground_truth():
    """A mouth curve that follows the real one stands far above the shifted-curve null; an unrelated
    one does not; a still mouth has no correlation at all."""
    rng = np.random.default_rng(0)
    ref = np.convolve(rng.standard_normal(260), np.ones(5) / 5, mode="same")  # syllable-like, smooth
    follow = ref + 0.5 * rng.standard_normal(len(ref)) * ref.std()
    hit = M.correlation_vs_shifted(follow, ref)
    assert hit["corr"] > 0.7 and hit["z"] > 5 and hit["p"] < 0.01
    other = np.convolve(rng.standard_normal(260), np.ones(5) / 5, mode="same")
    miss = M.correlation_vs_shifted(other, ref)
    assert abs(miss["z"]) < 3 and miss["p"] > 0.01
    assert all(math.isnan(v) for v in M.correlation_vs_shifted(np.full(260, 0.3), ref).values())
    assert math.isnan(M.correlation_vs_shifted(follow[:20], ref[:20])["z"])  # too short to shift


def test_summary_keeps_the_worst_clip_p():
    from benchmarks.quality import summarize

    clips = [{"methods": {"model": {"mouth_corr": c, "mouth_corr_p": p}}} for c, p in ((0.5, 0.005), (0.2, 0.04))]
    s = summarize(clips + [{"methods": {"model": {"mouth_corr": math.nan, "mouth_corr_p": math.nan}}}], ["model"])
    assert s["model"]["mouth_corr_p"] == 0.04 and s["model"]["mouth_corr"] == pytest.approx(0.35)


def test_pooled_mouth_correlation_counts_faceless_clips_as_zero():
    """Pooled over clips: mouths that follow the real ones beat out-of-step mouths; a clip without a
    face drawn (NaN curve) or without a result (None) counts as 0 in the mean and helps nothing;
    unrelated mouths or still mouths do not pass."""
    rng = np.random.default_rng(1)

    def smooth(n):
        return np.convolve(rng.standard_normal(n), np.ones(5) / 5, mode="same")

    refs = [smooth(n) for n in (200, 160, 240)]
    weak = [r + 2.0 * r.std() * rng.standard_normal(len(r)) for r in refs]  # corr about 0.45
    hit = M.pooled_correlation_vs_shifted(list(zip(weak, refs, strict=True)))
    each = [M.curve_correlation(g, r) for g, r in zip(weak, refs, strict=True)]
    assert hit["mean_corr"] == pytest.approx(np.mean(each)) and hit["undefined"] == 0
    assert hit["p"] < 0.01 and hit["z"] > 4

    faceless = (np.full(180, np.nan), smooth(180))
    with_gap = M.pooled_correlation_vs_shifted([*zip(weak, refs, strict=True), faceless, None])
    assert with_gap["clips"] == 5 and with_gap["undefined"] == 2
    assert with_gap["mean_corr"] == pytest.approx(np.sum(each) / 5)
    assert with_gap["p"] < 0.01  # still significant, but smaller in effect
    assert with_gap["mean_corr"] < hit["mean_corr"]

    unrelated = M.pooled_correlation_vs_shifted([(smooth(len(r)), r) for r in refs])
    assert unrelated["p"] > 0.01 and abs(unrelated["z"]) < 3
    still = M.pooled_correlation_vs_shifted([(np.full(len(r), 0.2), r) for r in refs])
    assert still["mean_corr"] == 0 and still["undefined"] == 3 and math.isnan(still["p"])


def test_opening_span_ratio():
    """How far the generated mouth moves against the real one: half the swing gives 0.5 whatever
    the offset; frames without a face are left out; a still mouth gives 0."""
    rng = np.random.default_rng(2)
    ref = 0.06 + 0.04 * np.convolve(rng.standard_normal(300), np.ones(5) / 5, mode="same")
    assert M.opening_span_ratio(ref, ref) == pytest.approx(1.0)
    gen = 0.02 + 0.5 * ref
    gen[::7] = np.nan  # no face in these frames
    assert M.opening_span_ratio(gen, ref) == pytest.approx(0.5, rel=0.05)
    assert M.opening_span_ratio(np.full(300, 0.03), ref) == 0
    assert math.isnan(M.opening_span_ratio(np.full(300, np.nan), ref))
    assert math.isnan(M.opening_span_ratio(ref, np.full(300, 0.05)))
