"""Offline rendering: files in, mp4 (H.264 + AAC) out.

    python -m rt_engine.render --identity face.jpg --audio speech.wav --pose driver.mp4 --out out.mp4

Data flow: identity image -> aligned crop -> identity features (once); audio -> 16 kHz mel ->
one 0.2 s window per 25 fps frame -> mouth codes; pose source -> aligned crops -> pose codes;
then the generator, in batches. Official semantics: target frames ``i = 2 .. T//4 - 3``, the pose
clip is played forward then backward. In the mp4, frame ``i`` is shown at ``i / 25`` s, in sync
with the audio; frames 0 and 1 (never generated, as upstream) repeat frame 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rt_engine.backends import make_runner
from rt_engine.backends.base import MouthGain, Runner
from rt_engine.cli import HelpFormatter, cli_main
from rt_engine.config import FPS, NOISE_MODES, NoiseMode, RenderConfig
from rt_engine.errors import InputError
from rt_engine.inputs import audio as audio_in
from rt_engine.inputs import pose as pose_in
from rt_engine.inputs.image import IMAGE_EXTS, official_crop, pingpong_index, read_image, to_tensor, to_uint8

log = logging.getLogger(__name__)
POSE_MODES = ("idle", "still")


@dataclass
class RenderResult:
    frames: np.ndarray  # [N,3,H,W] float32 in [-1,1]
    frame_inds: np.ndarray  # [N] target frame index i of each frame
    pose_inds: np.ndarray  # [N] pose-clip frame used (-1 for idle/still/frontal)
    wav: np.ndarray  # [S] 16 kHz mono input audio (before RMS normalisation)
    seconds: float  # wall time of the model part
    runner: str


def load_identity(identity: str | Path | np.ndarray, aligned: bool) -> np.ndarray:
    """Identity image (path to an image or a video's first frame, or RGB array) -> aligned crop."""
    if isinstance(identity, np.ndarray):
        img = identity
    else:
        p = Path(identity)
        img = read_image(p) if p.suffix.lower() in IMAGE_EXTS else pose_in.read_frames(p, max_frames=1)[0]
    return pose_in.align_image(img, aligned, name=str(identity) if not isinstance(identity, np.ndarray) else "image")


class PoseClip:
    """Aligned pose frames addressed by their clip index (numbered files may start anywhere)."""

    def __init__(self, source: str | Path | np.ndarray, aligned: bool, length: int | None = None):
        self.files: dict[int, Path] = {}
        self.frames: dict[int, np.ndarray] = {}
        p = None if isinstance(source, np.ndarray) else Path(source)
        numbered = p is not None and p.is_dir() and aligned and self._numbered(p)
        if numbered:  # official layout: '%06d.jpg' % p, loaded lazily
            self.length = length or (max(self.files) + 1)
        else:
            frames = source if isinstance(source, np.ndarray) else pose_in.read_frames(source)
            frames = pose_in.align_frames(frames, aligned, name=str(source) if p else "pose frames")
            self.frames = dict(enumerate(frames))
            self.length = min(length or len(frames), len(frames))

    def _numbered(self, d: Path) -> bool:
        for f in d.iterdir():
            if f.suffix.lower() in IMAGE_EXTS and re.fullmatch(r"\d+", f.stem):
                self.files[int(f.stem)] = f
        return bool(self.files)

    def index(self, i: int) -> int:
        return pingpong_index(i, self.length)

    def get(self, k: int) -> np.ndarray:
        if k not in self.frames:
            if k not in self.files:
                raise InputError(f"pose frame {k} missing (expected file {k:06d}.jpg)")
            self.frames[k] = read_image(self.files[k])
        return self.frames[k]


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, bs: int) -> torch.Tensor:
    return torch.cat([fn(x[s : s + bs]) for s in range(0, x.shape[0], bs)]) if x.shape[0] else x


