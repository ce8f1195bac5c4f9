"""Training configuration: one frozen dataclass, layered defaults <- yaml <- command line.

    python -m training.train --config training/configs/default_common.yaml \\
        --config training/configs/default_joint.yaml --steps 500 --lr 2e-4

Every field of :class:`TrainConfig` is a command-line flag (``batch_size`` -> ``--batch-size``).
``model`` holds overrides of the :class:`rt_engine.config.ModelConfig` preset named by ``preset``
(yaml mapping, or on the command line ``--model '{gen_channels: [64, 64, 64, 64, 32, 16]}'``).
The resolved config is written to ``<out>/config.yaml`` together with the git revision.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rt_engine.config import ModelConfig, model_preset
from rt_engine.errors import ConfigError

STAGES = ("identity", "content", "joint")


def opt(default: Any, help: str) -> Any:
    """A TrainConfig field with its ``--help`` text (``dict`` defaults become a factory)."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    stage: str = opt("joint", "identity | content | joint (paper Sec. 3-4, in this order)")
    preset: str = opt("tiny", "rt_engine ModelConfig preset: tiny, small or official")
    model: dict[str, Any] = opt({}, "overrides of the preset's ModelConfig fields (yaml mapping)")
    data: str = opt("", "preprocessed cache folder (python -m training.preprocess); required")
    holdout: str = opt("", "file of identity labels to leave out ('': use every clip)")
    out: str = opt("runs/debug", "run folder (config, checkpoints, stats, plots); rerunning resumes it")
    init: str = opt("", "checkpoint (.pt of an earlier stage or a .safetensors model) to start the networks from")
    # optimisation
    steps: int = opt(100, "train until this step (a resumed run continues to it)")
    batch_size: int = opt(4, "samples per step (per process with DDP)")
    lr: float = opt(1e-4, "Adam learning rate of the networks (constant)")
    lr_d: float = opt(1e-4, "Adam learning rate of the discriminator")
    beta1: float = opt(0.5, "Adam beta1")
    beta2: float = opt(0.999, "Adam beta2")
    ema: float = opt(
        0.0,
        "keep a moving average of the weights with this decay per step (e.g. 0.999; 0: off); "
        "training.release ships the average, steadier than GAN weights",
    )
    seed: int = opt(0, "seed: the batches and noise of step k depend only on seed, k and rank")
    bf16: bool = opt(False, "bf16 autocast for the forward passes")
    threads: int = opt(0, "torch threads (0: torch's own choice)")
    device: str = opt("auto", "auto | cpu | cuda")
    # contrastive speech-content space
    num_negatives: int = opt(4, "InfoNCE negatives per sample (other clips + time shifts of the same clip)")
    min_shift: int = opt(5, "same-clip negatives lie at least this many frames away")
    same_clip_negatives: float = opt(
        0.5,
        "share of the negatives taken from the positive's own clip (time "
        "shifts: only these force lip content; other clips differ by voice and face)",
    )
    temperature: float = opt(0.07, "InfoNCE softmax temperature on cosine similarities")
    # loss weights of the joint stage (paper: all 1)
    w_gan: float = opt(1.0, "weight of the GAN loss (hinge)")
    w_fm: float = opt(1.0, "weight of discriminator feature matching")
    w_vgg: float = opt(1.0, "weight of the VGG19 perceptual loss (needs --vgg-weights)")
    w_l1: float = opt(1.0, "weight of the pixel L1 between generated and target frame")
    w_mouth: float = opt(0.0, "extra pixel L1 on the mouth box of the aligned crop (a lip-sync signal)")
    gan_start: int = opt(0, "GAN and feature-matching losses, and D updates, start at this step (L1 warm-up)")
    w_content: float = opt(1.0, "weight of the audio-visual content InfoNCE")
    w_open: float = opt(0.0, "audio content -> mouth opening regression (labels: python -m training.mouth_labels)")
    w_open_img: float = opt(
        0.0,
        "the generated frame's mouth opening, judged by a head that learns it on real "
        "targets in the same step (frozen for the generated frame), against the label",
    )
    open_teacher: float = opt(
        0.0,
        "warp_open models: the share of speech samples whose generator gets the measured mouth "
        "opening (teacher forcing) instead of the one its head reads off the mouth code",
    )
    open_g_warmup: int = opt(
        0,
        "warp_open: before step 0 of a fresh run, fit the generator's opening head alone for this many "
        "steps (batch 256) on every labelled frame's mouth code",
    )
    open_img_warmup: int = opt(
        0, "before step 0 of a fresh run, train the w_open_img head alone for this many steps (batch 32 of real frames)"
    )
    w_sync: float = opt(
        0.0,
        "lip-sync loss: InfoNCE of the generated frame's content against its audio, scored "
        "by a frozen copy of the content encoders from --init (Wav2Lip-style expert)",
    )
    w_id: float = opt(1.0, "weight of the identity classification loss")
    freeze_encoders: bool = opt(
        False,
        "joint: train the generator (and the warp variant's appearance encoder) "
        "and the heads only; V, E and A keep their weights and run without "
        "backward (about half the step)",
    )
    video_only_frac: float = opt(
        0.0,
        "joint: this share of each batch from video-only clips (more faces; their "
        "mouth is not judged). Cache: preprocess --keep-silent",
    )
    vgg_weights: str = opt("", "ImageNet VGG19 state_dict, path or URL ('': the VGG loss is off, with a warning)")
    d_scales: int = opt(2, "multi-scale discriminator: number of image scales")
    d_channels: int = opt(64, "discriminator channels of the first layer")
    d_layers: int = opt(3, "discriminator layers per scale")
    # augmentation of the non-identity branch
    color_strength: float = opt(0.2, "pose-branch augmentation: per-channel gain/bias range")
    persp_margin: float = opt(0.1, "pose-branch augmentation: source points up to this fraction outside the image")
    persp_shift: float = opt(0.06, "pose-branch augmentation: target points moved along x by up to this fraction")
    crop_min: float = opt(0.85, "pose-branch augmentation: a centred random crop keeps at least this share")
    look_p: float = opt(
        0.0,
        "joint: this share of samples gets a new look (mirrored and/or recoloured; target, "
        "reference and pose frame alike), so few identities look like more",
    )
    look_strength: float = opt(0.3, "per-channel gain/bias range of a new look")
    # bookkeeping
    log_every: int = opt(10, "log the losses every this many steps")
    sample_every: int = opt(100, "write a sample grid every this many steps")
    ckpt_every: int = opt(200, "checkpoint every this many steps")
    ckpt_minutes: float = opt(5.0, "also checkpoint after this many minutes of wall time")
    overfit_one_batch: bool = opt(False, "always train on the batch of step 0 (debugging, tests)")

    def model_config(self) -> ModelConfig:
        base = model_preset(self.preset)
        if not self.model:
            return base
        d = base.to_dict()
        unknown = set(self.model) - set(d)
        if unknown:
            raise ConfigError(f"model overrides name unknown ModelConfig fields: {sorted(unknown)}")
        d.update(self.model)
        d.setdefault("name", base.name)
        if self.model and "name" not in self.model:
            d["name"] = f"{base.name}-custom"
        return ModelConfig.from_dict(d)

    def validate(self) -> TrainConfig:
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if not self.data:
            raise ConfigError("data is required: a folder written by python -m training.preprocess")
        for name in ("steps", "batch_size", "log_every", "sample_every", "ckpt_every", "d_scales", "d_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_negatives < 1:
            raise ConfigError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.min_shift < 1:
            raise ConfigError(f"min_shift must be >= 1, got {self.min_shift}")
        if self.stage == "joint" and self.w_sync > 0 and not self.init.endswith(".pt"):
            raise ConfigError(
                "w_sync needs --init of a .pt checkpoint from a content (or joint) run: the "
                "lip-sync expert is its trained content space; without one it would judge at random"
            )
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.video_only_frac < 1.0:
            raise ConfigError(f"video_only_frac must be in [0, 1), got {self.video_only_frac}")
        if self.video_only_frac > 0 and (self.stage != "joint" or self.w_content > 0 or self.w_sync > 0):
            raise ConfigError(
                "video_only_frac is for the joint stage with w_content 0 and w_sync 0: "
                "video-only samples have no speech for the contrastive losses"
            )
        if not 0.0 <= self.same_clip_negatives <= 1.0:
            raise ConfigError(f"same_clip_negatives must be in [0, 1], got {self.same_clip_negatives}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.look_p <= 1.0:
            raise ConfigError(f"look_p must be in [0, 1], got {self.look_p}")
        if not 0.0 <= self.look_strength < 1.0:
            raise ConfigError(f"look_strength must be in [0, 1), got {self.look_strength}")
        if not 0 < self.crop_min <= 1:
            raise ConfigError(f"crop_min must be in (0, 1], got {self.crop_min}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.gan_start < 0:
            raise ConfigError(f"gan_start must be >= 0, got {self.gan_start}")
        for name in ("lr", "lr_d"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        for f in dataclasses.fields(self):
            if f.name.startswith("w_") and getattr(self, f.name) < 0:
                raise ConfigError(f"loss weight {f.name} must be >= 0")
        self.model_config()  # raises for bad overrides
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # the parser's own defaults stay None (a flag given overrides the yaml files); --help shows the
    # dataclass default
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        help="yaml file of TrainConfig fields; repeat to layer several (later ones win)",
    )
    for f in dataclasses.fields(TrainConfig):
        kind = type(f.default) if f.default is not dataclasses.MISSING else dict
        shown = f.default if f.default is not dataclasses.MISSING else {}
        help = f"{f.metadata['help']} (default: {shown!r})"
        if kind is bool:
            ap.add_argument(_flag(f.name), type=_bool, default=None, metavar="BOOL", help=help)
        elif kind is dict:
            ap.add_argument(_flag(f.name), type=yaml.safe_load, default=None, metavar="YAML", help=help)
        else:
            ap.add_argument(_flag(f.name), type=kind, default=None, help=help)
    return ap


def resolve(argv: list[str] | None = None) -> TrainConfig:
    """defaults <- yaml (--config) <- explicit command-line flags."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for c in args.config:
        p = Path(c)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of TrainConfig fields")
        for k in ("git_revision", "model_config"):  # written by save_run_config, informational
            loaded.pop(k, None)
        unknown = set(loaded) - names
        if unknown:
            raise ConfigError(f"{p}: unknown fields {sorted(unknown)}")
        if isinstance(loaded.get("model"), dict) and isinstance(values.get("model"), dict):
            loaded["model"] = {**values["model"], **loaded["model"]}  # a later file adds model overrides
        values.update(loaded)
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    return TrainConfig(**values).validate()


def git_revision() -> str:
    """Commit of the working tree, with '+dirty' when it has local changes ('unknown' outside git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def save_run_config(cfg: TrainConfig, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = out / "config.yaml"
    doc = {"git_revision": git_revision(), "model_config": cfg.model_config().to_dict(), **cfg.to_dict()}
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p
