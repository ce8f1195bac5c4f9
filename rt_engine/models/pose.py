"""Non-identity encoder ``E``: FAN with one hourglass -> 512-d non-identity feature.

From it ``to_headpose`` + ``headpose_embed`` give the 12-d pose code. ``mouth_embed`` (also
stored in ``E``) maps the audio content feature to the 500-d mouth code. Models with
``pose_mouth_mask`` (ours, not the official one) blank the mouth box before E computes the pose code.
Input: aligned crops ``[B,3,224,224]`` in [-1,1]. Module names follow the official state_dict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rt_engine.config import ModelConfig, mouth_box


def mouth_keep(size: int = 224) -> Tensor:
    """[1,1,S,S]: 0 over the mouth box of the aligned crop (``config.mouth_box``), 1 elsewhere."""
    y0, y1, x0, x1 = mouth_box(size)
    keep = torch.ones(1, 1, size, size)
    keep[..., y0:y1, x0:x1] = 0.0
    return keep


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class ConvBlock(nn.Module):
    """Pre-activation block: three 3x3 convs (out/2, out/4, out/4) concatenated, plus residual."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, cout // 2)
        self.bn2 = nn.BatchNorm2d(cout // 2)
        self.conv2 = conv3x3(cout // 2, cout // 4)
        self.bn3 = nn.BatchNorm2d(cout // 4)
        self.conv3 = conv3x3(cout // 4, cout // 4)
        self.downsample = (
            nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(True), nn.Conv2d(cin, cout, 1, bias=False))
            if cin != cout
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        a = self.conv1(F.relu(self.bn1(x)))
        b = self.conv2(F.relu(self.bn2(a)))
        c = self.conv3(F.relu(self.bn3(b)))
        res = x if self.downsample is None else self.downsample(x)
        return torch.cat([a, b, c], dim=1) + res


class HourGlass(nn.Module):
    def __init__(self, depth: int, width: int):
        super().__init__()
        self.depth = depth
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(width, width))
            self.add_module(f"b2_{level}", ConvBlock(width, width))
            if level == 1:
                self.add_module(f"b2_plus_{level}", ConvBlock(width, width))
            self.add_module(f"b3_{level}", ConvBlock(width, width))

    def _level(self, level: int, x: Tensor) -> Tensor:
        up1 = getattr(self, f"b1_{level}")(x)
        low = getattr(self, f"b2_{level}")(F.max_pool2d(x, 2, stride=2))
        low = self._level(level - 1, low) if level > 1 else getattr(self, f"b2_plus_{level}")(low)
        low = getattr(self, f"b3_{level}")(low)
        return up1 + F.interpolate(low, size=up1.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        return self._level(self.depth, x)


class FAN(nn.Module):
    """FAN_use: stem, three ConvBlocks, one hourglass, landmark head, 784 -> feature."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 4, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(width // 4)
        self.conv2 = ConvBlock(width // 4, width // 2)
        self.conv3 = ConvBlock(width // 2, width // 2)
        self.conv4 = ConvBlock(width // 2, width)
        self.m0 = HourGlass(4, width)
        self.top_m_0 = ConvBlock(width, width)
        self.conv_last0 = nn.Conv2d(width, width, 1)
        self.bn_end0 = nn.BatchNorm2d(width)
        self.l0 = nn.Conv2d(width, 68, 1)
        self.bn5 = nn.BatchNorm2d(68)
        self.conv6 = nn.Conv2d(68, 1, 3, stride=2, padding=1)
        self.fc = nn.Linear(28 * 28, out_dim)

    def forward(self, x: Tensor) -> Tensor:  # [B,3,224,224] -> [B,512]
        x = F.relu(self.bn1(self.conv1(x)))  # [B,64,112,112]
        x = F.max_pool2d(self.conv2(x), 2, stride=2)  # [B,128,56,56]
        x = self.conv4(self.conv3(x))  # [B,256,56,56]
        x = self.top_m_0(self.m0(x))
        x = F.relu(self.bn_end0(self.conv_last0(x)))
        x = F.relu(self.bn5(self.l0(x)))  # [B,68,56,56]
        x = self.conv6(x).flatten(1)  # [B,784]
        return self.fc(F.relu(x))


class PoseEncoder(nn.Module):
    """Official ``E`` (FanEncoder); only the inference-path heads are built."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f = cfg.fan_feature
        self.model = FAN(cfg.fan_width, f)
        self.to_headpose = nn.Sequential(nn.Linear(f, f), nn.ReLU(), nn.Linear(f, f))
        self.headpose_embed = nn.Sequential(nn.ReLU(), nn.Linear(f, cfg.pose_dim))
        self.mouth_embed = nn.Sequential(nn.ReLU(), nn.Linear(cfg.audio_feature, cfg.mouth_dim))
        self.mouth_weight = cfg.mouth_weight
        self.mouth_mask = cfg.pose_mouth_mask
        if self.mouth_mask:  # not in the state_dict: official checkpoints load unchanged
            self.register_buffer("mouth_keep", mouth_keep(), persistent=False)  # [1,1,224,224]

    def noid_feature(self, img: Tensor) -> Tensor:  # [B,3,224,224] -> [B,512]
        return self.model(img)

    def headpose(self, noid: Tensor) -> Tensor:  # [B,512] -> [B,12]
        return self.headpose_embed(self.to_headpose(noid))

    def mask_mouth(self, img: Tensor) -> Tensor:  # [B,3,224,224] -> the same with MOUTH_BOX at 0 (grey)
        if not self.mouth_mask:
            return img
        if img.shape[-2:] != (224, 224):
            raise ValueError(f"pose input must be [B,3,224,224], got {list(img.shape)}")
        return img * self.mouth_keep.to(img.dtype)

    def forward(self, img: Tensor) -> Tensor:  # [B,3,224,224] -> pose code [B,12]
        return self.headpose(self.noid_feature(self.mask_mouth(img)))

    def mouth(self, audio_content: Tensor) -> Tensor:  # [B,512] -> [B,500]
        return self.mouth_embed(self.mouth_weight * audio_content)