def render_arrays(
    identity: str | Path | np.ndarray,
    audio: str | Path | np.ndarray,
    pose: str | Path | np.ndarray = "still",
    checkpoint: str | Path | None = None,
    aligned: bool = False,
    noise: str = NoiseMode.STORED,
    precision: str = "fp32",
    frontalize: bool = False,
    batch_size: int = 8,
    max_frames: int | None = None,
    pose_length: int | None = None,
    runner: Runner | None = None,
    progress: bool = False,
    backend: str = "torch",
    mouth_gain: float = 1.0,
    opening: np.ndarray | None = None,
) -> RenderResult:
    """Render frames in memory. ``pose``: video / frames folder / frames array, 'still' (pose of
    the identity image) or 'idle' (built-in motion). ``frontalize`` uses a zero pose code.
    ``mouth_gain`` scales how far the mouth moves (1 = as trained; ``MouthGain``).
    ``opening`` [N] (a diagnostic; warp_open models on the torch backend): the mouth opening
    (z-score) of video frame i is ``opening[i]``, in place of the one read off the speech."""
    cfg = RenderConfig(
        noise=noise,
        precision=precision,
        batch_size=batch_size,
        aligned=aligned,
        frontalize=frontalize,
        mouth_gain=mouth_gain,
    ).validate()
    gain = MouthGain(cfg.mouth_gain)
    runner = runner or make_runner(checkpoint, precision, backend)
    # ---- inputs
    id_aligned = load_identity(identity, aligned)  # [224,224,3]
    id_img = to_tensor(official_crop(id_aligned))  # [1,3,224,224]
    if isinstance(audio, np.ndarray):
        raw_wav = audio_in.resample_mono(audio, audio_in.SAMPLE_RATE)
        _, mel = audio_in.audio_features(raw_wav)
    else:
        raw_wav = audio_in.load_audio(audio)
        _, mel = audio_in.audio_features(raw_wav)
    frames_i = audio_in.target_frames(mel.shape[0])
    if max_frames is not None:
        frames_i = frames_i[:max_frames]
    n = len(frames_i)
    t0 = time.perf_counter()
    bs = cfg.batch_size
    id0, id1 = runner.encode_identity(id_img)
    # ---- pose codes [n,12]
    pose_inds = np.full(n, -1, np.int64)
    if frontalize:
        codes = torch.zeros(n, runner.cfg.pose_dim)
    elif isinstance(pose, str) and pose == "still":
        codes = runner.encode_pose(id_img).expand(n, -1)
    elif isinstance(pose, str) and pose == "idle":
        n_key = int(np.ceil((frames_i[-1] + 1) / FPS * pose_in.IDLE_KEY_FPS)) + 2 if n else 1
        keys = np.stack([official_crop(f) for f in pose_in.idle_frames(id_aligned, n_key)])
        key_codes = _batched(runner.encode_pose, to_tensor(keys), bs).numpy()
        all_codes = pose_in.interpolate_codes(key_codes, int(frames_i[-1]) + 1 if n else 0)
        codes = torch.from_numpy(all_codes[frames_i]) if n else torch.zeros(0, runner.cfg.pose_dim)
    else:
        clip = PoseClip(pose, aligned, pose_length)
        pose_inds = np.array([clip.index(int(i)) for i in frames_i], np.int64)
        uniq = sorted(set(pose_inds.tolist()))
        crops = np.stack([official_crop(clip.get(k)) for k in uniq]) if uniq else np.zeros((0, 224, 224, 3), np.uint8)
        uc = _batched(runner.encode_pose, to_tensor(crops), bs)
        pos = {k: j for j, k in enumerate(uniq)}
        codes = uc[[pos[int(k)] for k in pose_inds]] if n else torch.zeros(0, runner.cfg.pose_dim)
    # ---- audio + generator, batched
    wins = torch.from_numpy(audio_in.mel_windows(mel, frames_i))  # [n,1,80,20]
    out = []
    rng = range(0, n, bs)
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, total=(n + bs - 1) // bs, unit="batch", desc="render")
    open_t = None
    if opening is not None:
        from rt_engine.backends.torch_backend import TorchRunner

        if not isinstance(runner, TorchRunner):
            raise InputError(f"an explicit mouth opening needs the torch backend, not {runner.name}")
        open_all = np.asarray(opening, np.float32).reshape(-1)
        if n and len(open_all) <= int(frames_i[-1]):
            raise InputError(f"opening has {len(open_all)} values; frame {int(frames_i[-1])} needs one")
        open_t = torch.from_numpy(open_all[frames_i])  # [n]
    for s in rng:
        mouth = gain(runner, runner.encode_audio(wins[s : s + bs]))  # [b,500]
        extra = {} if open_t is None else {"opening": open_t[s : s + bs]}
        out.append(runner.generate(id0, id1, mouth, codes[s : s + bs], noise=cfg.noise, **extra).numpy())
    frames = np.concatenate(out) if out else np.zeros((0, 3, runner.cfg.size, runner.cfg.size), np.float32)
    return RenderResult(
        frames=frames,
        frame_inds=frames_i,
        pose_inds=pose_inds,
        wav=raw_wav,
        seconds=time.perf_counter() - t0,
        runner=runner.describe(),
    )


