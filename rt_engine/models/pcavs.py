"""The four PC-AVS networks together, with the inference-time data flow.

identity image --V--> id_feature0 [B,2048], id_feature1 [B,512,7,7]   (once per identity)
pose frame     --E--> pose code [B,12]                                 (per frame, or ahead)
mel window     --A_sync--> audio content [B,512] --E.mouth_embed(x1.2)--> mouth [B,500]
style = [id_feature0 | mouth | pose]  [B,2560]
G(style, id_feature1) -> frame [B,3,224,224] in [-1,1]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rt_engine.config import ModelConfig, NoiseMode
from rt_engine.errors import ConfigError
from rt_engine.models.audio import AudioEncoder
from rt_engine.models.generator import Generator
from rt_engine.models.identity import IdentityEncoder
from rt_engine.models.pose import PoseEncoder
from rt_engine.models.warp import WarpGenerator


def make_style(id_feature0: Tensor, mouth: Tensor, pose: Tensor) -> Tensor:
    """The generator's style vector (every runner and the model use this one function).

    [B|1,2048], [B|1,500], [B|1,12] -> [B,2560] in the order identity | mouth | pose.
    """
    b = max(id_feature0.shape[0], mouth.shape[0], pose.shape[0])
    return torch.cat([id_feature0.expand(b, -1), mouth.expand(b, -1), pose.expand(b, -1)], dim=1)


class PCAVS(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.generator == "pcavs" and cfg.id_map_channels != cfg.gen_channels[0]:
            raise ValueError("id_map_channels must equal gen_channels[0]")
        self.cfg = cfg
        self.identity_encoder = IdentityEncoder(cfg)  # official V
        self.pose_encoder = PoseEncoder(cfg)  # official E
        self.audio_encoder = AudioEncoder(cfg)  # official A_sync
        # official G, or the appearance-preserving variant of models trained here
        self.generator = Generator(cfg) if cfg.generator == "pcavs" else WarpGenerator(cfg)

    def encode_identity(self, img: Tensor) -> tuple[Tensor, Tensor]:
        """[B,3,224,224] -> id_feature0 [B,2048], id_feature1 [B,512,7,7]."""
        return self.identity_encoder(img)

    def encode_pose(self, img: Tensor) -> Tensor:
        """[B,3,224,224] -> pose code [B,12]."""
        return self.pose_encoder(img)

    def encode_mouth(self, mel: Tensor) -> Tensor:
        """mel windows [B,1,80,20] -> mouth code [B,500]."""
        return self.pose_encoder.mouth(self.audio_encoder(mel))

    make_style = staticmethod(make_style)

    def generate(
        self,
        style: Tensor,
        id_feature1: Tensor,
        noise: str | list[Tensor] = NoiseMode.STORED,
        form: str | None = None,
        opening: Tensor | None = None,
    ) -> Tensor:
        """style [B,2560], id map [B|1,*cfg.id_map_shape] -> [B,3,224,224] (``form``: see Generator.forward;
        ``opening`` [B]: the mouth opening to draw, warp generator with warp_open only)."""
        id_map = id_feature1.expand(style.shape[0], -1, -1, -1)
        if opening is not None:
            if not self.cfg.has_opening:  # else it would be ignored
                raise ConfigError(f"an explicit mouth opening needs a warp_open model, not {self.cfg.name!r}")
            return self.generator(style, id_map, noise, form=form, opening=opening)
        return self.generator(style, id_map, noise, form=form)

    def forward(self, id_img: Tensor, pose_img: Tensor, mel: Tensor, noise: str = NoiseMode.STORED) -> Tensor:
        id0, id1 = self.encode_identity(id_img)
        style = self.make_style(id0, self.encode_mouth(mel), self.encode_pose(pose_img))
        return self.generate(style, id1, noise)
