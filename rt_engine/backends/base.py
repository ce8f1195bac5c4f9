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

import math
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from rt_engine.config import ModelConfig, NoiseMode, check_mouth_gain
from rt_engine.inputs import audio as audio_in
from rt_engine.models.pcavs import make_style


def compare(ref: np.ndarray | Tensor, out: np.ndarray | Tensor, value_range: float | None = None) -> dict[str, float]:
    """How far ``out`` is from the reference ``ref`` (one function for the ``auto`` backend choice,
    the ONNX export verification and the TensorRT engine checks).

    Returns the max abs error, that error relative to max|ref| (at least 1), the PSNR in dB (peak =
    ``value_range``, default the reference's max - min; 2 for [-1,1] images; inf when equal), the
    reference's max|ref| and whether ``out`` is all finite. Shapes must match (ValueError).
    """
    ref, out = (np.asarray(x.detach().float().cpu() if isinstance(x, Tensor) else x, np.float64) for x in (ref, out))
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {list(ref.shape)} vs output {list(out.shape)}")
    err = np.abs(ref - out)
    peak = value_range if value_range is not None else float(ref.max() - ref.min()) or 1.0
    mse = float(np.mean(err**2))
    psnr = math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
    scale = max(float(np.abs(ref).max()), 1.0)
    return {
        "max_abs": float(err.max()),
        "max_rel": float(err.max()) / scale,
        "psnr_db": psnr,
        "ref_max_abs": float(np.abs(ref).max()),
        "finite": bool(np.isfinite(out).all()),
    }


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
    def generate(
        self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = NoiseMode.STORED
    ) -> Tensor: ...

    def generate_uint8(
        self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = NoiseMode.STORED
    ) -> np.ndarray:
        """Like :meth:`generate`, but the frames come out as [B,H,W,3] uint8 (what a stream sends).
        Backends that can fold the conversion into their model call override this."""
        from rt_engine.inputs.image import to_uint8

        return to_uint8(self.generate(id0, id1, mouth, pose, noise))

    def describe(self) -> str:
        return f"{self.name} ({self.precision}, model '{self.cfg.name}')"

    def set_lanes(self, n: int) -> int:
        """Prepare for ``n`` threads calling at once (the scheduler's lanes), each after
        :meth:`use_lane`; -> the number the runner supports. Default: one (calls must not overlap)."""
        return 1

    def use_lane(self, lane: int) -> None:
        """The calling thread is lane ``lane`` (< the number :meth:`set_lanes` returned) from now on."""
        return None

    def keep_batches(self, largest: int) -> None:
        """Release what the runner holds for batch sizes above ``largest`` (the scheduler will not form
        them). Default: nothing is held per size."""
        return None

    style = staticmethod(make_style)  # [B|1,2048], [B|1,500], [B|1,12] -> [B,2560]


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