def write_mp4(
    path: str | Path,
    frames_u8: np.ndarray,
    frame_inds: np.ndarray,
    wav: np.ndarray,
    sr: int = audio_in.SAMPLE_RATE,
    fps: int = FPS,
) -> Path:
    """Write H.264 video (frame i at i/fps; missing leading frames repeat the first one) with the
    audio muxed as AAC. frames_u8: [N,H,W,3]."""
    from fractions import Fraction

    import av

    p = Path(path)
    if not p.parent.is_dir():
        raise InputError(f"output folder does not exist: {p.parent}")
    if len(frames_u8) == 0:
        raise InputError("nothing to write: no frames were generated")
    h, w = frames_u8.shape[1:3]
    with av.open(str(p), "w") as c:
        vs = c.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"crf": "18", "preset": "veryfast"}
        as_ = c.add_stream("aac", rate=sr)
        as_.layout = "mono"
        first = int(frame_inds[0])
        seq = [frames_u8[0]] * first + list(frames_u8)
        for k, img in enumerate(seq):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            f.pts = k
            f.time_base = Fraction(1, fps)
            for pkt in vs.encode(f):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        pcm = np.clip(wav, -1, 1).astype(np.float32)[None]  # [1,S]
        step = 1024
        for s in range(0, pcm.shape[1], step):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, s : s + step]), format="flt", layout="mono")
            af.sample_rate = sr
            af.pts = s
            af.time_base = Fraction(1, sr)
            for pkt in as_.encode(af):
                c.mux(pkt)
        for pkt in as_.encode():
            c.mux(pkt)
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rt_engine.render", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--identity", required=True, help="identity image (or video: first frame)")
    ap.add_argument("--audio", required=True, help="driving speech: wav, flac, mp3, m4a, mp4, ...")
    ap.add_argument("--pose", default="still", help="pose video, folder of frames, 'idle' (built-in motion) or 'still'")
    ap.add_argument(
        "--checkpoint", default=None, help="official checkpoint folder or .safetensors; None: the bundled model"
    )
    ap.add_argument("--out", default=None, help="output .mp4 (its folder must exist)")
    ap.add_argument("--save-raw", default=None, help="also save float32 frames [N,3,H,W] + indices (.npz)")
    ap.add_argument("--aligned", action="store_true", help="inputs are aligned 224x224 crops: no detection")
    ap.add_argument(
        "--noise",
        default=NoiseMode.STORED.value,
        choices=NOISE_MODES,
        help="generator noise maps: the checkpoint's stored ones (the same frames every run), "
        "fresh random draws per frame, or none",
    )
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="compute precision of the model: fp32 (the reference), or bf16 (faster on CPUs with "
        "AVX512-BF16/AMX; tests/test_parity.py holds it above 40 dB PSNR against fp32)",
    )
    ap.add_argument(
        "--backend", default="torch", help="torch (reference), torch-fast, torch-cuda, onnxruntime, openvino or auto"
    )
    ap.add_argument("--frontalize", action="store_true", help="zero pose code (frontal face, paper Fig. 6)")
    ap.add_argument(
        "--mouth-gain", type=float, default=1.0, help="how far the mouth moves: 1 as trained, 0 closed, up to 3 wider"
    )
    ap.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="frames per model call: more is faster per frame and needs more memory",
    )
    ap.add_argument("--max-frames", type=int, default=None, help="render only the first N frames")
    ap.add_argument("--pose-length", type=int, default=None, help="pose clip length n (None: all frames)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own choice)")
    ap.add_argument("--seed", type=int, default=0, help="seed for --noise random")
    ap.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return ap


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    if not args.out and not args.save_raw:
        print("error: give --out out.mp4 and/or --save-raw frames.npz", file=sys.stderr)
        return 2
    for out in (args.out, args.save_raw):  # checked before rendering; never created (a typo could write to /)
        if out and not Path(out).resolve().parent.is_dir():
            raise InputError(f"output folder does not exist: {Path(out).resolve().parent} (create it first)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pose = args.pose if args.pose in POSE_MODES else Path(args.pose)
    if not isinstance(pose, str) and not pose.exists():
        raise InputError(f"pose source not found: {pose} (or use 'idle' / 'still')")
    res = render_arrays(
        args.identity,
        args.audio,
        pose,
        args.checkpoint,
        aligned=args.aligned,
        noise=args.noise,
        precision=args.precision,
        frontalize=args.frontalize,
        batch_size=args.batch_size,
        max_frames=args.max_frames,
        pose_length=args.pose_length,
        progress=not args.quiet,
        backend=args.backend,
        mouth_gain=args.mouth_gain,
    )
    n = len(res.frames)
    log.info("%d frames in %.1f s (%.2f frames/s) with %s", n, res.seconds, n / max(res.seconds, 1e-9), res.runner)
    if args.save_raw:
        np.savez(args.save_raw, frames=res.frames, frame_inds=res.frame_inds, pose_inds=res.pose_inds)
        log.info("wrote %s", args.save_raw)
    if args.out:
        write_mp4(args.out, to_uint8(torch.from_numpy(res.frames)), res.frame_inds, res.wav)
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
