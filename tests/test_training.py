"""training/: augmentations, negatives, config layering, preprocessing, and tiny end-to-end runs.

The training runs use a synthetic cache (two short clips of a drawn face whose mouth opens with
the loudness of a synthetic voice) and a CI-sized model, so they run in seconds on a loaded CPU.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from rt_engine.errors import InputError
from rt_engine.inputs import audio as audio_in
from rt_engine.models.pcavs import PCAVS
from training import augment
from training.config import resolve
from training.data import sample_negatives
from training.nets import info_nce, load_vgg19

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RT_ENGINE_SHARED", ROOT.parent / "shared"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# A CI-sized model: the 'tiny' preset narrowed further (112x112 output).
CI_MODEL = (
    "{gen_channels: [16, 16, 16, 8, 8], id_map_channels: 16, id_width: 16, fan_width: 16, fan_feature: 32, "
    "audio_width: 8, audio_feature: 32, mouth_dim: 32}"
)


def ci_args(data: Path, out: Path, stage: str, steps: int, *extra: str) -> list[str]:
    return [
        "--stage",
        stage,
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--preset",
        "tiny",
        "--model",
        CI_MODEL,
        "--batch-size",
        "2",
        "--num-negatives",
        "1",
        "--min-shift",
        "3",
        "--d-channels",
        "8",
        "--d-layers",
        "2",
        "--threads",
        "1",
        "--log-every",
        "1",
        "--sample-every",
        "1000",
        "--ckpt-every",
        "1000",
        "--seed",
        "3",
        *extra,
    ]


# ------------------------------------------------------------------------------------ synthetic data
def _face(t: float, mouth: float, hue: int) -> np.ndarray:
    """An aligned-looking 224x224 drawn face; ``mouth`` in [0,1] sets the mouth opening."""
    img = np.full((224, 224, 3), 40 + hue // 4, np.uint8)
    cx = 112 + int(4 * np.sin(t))  # small head motion
    cv2.ellipse(img, (cx, 110), (62, 80), 0, 0, 360, (200 - hue // 3, 160, 120 + hue // 2), -1)
    for dx in (-24, 24):
        cv2.circle(img, (cx + dx, 90), 8, (30, 30, 30), -1)
    cv2.ellipse(img, (cx, 150), (22, 3 + int(14 * mouth)), 0, 0, 360, (60, 20, 40), -1)
    return img


def make_synthetic_cache(root: Path, n_clips: int = 2, seconds: float = 2.4) -> Path:
    """A cache in the layout of training.preprocess: speech-like bursts drive the drawn mouth."""
    from training.preprocess import write_frames

    sr, fps = audio_in.SAMPLE_RATE, 25
    clips = []
    for c in range(n_clips):
        rng = np.random.default_rng(c)
        n = int(seconds * sr)
        t = np.arange(n) / sr
        env = np.clip(np.sin(2 * np.pi * (1.3 + 0.4 * c) * t + c), 0, None) ** 2  # syllable-like envelope
        wav = (env * (0.5 * np.sin(2 * np.pi * (140 + 40 * c) * t) + 0.2 * rng.standard_normal(n))).astype(np.float32)
        _, mel = audio_in.audio_features(wav)
        n_frames = int(seconds * fps)
        frames = np.stack([_face(k / fps, float(env[min(n - 1, int(k / fps * sr))]), 60 * c) for k in range(n_frames)])
        cid = f"synth{c}"
        d = root / "clips" / cid
        d.mkdir(parents=True)
        write_frames(d / "frames.mp4", frames)
        np.save(d / "mel.npy", mel)
        meta = {
            "id": cid,
            "identity": f"person{c}",
            "n_frames": n_frames,
            "n_usable": n_frames - 4,
            "has_audio": True,
            "video": "synthetic",
            "audio": None,
            "crop": "synthetic",
        }
        (d / "meta.json").write_text(json.dumps(meta))
        clips.append(meta)
    (root / "index.json").write_text(json.dumps({"fps": fps, "clips": clips}))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_synthetic_cache(tmp_path_factory.mktemp("cache"))


def render_cli(model_file: Path, tmp_path: Path) -> np.ndarray:
    """Render 0.6 s of a tone on a synthetic face through ``python -m rt_engine.render`` -> frames [N,3,H,W]."""
    import soundfile as sf

    wav = np.sin(2 * np.pi * 200 * np.arange(int(0.6 * 16000)) / 16000).astype(np.float32) * 0.3
    sf.write(tmp_path / "a.wav", wav, 16000)
    cv2.imwrite(str(tmp_path / "id.png"), _face(0, 0.2, 30))
    cmd = [sys.executable, "-m", "rt_engine.render", "--identity", str(tmp_path / "id.png"), "--audio",
           str(tmp_path / "a.wav"), "--checkpoint", str(model_file), "--aligned", "--save-raw",
           str(tmp_path / "o.npz"), "--threads", "1", "-q"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    return np.load(tmp_path / "o.npz")["frames"]


def stats(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "stats.jsonl").read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------ augmentations
@pytest.mark.parametrize("margin,shift", [(0.0, 0.0), (10.0, 5.0), (22.4, -13.4), (3.0, 9.9)])
def test_perspective_maps_source_points_to_target_points(margin, shift):
    w = h = 224
    src, dst = augment.perspective_points(w, h, margin, shift)
    # source points lie outside the image by the margin
    assert np.allclose(src[[0, 3], 0], -margin) and np.allclose(src[[1, 2], 0], w - 1 + margin)
    assert np.allclose(src[:2, 1], -margin) and np.allclose(src[2:, 1], h - 1 + margin)
    # target points: y unchanged, x moved by the shift, mirror-symmetric about the centre line
    assert np.allclose(dst[:, 1], src[:, 1])
    assert np.allclose(np.abs(dst[:, 0] - src[:, 0]), abs(shift))
    assert np.allclose(dst[0, 0] + dst[1, 0], w - 1) and np.allclose(dst[2, 0] + dst[3, 0], w - 1)
    hm = augment.perspective_matrix(w, h, margin, shift)
    mapped = cv2.perspectiveTransform(src[None].astype(np.float64), hm)[0]
    assert np.allclose(mapped, dst, atol=1e-3)


def test_perspective_warp_keeps_the_vertical_centre_line():
    img = np.zeros((224, 224, 3), np.uint8)
    img[:, 110:114] = 255  # a vertical bar on the centre line stays centred (symmetric change)
    out = augment.perspective(img, np.random.default_rng(1), max_margin=0.1, max_shift=0.06)
    cols = np.nonzero(out[:, :, 0].mean(0) > 128)[0]
    assert out.shape == img.shape and abs(cols.mean() - 111.5) < 1.5


@pytest.mark.parametrize("w,h", [(224, 224), (225, 224), (100, 57)])
def test_centered_crop_stays_centred(w, h):
    for scale in np.linspace(0.5, 1.0, 23):
        x0, y0, x1, y1 = augment.centered_box(w, h, float(scale))
        assert (x0 + x1) / 2 == w / 2 and (y0 + y1) / 2 == h / 2
        assert abs((x1 - x0) - scale * w) <= 1.5
    img = np.zeros((h, w, 3), np.uint8)
    img[h // 2 - 2 : h // 2 + 2, w // 2 - 2 : w // 2 + 2] = 255
    out = augment.centered_crop(img, np.random.default_rng(0), 0.6)
    ys, xs = np.nonzero(out[:, :, 0] > 100)
    assert out.shape == img.shape and abs(ys.mean() - (h - 1) / 2) < 1.5 and abs(xs.mean() - (w - 1) / 2) < 1.5


def test_color_transfer_changes_channels_independently():
    img = np.full((8, 8, 3), 128, np.uint8)
    out = augment.color_transfer(img, np.random.default_rng(5), 0.3)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert len(set(out[0, 0].tolist())) == 3  # each channel got its own gain/bias
    assert np.all(out == out[0, 0])  # spatially uniform change


# ------------------------------------------------------------------------------------ negatives
def test_negative_is_never_the_positive():
    rng = np.random.default_rng(0)
    valid = [np.arange(2, 40), np.arange(2, 9), np.arange(5, 60)]
    for _ in range(300):
        c = int(rng.integers(3))
        f = int(rng.choice(valid[c]))
        negs = sample_negatives(rng, valid, c, f, 6, min_shift=4)
        assert len(negs) == 6
        for k, g in negs:
            assert (k, g) != (c, f)
            assert g in valid[k]
            if k == c:
                assert abs(g - f) >= 4
        assert any(k == c for k, _ in negs) or len(valid[c][np.abs(valid[c] - f) >= 4]) == 0
        assert any(k != c for k, _ in negs)


def test_negatives_single_clip_and_impossible_case():
    rng = np.random.default_rng(1)
    negs = sample_negatives(rng, [np.arange(0, 30)], 0, 10, 5, min_shift=5)
    assert all(k == 0 and abs(g - 10) >= 5 for k, g in negs)
    with pytest.raises(InputError, match="no negative"):
        sample_negatives(rng, [np.arange(0, 5)], 0, 2, 1, min_shift=5)


@pytest.mark.parametrize("frac, n, n_same", [(0.0, 4, 0), (0.5, 4, 2), (0.5, 1, 0), (0.75, 8, 6), (1.0, 3, 3)])
def test_same_clip_negative_fraction(frac, n, n_same):
    rng = np.random.default_rng(2)
    valid = [np.arange(0, 50), np.arange(0, 50)]
    negs = sample_negatives(rng, valid, 0, 25, n, min_shift=5, same_frac=frac)
    assert sum(k == 0 for k, _ in negs) == n_same
    assert all(abs(g - 25) >= 5 for k, g in negs if k == 0)


def test_info_nce_prefers_the_positive():
    q = torch.randn(4, 16)
    good = info_nce(q, q + 0.01 * torch.randn(4, 16), torch.randn(4, 3, 16), 0.1)
    bad = info_nce(q, -q, torch.randn(4, 3, 16), 0.1)
    assert good < 0.1 < bad


# ------------------------------------------------------------------------------------ config / VGG
def test_config_layering_defaults_yaml_cli(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"data": "d", "steps": 7, "lr": 0.5, "model": {"gen_channels": [8, 8, 8, 8, 8]}}))
    b.write_text(yaml.safe_dump({"steps": 9}))
    cfg = resolve(["--config", str(a), "--config", str(b), "--lr", "0.25"])
    assert (cfg.steps, cfg.lr, cfg.batch_size) == (9, 0.25, 4)  # yaml b > yaml a, CLI > yaml, default kept
    assert cfg.model_config().gen_channels == (8, 8, 8, 8, 8)
    with pytest.raises(Exception, match="unknown fields"):
        (tmp_path / "c.yaml").write_text("stepz: 3\n")
        resolve(["--config", str(tmp_path / "c.yaml")])
    with pytest.raises(Exception, match="stage"):
        resolve(["--data", "d", "--stage", "nope"])


def test_vgg_loss_off_without_weights_is_loud(caplog, tmp_path):
    with caplog.at_level(logging.WARNING):
        assert load_vgg19("") is None
        assert load_vgg19(str(tmp_path / "missing.pth")) is None
    assert sum("VGG perceptual loss DISABLED" in r.message for r in caplog.records) == 2


def test_vgg_loads_torchvision_layout_weights(tmp_path):
    from training.nets import VGG19, PerceptualLoss

    torch.manual_seed(0)
    sd = {k: v for k, v in VGG19().state_dict().items() if k.startswith("features.")}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry a classifier: ignored
    torch.save(sd, tmp_path / "vgg19.pth")
    vgg = load_vgg19(str(tmp_path / "vgg19.pth"))
    assert vgg is not None and torch.equal(vgg.features[0].weight, sd["features.0.weight"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    loss = PerceptualLoss(vgg)
    assert loss(x, x).item() == 0 and loss(x, -x).item() > 0


# ------------------------------------------------------------------------------------ preprocessing
def test_csv_index_pairs_separate_audio_and_reports_silent_clips():
    table = SHARED / "data" / "train.csv"
    if not table.is_file():
        pytest.skip(f"shared data absent: {table}")
    from training.preprocess import index_csv

    sources, skipped = index_csv(table)
    by_id = {s.id.split("_")[0]: s for s in sources}
    kristi = by_id["m0079"]
    assert kristi.audio is not None and kristi.audio.endswith("KristiNoem.flac") and Path(kristi.audio).is_file()
    assert by_id["m0131"].audio is None  # audio from the video's own track
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert "no usable speech" in reasons["m0101"]  # a video-only expression clip


def test_preprocess_folder_skips_a_clip_without_face_and_caches_a_real_one(tmp_path):
    pytest.importorskip("mediapipe")
    from training.preprocess import Source, run, write_frames

    noise = np.random.default_rng(0).integers(0, 255, (30, 96, 96, 3), dtype=np.uint8)
    write_frames(tmp_path / "noise.mp4", noise)
    src = [Source("noise", str(tmp_path / "noise.mp4"), None, "nobody", want_audio=False)]
    real = SHARED / "data/train/pcavs/misc/Pose_Source_unz/Pose_Source/731200067.mp4"
    if real.is_file():
        src.append(Source("real", str(real), None, "vox_id07312"))
    out = tmp_path / "cache"
    report = run(src, out, workers=1)
    assert [s["id"] for s in report["skipped"]] == ["noise"] and "no face" in report["skipped"][0]["reason"]
    if real.is_file():
        idx = json.loads((out / "index.json").read_text())["clips"]
        assert idx[0]["id"] == "real" and idx[0]["has_audio"] and idx[0]["n_usable"] > 100
        mel = np.load(out / "clips/real/mel.npy")
        assert mel.shape[1] == 80
        again = run(src, out, workers=1)  # resumable: the finished clip is not redone
        assert again["ok"] == 1


# ------------------------------------------------------------------------------------ training runs
def test_three_stages_end_to_end_and_render(cache, tmp_path):
    from training.release import release
    from training.train import main

    runs = tmp_path / "runs"
    assert main(ci_args(cache, runs / "id", "identity", 2)) == 0
    assert main(ci_args(cache, runs / "content", "content", 2, "--init", str(runs / "id/last.pt"))) == 0
    assert (
        main(
            ci_args(
                cache,
                runs / "joint",
                "joint",
                2,
                "--init",
                str(runs / "content/last.pt"),
                "--sample-every",
                "2",
                "--bf16",
                "true",
            )
        )
        == 0
    )  # bf16 autocast path
    for stage, key in (("id", "id"), ("content", "content"), ("joint", "l1")):
        recs = stats(runs / stage)
        assert len(recs) == 2 and all(np.isfinite(r["loss"]) and key in r for r in recs)
    joint = stats(runs / "joint")[-1]
    assert {"g_gan", "fm", "d", "content", "id", "l1"} <= set(joint)
    assert (runs / "joint/config.yaml").is_file() and "git_revision" in (runs / "joint/config.yaml").read_text()
    assert (runs / "joint/loss.png").is_file() and list((runs / "joint/samples").glob("step_*.png"))
    model_file = release(runs / "joint/last.pt", tmp_path / "m.safetensors", half=True, command="pytest")
    from rt_engine.models.checkpoint import load_single, read_single_meta

    prov = read_single_meta(model_file)["provenance"]
    assert [s["stage"] for s in prov["stages"]] == ["identity", "content", "joint"] and prov["total_steps"] == 6
    # fine-tuning a released single-file model: same weights to start, its history carried on
    assert main(ci_args(cache, runs / "tune", "joint", 1, "--init", str(model_file))) == 0
    tuned = torch.load(runs / "tune/last.pt", map_location="cpu", weights_only=False)
    released = load_single(model_file)
    moved = [k for k, v in released.state_dict().items() if not torch.equal(tuned["model"][k].half(), v.half())]
    assert moved and len(moved) < len(released.state_dict())  # one step moved trained weights, not buffers
    params = dict(released.named_parameters())
    drift = max((tuned["model"][k].float() - params[k].float()).abs().max().item() for k in moved if k in params)
    assert drift < 0.05  # one Adam step from the released weights, not a fresh initialisation
    tuned_file = release(runs / "tune/last.pt", tmp_path / "t.safetensors", half=True, command="pytest")
    assert [s["stage"] for s in read_single_meta(tuned_file)["provenance"]["stages"]] == [
        "identity",
        "content",
        "joint",
        "joint",
    ]
    # the bundled model is re-exported in place: the init file now already holds the tune run;
    # exporting again must not count that run twice (the checkpoint kept the history it started from)
    release(runs / "tune/last.pt", model_file, half=True, command="pytest")
    again = release(runs / "tune/last.pt", tmp_path / "t2.safetensors", half=True, command="pytest")
    prov2 = read_single_meta(again)["provenance"]
    assert [s["stage"] for s in prov2["stages"]] == ["identity", "content", "joint", "joint"]
    assert prov2["total_steps"] == 7
    from training.release import _released_before  # older checkpoints without that record

    chain = [{"run": "runs/b"}]
    assert _released_before([{"run": "runs/a"}, {"run": "runs/b"}, {"run": "runs/c"}], chain) == [{"run": "runs/a"}]
    assert _released_before([{"run": "runs/a"}], chain) == [{"run": "runs/a"}]
    # the checkpoint renders through the engine's command line
    frames = render_cli(model_file, tmp_path)
    assert frames.shape[1:] == (3, 112, 112) and len(frames) >= 5 and np.isfinite(frames).all()


def test_losses_fall_on_one_batch(cache, tmp_path):
    from training.train import main

    out = tmp_path / "overfit"
    assert (
        main(
            ci_args(
                cache,
                out,
                "joint",
                24,
                "--overfit-one-batch",
                "true",
                "--lr",
                "2e-3",
                "--w-gan",
                "0.1",
                "--w-fm",
                "0.1",
            )
        )
        == 0
    )
    recs = stats(out)
    assert all(np.isfinite(v) for r in recs for k, v in r.items() if k != "time")
    first = np.mean([r["l1"] for r in recs[:3]])
    last = np.mean([r["l1"] for r in recs[-3:]])
    assert last < 0.7 * first, (first, last)
    print(f"l1 {first:.4f} -> {last:.4f}")
    c_first, c_last = np.mean([r["content"] for r in recs[:3]]), np.mean([r["content"] for r in recs[-3:]])
    assert c_last < c_first, (c_first, c_last)


def test_gan_warm_up_mouth_loss_and_masked_pose(cache, tmp_path):
    """gan_start: no GAN/FM terms and no D update before it; w_mouth adds the mouth-box L1; the
    model's pose encoder blanks the mouth box (pose_mouth_mask) and the checkpoint keeps that switch."""
    from training.train import main

    out = tmp_path / "warm"
    model = CI_MODEL.rstrip("}") + ", pose_mouth_mask: true}"
    args = ci_args(cache, out, "joint", 3, "--gan-start", "2", "--w-mouth", "2")
    args[args.index("--model") + 1] = model
    assert main(args) == 0
    recs = stats(out)
    assert [r["step"] for r in recs] == [0, 1, 2]
    for r in recs[:2]:
        assert not {"d", "g_gan", "fm"} & set(r) and r["mouth"] > 0
    assert {"d", "g_gan", "fm", "mouth"} <= set(recs[2])
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["model_config"]["pose_mouth_mask"] is True


