"""One runner interface for every backend (torch, onnxruntime/openvino, tensorrt).

All methods are batched and take/return float32 CPU tensors, whatever the backend computes in:

    encode_identity(img [B,3,224,224])            -> id_feature0 [B,2048], id_feature1 [B,512,7,7]
    encode_pose(img [B,3,224,224])                -> pose code [B,12]
    encode_audio(mel [B,1,80,20])                 -> mouth code [B,500]   (audio encoder + mouth_embed)
    generate(id0 [B|1,2048], id1 [B|1,512,7,7], mouth [B,500], pose [B,12], noise) -> frames [B,3,H,W]
    generate_uint8(same)                          -> frames [B,H,W,3] uint8 (conversion in the model call)

Between the last two, ``MouthGain`` can scale how far the mouth moves (render and stream alike).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from rt_engine.config import ModelConfig, check_mouth_gain
from rt_engine.inputs import audio as audio_in


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

    def generate_uint8(self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor,
                       noise: str = "stored") -> np.ndarray:
        """Like :meth:`generate`, but the frames come out as [B,H,W,3] uint8 (what a stream sends).
        Backends that can fold the conversion into their model call override this."""
        from rt_engine.inputs.image import to_uint8

        return to_uint8(self.generate(id0, id1, mouth, pose, noise))

    def describe(self) -> str:
        return f"{self.name} ({self.precision}, model '{self.cfg.name}')"

    @staticmethod
    def style(id0: Tensor, mouth: Tensor, pose: Tensor) -> Tensor:
        """[B|1,2048], [B|1,500], [B|1,12] -> [B,2560] (identity | mouth | pose)."""
        b = max(id0.shape[0], mouth.shape[0], pose.shape[0])
        return torch.cat([id0.expand(b, -1), mouth.expand(b, -1), pose.expand(b, -1)], dim=1)


class MouthGain:
    """How far the mouth moves: mouth code m [B,500] -> m0 + gain * (m - m0), with m0 the code of
    digital silence (a closed mouth).

    1 leaves the codes untouched (bit for bit); 0 keeps the mouth as in silence; above 1 the lips
    open further for the same speech. The official inference does the like with a fixed 1.2 on the
    audio feature (``ModelConfig.mouth_weight``, anchored at zero), which every model here already
    includes. m0 is computed once per runner, on first use, by the caller's thread (the one that
    owns the runner).
    """

    def __init__(self, gain: float = 1.0) -> None:
        self.gain = check_mouth_gain(gain)
        self._anchor: tuple[Runner, Tensor] | None = None

    def silence_code(self, runner: Runner) -> Tensor:  # -> [1,500]
        if self._anchor is None or self._anchor[0] is not runner:
            win = torch.from_numpy(audio_in.silence_window().copy())[None]  # [1,1,80,20]
            self._anchor = (runner, runner.encode_audio(win))
        return self._anchor[1]

    def __call__(self, runner: Runner, mouth: Tensor) -> Tensor:  # [B,500] -> [B,500]
        if self.gain == 1.0:
            return mouth
        m0 = self.silence_code(runner)
        return m0 + self.gain * (mouth - m0)
