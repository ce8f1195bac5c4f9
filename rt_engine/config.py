"""Frozen configuration dataclasses.

Every config has ``validate()`` which raises :class:`ConfigError` naming the bad field.
``ModelConfig`` describes the network sizes; ``MODEL_PRESETS`` holds the named sizes:

* ``official``: the published PC-AVS networks (checkpoints of the authors load into it);
* ``small``: 224x224 output with the generator capped at 128 channels and a narrower FAN,
  the size the CPU product path and the bundled default model use;
* ``tiny``: a toy size for tests and CI training runs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from rt_engine.errors import ConfigError

FPS = 25  # video frame rate of every PC-AVS model
SAMPLE_RATE = 16000  # audio rate of the mel front end
MEL_ROWS_PER_FRAME = 4  # 100 mel rows/s at 25 fps
MEL_WINDOW = 20  # mel rows per audio window (0.2 s)
FIRST_FRAME = 2  # frames 0 and 1 are never generated (official indexing)
# Mouth box (y0, y1, x0, x1) of the 224x224 aligned crop, with room for the jaw: the lip landmarks of
# the bundled training crops lie in x 76-138, y 107-134 (1st-99th percentile, face mesh, 54 frames).
MOUTH_BOX = (96, 160, 64, 160)


def mouth_box(size: int = 224) -> tuple[int, int, int, int]:
    """MOUTH_BOX (y0, y1, x0, x1) scaled to a ``size`` x ``size`` aligned crop."""
    return tuple(round(v * size / 224) for v in MOUTH_BOX)  # type: ignore[return-value]


GENERATORS = ("pcavs", "warp")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the four networks. The defaults are the official PC-AVS networks."""

    name: str = "official"
    # generator
    size: int = 224  # output resolution (start * 2**n_up)
    start: int = 7  # resolution of the identity map that starts the generator
    gen_channels: tuple[int, ...] = (512, 512, 512, 512, 256, 128)  # per resolution 7, 14, ...
    # identity encoder (ResNeXt, groups=32)
    id_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    id_width: int = 64  # stem width; the last stage has id_width * 32 channels (2048 official)
    id_groups: int = 32
    id_map_channels: int = 512  # channels of the identity map fed to the generator
    # non-identity (pose) encoder: FAN with one hourglass
    fan_width: int = 256
    fan_feature: int = 512  # noid feature / hidden width
    pose_dim: int = 12
    # audio content encoder: ResNet-SE
    audio_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    audio_width: int = 32
    audio_feature: int = 512
    mouth_dim: int = 500
    mouth_weight: float = 1.2  # hard-coded mouth_feature_weight of the official inference
    n_mels: int = 80
    # Blank MOUTH_BOX of the pose encoder's input (models trained here; the official E sees the whole
    # face). The pose code then cannot carry the driving video's or webcam's mouth into the output.
    pose_mouth_mask: bool = False
    # Generator variant. "pcavs": the official StyleGAN2 generator drawing the whole image from the 7x7
    # identity map (official checkpoints). "warp" (models trained here, models/warp.py): the photo's
    # own features and pixels are warped by a motion field predicted from the style, and modulated
    # convs draw what warping cannot show; it keeps the photo's appearance with few identities.
    generator: str = "pcavs"
    warp_feat: int = 32  # appearance feature channels at size/4 ("warp")
    warp_motion: int = 64  # motion-net channels at size/16 .. size/4 ("warp")
    warp_dec: tuple[int, int, int] = (64, 32, 16)  # decoder channels at size/4, size/2, size ("warp")
    # "warp": blank the photo's mouth box before the appearance encoder, so the output cannot copy the
    # photo's mouth and the generator must draw it from the mouth code (the speech)
    warp_mouth_mask: bool = False
    # "warp": a mouth-opening channel. A small head reads the opening (z-scored: more or less open than
    # this speaker's average) off the mouth code, and every modulated conv sees it beside the style.
    # Training can feed the measured opening instead (teacher forcing), which teaches the motion and
    # the drawn mouth far faster than the 500-number mouth code alone.
    warp_open: bool = False

    @property
    def n_up(self) -> int:
        """Number of upsampling levels of the generator."""
        return len(self.gen_channels) - 1

    @property
    def id_dim(self) -> int:
        """Length of the identity vector (id_feature0)."""
        return self.id_width * 32

    @property
    def style_dim(self) -> int:
        """Style = [identity | mouth | pose]."""
        return self.id_dim + self.mouth_dim + self.pose_dim

    @property
    def id_map_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of ``id_feature1``, the identity map the generator starts from.

        pcavs: the 7x7 map; warp: appearance features plus the photo's pixels packed 4x4 into channels
        (``pixel_unshuffle``), both at size/4."""
        if self.generator == "warp":
            r = self.size // 4
            return (self.warp_feat + 48, r, r)
        return (self.id_map_channels, self.start, self.start)

    @property
    def noise_sizes(self) -> list[int]:
        """Side length of each generator noise map, in the generator's order."""
        if self.generator == "warp":
            s = self.size
            return [s // 16, s // 8, s // 4, s // 4, s // 4, s // 2, s // 2, s, s]
        return [self.start * 2 ** ((i + 1) // 2) for i in range(1 + 2 * self.n_up)]

    @property
    def has_opening(self) -> bool:
        """Whether the generator takes a mouth opening (the warp generator with ``warp_open``)."""
        return self.generator == "warp" and self.warp_open

    @property
    def num_noises(self) -> int:
        return len(self.noise_sizes)

    def validate(self) -> ModelConfig:
        if self.start < 1:
            raise ConfigError(f"model.start must be >= 1, got {self.start}")
        if len(self.gen_channels) < 2:
            raise ConfigError("model.gen_channels needs at least two resolutions")
        if self.generator == "pcavs" and self.size != self.start * 2**self.n_up:
            raise ConfigError(
                f"model.size={self.size} does not match start={self.start} with "
                f"{self.n_up} upsamplings ({self.start * 2**self.n_up})"
            )
        if any(c <= 0 for c in self.gen_channels):
            raise ConfigError(f"model.gen_channels must be positive: {self.gen_channels}")
        if self.id_width % 2 or (self.id_width * 2) % self.id_groups:
            raise ConfigError(f"model.id_width={self.id_width} must be even and give whole groups")
        if self.fan_width % 4:
            raise ConfigError(f"model.fan_width={self.fan_width} must be divisible by 4")
        if self.audio_width % 8:
            raise ConfigError(f"model.audio_width={self.audio_width} must be divisible by 8")
        if self.generator not in GENERATORS:
            raise ConfigError(f"model.generator must be one of {GENERATORS}, got {self.generator!r}")
        if self.generator == "warp":
            if self.size % 16 or 224 % self.size:
                raise ConfigError(
                    f"model.size={self.size} must divide 224 and be divisible by 16 for the warp generator"
                )
            if min(self.warp_feat, self.warp_motion, *self.warp_dec) <= 0 or len(self.warp_dec) != 3:
                raise ConfigError("model.warp_feat, warp_motion and the three warp_dec channels must be positive")
        elif self.warp_open or self.warp_mouth_mask:
            raise ConfigError(
                f"model.warp_open and model.warp_mouth_mask belong to generator: warp, not {self.generator!r}"
            )
        if self.n_mels != 80:
            raise ConfigError("model.n_mels must be 80 (the audio encoder's input height)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown model config fields: {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw).validate()


MODEL_PRESETS: dict[str, ModelConfig] = {
    "official": ModelConfig(),
    "small": ModelConfig(
        name="small",
        gen_channels=(128, 128, 128, 128, 128, 64),
        id_layers=(2, 2, 2, 2),
        id_width=32,
        id_map_channels=128,
        fan_width=64,
        fan_feature=256,
        audio_width=16,
        audio_layers=(2, 2, 2, 2),
        audio_feature=256,
    ),
    "tiny": ModelConfig(
        name="tiny",
        size=112,
        gen_channels=(32, 32, 32, 32, 16),
        id_layers=(1, 1, 1, 1),
        id_width=32,
        id_map_channels=32,
        fan_width=32,
        fan_feature=64,
        audio_width=8,
        audio_layers=(1, 1, 1, 1),
        audio_feature=64,
    ),
}


def model_preset(name: str) -> ModelConfig:
    try:
        return MODEL_PRESETS[name].validate()
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose from {sorted(MODEL_PRESETS)}") from None


class NoiseMode(StrEnum):
    """Where the generator's per-layer noise maps come from. A ``str``: ``NoiseMode.STORED == "stored"``."""

    STORED = "stored"  # the checkpoint's fixed maps: the same frame for the same inputs (default)
    RANDOM = "random"  # fresh normal draws per layer and call (upstream inference.py)
    ZERO = "zero"  # no noise


NOISE_MODES = tuple(m.value for m in NoiseMode)


def noise_mode(value: str, what: str = "noise", error: type[Exception] = ConfigError) -> NoiseMode:
    """``value`` as a :class:`NoiseMode`; anything else raises ``error`` naming ``what``."""
    try:
        return NoiseMode(value)
    except ValueError:
        raise error(f"{what} must be one of {NOISE_MODES}, got {value!r}") from None


PRECISIONS = ("fp32", "bf16")
MAX_MOUTH_GAIN = 3.0


def check_mouth_gain(gain: float, what: str = "mouth_gain") -> float:
    """A mouth gain (``backends.base.MouthGain``) in [0, MAX_MOUTH_GAIN], else ConfigError."""
    try:
        g = float(gain)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {gain!r}") from None
    if not 0.0 <= g <= MAX_MOUTH_GAIN:  # NaN fails too
        raise ConfigError(f"{what} must be in [0, {MAX_MOUTH_GAIN}] (1 = as trained), got {gain!r}")
    return g


@dataclass(frozen=True)
class RenderConfig:
    """Options of ``python -m rt_engine.render``."""

    noise: str = NoiseMode.STORED
    precision: str = "fp32"
    batch_size: int = 8
    aligned: bool = False
    frontalize: bool = False  # zero pose code (paper Fig. 6)
    mouth_gain: float = 1.0  # how far the mouth moves, 1 = as trained (backends.base.MouthGain)

    def validate(self) -> RenderConfig:
        noise_mode(self.noise)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        check_mouth_gain(self.mouth_gain)
        return self
