"""One runner interface for every backend (torch, onnxruntime/openvino, tensorrt).

All methods are batched and take/return float32 CPU tensors, whatever the backend computes in:

    encode_identity(img [B,3,224,224])            -> id_feature0 [B,2048], id_feature1 [B,512,7,7]
    encode_pose(img [B,3,224,224])                -> pose code [B,12]
    encode_audio(mel [B,1,80,20])                 -> mouth code [B,500]   (audio encoder + mouth_embed)
    generate(id0 [B|1,2048], id1 [B|1,512,7,7], mouth [B,500], pose [B,12], noise) -> frames [B,3,H,W]
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from rt_engine.config import ModelConfig


class Runner(ABC):
    name: str = "abstract"
    cfg: ModelConfig
    precision: str = "fp32"

    @abstractmethod
    def encode_identity(self, img: Tensor) -> tuple[Tensor, Tensor]: ...

    @abstractmethod
    def encode_pose(self, img: Tensor) -> Tensor: ...

    @abstractmethod
    def encode_audio(self, mel: Tensor) -> Tensor: ...

    @abstractmethod
    def generate(self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = "stored") -> Tensor: ...

    def describe(self) -> str:
        return f"{self.name} ({self.precision}, model '{self.cfg.name}')"

    @staticmethod
    def style(id0: Tensor, mouth: Tensor, pose: Tensor) -> Tensor:
        """[B|1,2048], [B|1,500], [B|1,12] -> [B,2560] (identity | mouth | pose)."""
        b = max(id0.shape[0], mouth.shape[0], pose.shape[0])
        return torch.cat([id0.expand(b, -1), mouth.expand(b, -1), pose.expand(b, -1)], dim=1)