def test_resume_gives_the_same_next_step_loss(cache, tmp_path):
    from training.train import main

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(ci_args(cache, a, "joint", 3)) == 0
    assert main(ci_args(cache, b, "joint", 2)) == 0  # stops after 2 steps, writes last.pt
    assert main(ci_args(cache, b, "joint", 3)) == 0  # resumes from the checkpoint
    ra, rb = stats(a), stats(b)
    assert [r["step"] for r in rb] == [0, 1, 2]
    for k in ("loss", "l1", "d", "g_gan", "fm", "content", "id"):
        assert ra[2][k] == rb[2][k], (k, ra[2][k], rb[2][k])  # bit for bit
    assert ra[1]["loss"] == rb[1]["loss"]


def test_content_positives_and_negatives_share_one_batch_norm_pass(cache, tmp_path):
    """In train mode batch norm mixes a batch's statistics into every feature. Positives and
    negatives must go through one forward pass, or InfoNCE can tell them apart by those statistics
    (the loss falls, retrieval stays at chance). Shared pass: a positive's feature moves when only
    the negatives change."""
    from training.config import resolve
    from training.train import Trainer

    tr = Trainer(resolve(ci_args(cache, tmp_path / "c", "content", 1, "--num-negatives", "3")).validate())
    tr._set_modes()
    b = tr.batcher.batch(0)
    with torch.no_grad():
        noid, audio, neg_noid, neg_a = tr._content_pass(b)
        b2 = {**b, "neg_aug": b["neg_aug"].flip(0) * 0.5, "neg_mel": b["neg_mel"].flip(0) + 1.0}
        noid2, audio2, _, _ = tr._content_pass(b2)
    assert neg_noid.shape[:2] == neg_a.shape[:2] == (2, 3)
    assert not torch.allclose(noid, noid2) and not torch.allclose(audio, audio2)


