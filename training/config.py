"""Training configuration: one frozen dataclass, layered defaults <- yaml <- command line.

    python -m training.train --config training/configs/default_common.yaml \
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


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    stage: str = "joint"  # identity | content | joint (paper Sec. 3-4, in this order)
    preset: str = "tiny"  # rt_engine ModelConfig preset
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields
    data: str = ""  # preprocessed cache folder (python -m training.preprocess)
    holdout: str = ""  # file of identity labels to leave out ('' = use every clip)
    out: str = "runs/debug"  # run folder (config, checkpoints, stats, plots)
    init: str = ""  # checkpoint (.pt of an earlier stage) to start the networks from
    # optimisation
    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-4
    lr_d: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    ema: float = 0.0  # keep an exponential moving average of the model weights with this decay
    # (e.g. 0.999; 0 = off). training.release ships the average: GAN weights swing from step to step
    seed: int = 0
    bf16: bool = False  # bf16 autocast for the forward passes
    threads: int = 0  # torch threads (0: leave torch's default)
    device: str = "auto"  # auto | cpu | cuda
    # contrastive speech-content space
    num_negatives: int = 4  # N negatives per sample (other clips + time shifts of the same clip)
    min_shift: int = 5  # same-clip negatives are at least this many frames away
    same_clip_negatives: float = 0.5  # fraction of the N negatives drawn from the positive's own clip
    # (time shifts: only these force lip content; other clips can be told apart by voice and face)
    temperature: float = 0.07  # InfoNCE softmax temperature on cosine similarities
    # loss weights of the joint stage (paper: all 1)
    w_gan: float = 1.0
    w_fm: float = 1.0
    w_vgg: float = 1.0
    w_l1: float = 1.0  # pixel L1 between generated and target frame
    w_mouth: float = 0.0  # extra pixel L1 on the mouth box of the aligned crop (MOUTH_BOX), lip-sync signal
    gan_start: int = 0  # GAN and feature-matching losses (and D updates) start at this step: L1 warm-up
    w_content: float = 1.0
    w_open: float = 0.0  # audio content -> mouth opening regression (labels: python -m training.mouth_labels)
    w_open_img: float = 0.0  # generated frame's mouth opening (judged by a head that learns it on real
    # targets in the same step, frozen for the generated frame) against the label; needs w_open's labels
    open_img_warmup: int = 0  # before step 0 of a fresh run: train the w_open_img head alone for this many
    # steps (batch 32 of real frames), so it judges the generator sensibly from the start
    w_sync: float = 0.0  # lip-sync loss: InfoNCE of the *generated* frame's content against its audio,
    # scored by a frozen copy of the content encoders taken at the start of the run (Wav2Lip-style expert)
    w_id: float = 1.0
    freeze_encoders: bool = False  # joint: train the generator (and the warp variant's appearance encoder)
    # and the heads only; V, E and A keep their weights and run without backward (about half the step)
    video_only_frac: float = 0.0  # joint: this fraction of each batch from video-only clips (more faces for
    # identity and pose; their mouth box is left out of the pixel losses, as are their feature matching
    # and opening losses, since their mel is someone else's speech). Cache: preprocess --keep-silent
    vgg_weights: str = ""  # ImageNet VGG19 state_dict: path or URL ('' disables the VGG loss, with a warning)
    d_scales: int = 2  # multi-scale discriminator: number of image scales
    d_channels: int = 64
    d_layers: int = 3
    # augmentation of the non-identity branch
    color_strength: float = 0.2  # per-channel gain/bias range
    persp_margin: float = 0.1  # source points outside the image by up to this fraction of the size
    persp_shift: float = 0.06  # target points moved symmetrically along x by up to this fraction
    crop_min: float = 0.85  # centred random crop keeps at least this fraction of the side
    # joint stage: this share of samples gets a new look (training.augment.Look: mirrored and/or
    # recoloured, target, reference and pose frame alike), so few identities look like more
    look_p: float = 0.0
    look_strength: float = 0.3  # per-channel gain/bias range of a new look
    # bookkeeping
    log_every: int = 10
    sample_every: int = 100
    ckpt_every: int = 200  # steps
    ckpt_minutes: float = 5.0  # also checkpoint after this many minutes of wall time
    overfit_one_batch: bool = False  # always train on the batch of step 0 (debugging, tests)

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
            raise ConfigError("w_sync needs --init of a .pt checkpoint from a content (or joint) run: the "
                              "lip-sync expert is its trained content space; without one it would judge at random")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.video_only_frac < 1.0:
            raise ConfigError(f"video_only_frac must be in [0, 1), got {self.video_only_frac}")
        if self.video_only_frac > 0 and (self.stage != "joint" or self.w_content > 0 or self.w_sync > 0):
            raise ConfigError("video_only_frac is for the joint stage with w_content 0 and w_sync 0: "
                              "video-only samples have no speech for the contrastive losses")
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
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[],
                    help="yaml file of TrainConfig fields; repeat to layer several (later ones win)")
    for f in dataclasses.fields(TrainConfig):
        default = TrainConfig.__dataclass_fields__[f.name]
        kind = type(default.default) if default.default is not dataclasses.MISSING else dict
        if kind is bool:
            ap.add_argument(_flag(f.name), type=_bool, default=None, metavar="BOOL")
        elif kind is dict:
            ap.add_argument(_flag(f.name), type=yaml.safe_load, default=None, metavar="YAML")
        else:
            ap.add_argument(_flag(f.name), type=kind, default=None)
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
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def save_run_config(cfg: TrainConfig, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = out / "config.yaml"
    doc = {"git_revision": git_revision(), "model_config": cfg.model_config().to_dict(), **cfg.to_dict()}
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p