def labelled_copy(cache: Path, data: Path) -> Path:
    """A copy of the synthetic cache with mouth-opening labels (mouth.npy) the audio can predict:
    the loudness around each frame; frame 3 of every clip has no label (NaN)."""
    import shutil

    shutil.copytree(cache, data)
    for d in (data / "clips").iterdir():
        mel = np.load(d / "mel.npy")
        n = json.loads((d / "meta.json").read_text())["n_frames"]
        lab = np.array(
            [mel[4 * i : 4 * i + 4].mean() if 4 * i + 4 <= len(mel) else np.nan for i in range(n)], np.float32
        )
        lab[3] = np.nan
        np.save(d / "mouth.npy", lab)
    return data


def test_mouth_opening_labels_train_the_audio_head(cache, tmp_path, caplog):
    """w_open: labels from mouth.npy (z-scored per clip, NaN skipped) reach the batch, and the audio
    head learns them; without labels the run refuses to start."""
    from training.data import ClipStore
    from training.train import main

    caplog.set_level(logging.INFO)
    assert main(ci_args(cache, tmp_path / "nolabels", "content", 1, "--w-open", "1")) == 2
    data = labelled_copy(cache, tmp_path / "cache")
    store = ClipStore(data)
    z = store.clips[0].opening
    assert np.isnan(z[3]) and abs(np.nanmean(z)) < 1e-5 and abs(np.nanstd(z) - 1) < 1e-3
    out = tmp_path / "open"
    assert main(ci_args(data, out, "content", 30, "--w-open", "1", "--lr", "2e-3", "--overfit-one-batch", "true")) == 0
    recs = stats(out)
    first, last = np.mean([r["open"] for r in recs[:3]]), np.mean([r["open"] for r in recs[-3:]])
    assert last < 0.5 * first, (first, last)
    # joint: the image head learns the opening on real targets and judges the generated frames
    out2 = tmp_path / "open_img"
    assert (
        main(
            ci_args(
                data,
                out2,
                "joint",
                12,
                "--w-open",
                "1",
                "--w-open-img",
                "1",
                "--lr",
                "2e-3",
                "--overfit-one-batch",
                "true",
                "--open-img-warmup",
                "30",
            )
        )
        == 0
    )
    recs = stats(out2)
    assert all(np.isfinite(r["open_real"]) and np.isfinite(r["open_fake"]) for r in recs)
    assert "image mouth-opening head: 30 warm-up steps" in caplog.text
    assert np.mean([r["open_real"] for r in recs[-3:]]) < np.mean([r["open_real"] for r in recs[:3]])


def test_sync_loss_trains_the_generator_and_keeps_the_expert_frozen(cache, tmp_path):
    """w_sync: the frozen expert (content encoders at the run's start) scores generated frames; its
    weights never move, its gradient reaches the generator, and resume restores it bit for bit."""
    from training.nets import SyncExpert
    from training.train import main

    runs = tmp_path / "runs"
    assert main(ci_args(cache, runs / "nojudge", "joint", 1, "--w-sync", "1.0")) == 2  # no trained expert
    assert main(ci_args(cache, runs / "content", "content", 2, "--same-clip-negatives", "1.0")) == 0
    init = torch.load(runs / "content/last.pt", weights_only=False)
    a, b = runs / "a", runs / "b"
    sync = ["--init", str(runs / "content/last.pt"), "--w-sync", "1.0"]
    assert main(ci_args(cache, a, "joint", 3, *sync)) == 0
    assert main(ci_args(cache, b, "joint", 2, *sync)) == 0
    assert main(ci_args(cache, b, "joint", 3, *sync)) == 0  # resume
    ra, rb = stats(a), stats(b)
    assert all(np.isfinite(r["sync"]) and r["sync"] > 0 for r in ra)
    assert ra[2]["sync"] == rb[2]["sync"] and ra[2]["loss"] == rb[2]["loss"]
    ck = torch.load(a / "last.pt", weights_only=False)
    start = {
        **{
            f"visual.{k[len('pose_encoder.model.') :]}": v
            for k, v in init["model"].items()
            if k.startswith("pose_encoder.model.")
        },
        **{
            f"audio.{k[len('audio_encoder.') :]}": v for k, v in init["model"].items() if k.startswith("audio_encoder.")
        },
        **{
            f"head.{k[len('visual_content.') :]}": v
            for k, v in init["heads"].items()
            if k.startswith("visual_content.")
        },
    }
    assert ck["expert"].keys() == start.keys()
    assert all(torch.equal(ck["expert"][k], start[k]) for k in start)  # the judge never learnt
    gen = [k for k in init["model"] if k.startswith("generator.") and k.endswith("weight")]
    assert any(not torch.equal(ck["model"][k], init["model"][k]) for k in gen)  # while the generator did
    # gradient reaches the image, never the expert's own weights
    from rt_engine.config import ModelConfig
    from rt_engine.models.pcavs import PCAVS
    from training.nets import Heads

    mc = ModelConfig.from_dict(init["model_config"])
    m, h = PCAVS(mc), Heads(mc, 2)
    ex = SyncExpert(m, h).train()
    assert not ex.training and not any(p.requires_grad for p in ex.parameters())
    fake = torch.rand(2, 3, 224, 224, requires_grad=True)
    ex.loss(fake * 2 - 1, torch.randn(2, 1, 80, 20), torch.randn(2, 3, 1, 80, 20), 0.07).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_checkpoint_records_the_revision_the_run_started_with(cache, tmp_path, monkeypatch):
    """A commit made while a run trains must not relabel its later checkpoints."""
    import itertools

    import training.train
    from training.train import main

    revs = (f"rev{k}" for k in itertools.count())
    monkeypatch.setattr(training.train, "git_revision", lambda: next(revs))
    assert main(ci_args(cache, tmp_path / "run", "identity", 2, "--ckpt-every", "1")) == 0
    ck = torch.load(tmp_path / "run/last.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 2 and ck["git"] == "rev0"


def test_sync_eval_decodes_only_the_clips_it_scores(cache, tmp_path, monkeypatch):
    """training.sync_eval picks the N longest clips from the index and decodes only those."""
    import training.data
    from training import sync_eval
    from training.train import main

    assert main(ci_args(cache, tmp_path / "content", "content", 1)) == 0
    decoded = []
    real_decode = training.data.decode_frames
    monkeypatch.setattr(training.data, "decode_frames", lambda p: decoded.append(p.parent.name) or real_decode(p))
    out = tmp_path / "sync.json"
    assert (
        sync_eval.main(
            [str(tmp_path / "content/last.pt"), "--data", str(cache), "--clips", "1", "--every", "4", "--out", str(out)]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert decoded == list(res["clips"]) and len(decoded) == 1
    (row,) = res["clips"].values()
    assert row["chance_top1"] == pytest.approx(1 / row["n"]) and 0 <= row["v2a_top1"] <= 1


def test_ddp_two_processes_gloo(cache, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training.train",
        *ci_args(cache, out, "content", 2),
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 ranks in sync" in r.stdout + r.stderr
    assert len(stats(out)) == 2  # only rank 0 writes
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "last.pt", "loss.png", "stats.jsonl"]


def test_holdout_folder_links_held_out_clips_with_their_audio(tmp_path):
    table = SHARED / "data" / "train.csv"
    if not table.is_file():
        pytest.skip(f"shared data absent: {table}")
    from training.data import read_holdout
    from training.holdout import HOLDOUT, write_holdout_folder

    ids = write_holdout_folder(table, tmp_path / "h")
    assert len(ids) >= 3 and len(read_holdout(HOLDOUT)) >= 3
    names = sorted(p.name for p in (tmp_path / "h").iterdir())
    assert "m0079_KristiNoem.flac" in names and "m0079_KristiNoem.mp4" in names  # paired separate speech
    assert all((tmp_path / "h" / n).resolve().is_file() for n in names)
    # named clips instead (the model card's trained identities), by row id or whole clip id
    seen = write_holdout_folder(table, tmp_path / "s", clip_ids={"m0080", "m0134_681100216"})
    assert sorted(seen) == ["m0080_Obama_clip1", "m0134_681100216"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir())[:2] == ["m0080_Obama_clip1.flac", "m0080_Obama_clip1.mp4"]
    with pytest.raises(SystemExit, match="m9999"):
        write_holdout_folder(table, tmp_path / "x", clip_ids={"m9999"})


# ------------------------------------------------------------------------------------ video-only clips
@pytest.fixture(scope="module")
def mixed_cache(cache, tmp_path_factory) -> Path:
    """The synthetic cache plus one video-only clip of a third person (preprocess --keep-silent)."""
    import shutil

    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(cache, root, dirs_exist_ok=True)
    d = root / "clips" / "silent0"
    shutil.copytree(root / "clips" / "synth1", d)
    (d / "mel.npy").unlink()
    meta = {**json.loads((d / "meta.json").read_text()), "id": "silent0", "identity": "person2", "has_audio": False}
    (d / "meta.json").write_text(json.dumps(meta))
    idx = json.loads((root / "index.json").read_text())
    idx["clips"].append(meta)
    (root / "index.json").write_text(json.dumps(idx))
    return root


def test_video_only_samples_borrow_speech_and_carry_no_opening_label(mixed_cache):
    from training.data import Batcher, ClipStore

    store = ClipStore(mixed_cache, need_audio=False)
    for c in store.clips:  # opening labels on every clip, so a NaN below can only come from the sample kind
        c.opening = c.opening_raw = np.linspace(0.1, 0.5, len(c.frames)).astype(np.float32)
    bt = Batcher(store, 8, 1, 3, seed=1, negatives=False, video_only_frac=0.5)
    speech_mels = {k: store.clips[k].mel for k in range(len(store.clips)) if store.clips[k].mel is not None}
    seen = set()
    for step in range(6):
        b = bt.batch(step)
        for s in range(8):
            clip = store.clips[int(b["pos"][s, 0])]
            assert bool(b["speech"][s]) == (clip.mel is not None)
            assert np.isnan(float(b["opening_raw"][s])) != bool(b["speech"][s])
            seen.add(bool(b["speech"][s]))
            if not b["speech"][s]:  # the mel window is some speech clip's, at some usable frame
                win = b["mel"][s].numpy()
                assert any(
                    np.array_equal(win, audio_in.mel_window(m, f))
                    for k, m in speech_mels.items()
                    for f in store.clips[k].valid
                )
    assert seen == {True, False}
    with pytest.raises(InputError, match="video_only_frac"):
        Batcher(ClipStore(mixed_cache), 2, 1, 3, seed=1, negatives=False, video_only_frac=0.5)  # none silent


def test_video_only_mouth_is_not_judged(mixed_cache, tmp_path):
    """A video-only sample's mel is someone else's speech: no loss may pull its mouth to the target's
    mouth (pixel L1, mouth L1, feature matching, opening heads), while the rest of its face counts."""
    from rt_engine.config import mouth_box
    from training.train import Trainer

    args = ci_args(
        mixed_cache, tmp_path / "v", "joint", 1, "--video-only-frac", "0.5", "--w-content", "0", "--w-mouth", "2"
    )
    tr = Trainer(resolve(args))
    tr._set_modes()
    b = tr.batcher.batch(0)
    b["speech"] = torch.tensor([True, False])
    y0, y1, x0, x1 = mouth_box(b["target"].shape[-1])

    def loss(batch: dict) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return float(tr._joint_g_loss(batch, {})[0])

    def edit(sample: int, region: tuple[slice, slice]) -> dict:
        t = b["target"].clone()
        t[sample, :, region[0], region[1]] = -t[sample, :, region[0], region[1]]
        return {**b, "target": t}

    mouth = (slice(y0 + 4, y1 - 4), slice(x0 + 4, x1 - 4))  # inset: the CI model trains at 112 px, and the
    # resize to it blurs the box edge
    base = loss(b)
    assert loss(edit(1, mouth)) == base  # video-only mouth: not judged
    assert loss(edit(0, mouth)) != base  # speech mouth: judged
    assert loss(edit(1, (slice(0, y0), slice(None)))) != base  # video-only face above the mouth: judged
    with pytest.raises(Exception, match="video_only_frac"):
        resolve(ci_args(mixed_cache, tmp_path / "w", "joint", 1, "--video-only-frac", "0.5"))  # w_content 1


def test_joint_run_with_video_only_clips(mixed_cache, tmp_path):
    from training.train import main

    out = tmp_path / "mixed"
    assert (
        main(ci_args(mixed_cache, out, "joint", 4, "--video-only-frac", "0.5", "--w-content", "0", "--w-mouth", "2"))
        == 0
    )
    recs = stats(out)
    assert len(recs) == 4 and all(np.isfinite(v) for r in recs for v in r.values())
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["identities"] == ["person0", "person1", "person2"]  # the video-only face joins the id classes


# ------------------------------------------------------------------------------------ weight average
def test_weight_average_update_resume_and_export(cache, tmp_path):
    """--ema d: after each step ema = d * ema + (1 - d) * weights, starting at the initial weights;
    resume restores it bit for bit; training.release ships it (--raw: the last step's weights)."""
    from rt_engine.config import ModelConfig
    from rt_engine.models.checkpoint import load_single
    from training.release import release
    from training.train import Trainer, main

    tr = Trainer(resolve(ci_args(cache, tmp_path / "t", "joint", 2, "--ema", "0.9")))
    w0 = {k: v.clone() for k, v in tr.model.named_parameters()}
    assert all(torch.equal(v, dict(tr.ema.named_parameters())[k]) for k, v in w0.items())
    tr.train_step(0)
    w1 = {k: v.clone() for k, v in tr.model.named_parameters()}
    ema = dict(tr.ema.named_parameters())
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    for k in w0:
        torch.testing.assert_close(ema[k], 0.9 * w0[k] + 0.1 * w1[k], rtol=0, atol=1e-6)
    tr.train_step(1)
    w2 = dict(tr.model.named_parameters())
    for k in w0:
        torch.testing.assert_close(ema[k], 0.9 * (0.9 * w0[k] + 0.1 * w1[k]) + 0.1 * w2[k], rtol=0, atol=1e-6)

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(ci_args(cache, a, "joint", 3, "--ema", "0.9")) == 0
    assert main(ci_args(cache, b, "joint", 2, "--ema", "0.9")) == 0
    assert main(ci_args(cache, b, "joint", 3, "--ema", "0.9")) == 0  # resume
    ca, cb = (torch.load(p / "last.pt", weights_only=False) for p in (a, b))
    assert all(torch.equal(ca["model_ema"][k], cb["model_ema"][k]) for k in ca["model_ema"])
    assert main(ci_args(cache, tmp_path / "c", "joint", 1)) == 0
    assert main(ci_args(cache, tmp_path / "c", "joint", 2, "--ema", "0.9")) == 2  # no average to resume

    mc = ModelConfig.from_dict(ca["model_config"])
    for raw, want in ((False, ca["model_ema"]), (True, ca["model"])):
        f = release(a / "last.pt", tmp_path / f"m{raw}.safetensors", half=False, raw=raw)
        got = load_single(f, mc).state_dict()
        keys = [k for k, v in want.items() if v.is_floating_point()]
        assert all(torch.equal(got[k].float(), want[k].float()) for k in keys)
    assert any(not torch.equal(ca["model_ema"][k], ca["model"][k]) for k in keys)


def test_a_new_look_changes_a_whole_sample_alike(cache):
    """look_p: target and identity reference of a sample are mirrored / recoloured together (the
    generator must take sides and colours from the reference); p 0 draws exactly as before."""
    from rt_engine.inputs.image import to_tensor
    from training.data import Batcher, ClipStore

    img = np.random.default_rng(0).integers(0, 256, (8, 6, 3), dtype=np.uint8)
    look = augment.Look(True, np.array([1.0, 0.5, 2.0]), np.array([0.0, 10.0, -600.0]))
    out = look(img)
    assert np.array_equal(out[..., 0], img[:, ::-1, 0])
    assert np.array_equal(out[..., 1], np.floor(img[:, ::-1, 1] * 0.5 + 10.5).astype(np.uint8))
    assert (out[..., 2] == 0).all()  # clipped

    store = ClipStore(cache)
    before = Batcher(store, 6, 1, 3, seed=2, negatives=False)
    b0 = Batcher(store, 6, 1, 3, seed=2, negatives=False, look_p=0.0).batch(3)
    for k, v in before.batch(3).items():
        assert torch.equal(v, b0[k]), k

    mirror = Batcher(store, 6, 1, 3, seed=2, negatives=False, look_p=1.0, look_strength=0.0)
    flips = []
    for step in range(3):
        b = mirror.batch(step)
        for s in range(6):
            c, i = (int(x) for x in b["pos"][s])
            frames = store.clips[c].frames

            def net(f):
                return to_tensor(mirror._net(f)[None])[0]

            t_plain, t_flip = (
                torch.equal(b["target"][s], net(frames[i])),
                torch.equal(b["target"][s], net(frames[i][:, ::-1])),
            )
            assert t_plain != t_flip  # the target is the frame or its mirror
            r_flip = [j for j in store.clips[c].valid if torch.equal(b["ref"][s], net(frames[j][:, ::-1]))]
            r_plain = [j for j in store.clips[c].valid if torch.equal(b["ref"][s], net(frames[j]))]
            assert bool(r_flip) == t_flip and bool(r_plain) == t_plain  # the reference alike
            flips.append(t_flip)
    assert set(flips) == {True, False}
    recolour = Batcher(store, 6, 1, 3, seed=2, negatives=False, look_p=1.0, look_strength=0.3).batch(0)
    c, i = (int(x) for x in recolour["pos"][0])
    f = store.clips[c].frames[i]
    assert not any(torch.equal(recolour["target"][0], to_tensor(mirror._net(g)[None])[0]) for g in (f, f[:, ::-1]))


def test_warp_variant_trains_from_a_pcavs_model_and_renders(cache, tmp_path):
    """The appearance-preserving generator (models/warp.py) starts from another variant's encoders,
    trains with them frozen, exports and renders through the engine."""
    from rt_engine.models.checkpoint import load_single
    from training.release import release
    from training.train import main

    runs = tmp_path / "runs"
    assert main(ci_args(cache, runs / "joint", "joint", 1)) == 0
    warp_model = (
        CI_MODEL[:-1] + ", generator: warp, warp_feat: 8, warp_motion: 8, warp_dec: [8, 8, 8], warp_mouth_mask: true}"
    )
    args = ci_args(
        cache,
        runs / "warp",
        "joint",
        3,
        "--init",
        str(runs / "joint/last.pt"),
        "--freeze-encoders",
        "true",
        "--lr",
        "1e-3",
    )
    args[args.index("--model") + 1] = warp_model
    assert main(args) == 0
    init = torch.load(runs / "joint/last.pt", map_location="cpu", weights_only=False)["model"]
    got = torch.load(runs / "warp/last.pt", map_location="cpu", weights_only=False)["model"]
    enc = [k for k in init if k.startswith(("pose_encoder.", "audio_encoder.", "identity_encoder.model."))]
    assert enc and all(torch.equal(init[k], got[k]) for k in enc)  # taken over, then frozen
    assert not any(k.startswith("identity_encoder.conv1x1") for k in got)
    fresh = PCAVS(load_single(release(runs / "warp/last.pt", tmp_path / "w.safetensors", command="pytest")).cfg)
    moved = [
        k
        for k, v in fresh.generator.state_dict().items()
        if k.startswith("decoder") and not torch.equal(v, got["generator." + k])
    ]
    assert moved  # the generator trained
    frames = render_cli(tmp_path / "w.safetensors", tmp_path)
    assert frames.shape[1:] == (3, 112, 112) and np.isfinite(frames).all()


def test_opening_channel_widens_a_warp_model_and_trains(cache, tmp_path, caplog):
    """model.warp_open: a warp run without the channel is the init (its weights carried over, the new
    columns start at zero), the generator's opening head learns the labels, the teacher-forced
    opening trains the new columns; without labels the run refuses to start."""
    from training.train import main

    caplog.set_level(logging.INFO)
    warp = CI_MODEL[:-1] + ", generator: warp, warp_feat: 8, warp_motion: 8, warp_dec: [8, 8, 8]}"
    runs = tmp_path / "runs"
    args = ci_args(cache, runs / "warp", "joint", 1)
    args[args.index("--model") + 1] = warp
    assert main(args) == 0
    opened = warp[:-1] + ", warp_open: true}"
    extra = (
        "--init",
        str(runs / "warp/last.pt"),
        "--freeze-encoders",
        "true",
        "--open-teacher",
        "1.0",
        "--w-content",
        "0",
        "--w-id",
        "0",
    )
    args = ci_args(cache, runs / "nolabels", "joint", 1, *extra)
    args[args.index("--model") + 1] = opened
    assert main(args) == 2
    data = labelled_copy(cache, tmp_path / "cache")
    more = ("--lr", "2e-3", "--overfit-one-batch", "true", "--open-g-warmup", "20")
    args = ci_args(data, runs / "open", "joint", 25, *extra, *more)
    args[args.index("--model") + 1] = opened
    assert main(args) == 0
    assert "no mouth-opening channel: its new style columns and opening head start at zero" in caplog.text
    recs = stats(runs / "open")
    first, last = np.mean([r["open_g"] for r in recs[:2]]), np.mean([r["open_g"] for r in recs[-2:]])
    assert last < 0.5 * first, (first, last)
    init = torch.load(runs / "warp/last.pt", map_location="cpu", weights_only=False)["model"]
    got = torch.load(runs / "open/last.pt", map_location="cpu", weights_only=False)["model"]
    key = "generator.decoder.0.conv.modulation.weight"  # [Cin, S + 3]
    assert got[key].shape[1] == init[key].shape[1] + 3
    assert got[key][:, -3:].abs().max() > 0  # the teacher-forced opening trained the new columns
    assert all(got[f"generator.open_{t}"].abs().max() > 0 for t in ("flow", "mask", "rgb"))  # and the templates
    assert "opening head: 20 warm-up steps" in caplog.text
    # release --open-gain fit: the head's output then swings as far as its labels (std 1) on that data
    from rt_engine.models.checkpoint import load_single, read_single_meta
    from training.data import ClipStore
    from training.release import calibrate_opening, fitted_open_gain
    from training.release import main as release_main
    from training.train import labelled_mouth_codes

    out = tmp_path / "open.safetensors"
    assert release_main([str(runs / "open/last.pt"), str(out), "--open-gain", "fit", "--data", str(data)]) == 0
    assert read_single_meta(out)["provenance"]["open_gain"] > 1.0  # this tiny head hardly swings: capped at 3
    assert release_main([str(runs / "open/last.pt"), str(out), "--open-gain", "wide"]) == 2
    m = load_single(out).float().eval()
    with torch.no_grad():
        m.generator.open_head[0].weight.mul_(500.0)  # a head that swings, so that the gain is not capped
    x, _, _ = labelled_mouth_codes(m, ClipStore(data), torch.device("cpu"))

    def swing() -> float:
        with torch.no_grad():
            return float(m.generator.open_head(x).std())

    before = swing()
    gain = fitted_open_gain(m, data, None)
    assert 1 / 3 < gain < 3.0 and gain == pytest.approx(1 / before, rel=1e-4)
    calibrate_opening(m, gain)
    assert swing() == pytest.approx(1.0, rel=1e-3)


def test_later_config_files_add_model_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("data: x\nmodel: {gen_channels: [16, 16, 16, 8, 8], pose_mouth_mask: true}\n")
    (tmp_path / "b.yaml").write_text("model: {generator: warp}\n")
    cfg = resolve(["--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml")])
    assert cfg.model == {"gen_channels": [16, 16, 16, 8, 8], "pose_mouth_mask": True, "generator": "warp"}
