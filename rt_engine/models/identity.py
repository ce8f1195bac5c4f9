"""Identity encoder ``V``: ResNeXt50-32x4d trunk + 1x1 conv.

Input: an aligned face crop ``[B,3,224,224]`` in [-1,1] (no ImageNet normalisation).
Outputs: ``id_feature0`` ``[B,id_dim]`` (global average of the last stage, 2048 official) and
``id_feature1`` ``[B,id_map_channels,7,7]`` (the map that starts the generator; for the warp
generator variant the photo's appearance map ``[B,F+48,S/4,S/4]``, see models/warp.py).
Module names follow the official state_dict (``model.*`` is a torchvision-layout ResNeXt).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rt_engine.config import ModelConfig


class Bottleneck(nn.Module):
    """1x1 -> grouped 3x3 (stride here) -> 1x1, each with BN; identity or 1x1 downsample."""

    def __init__(self, cin: int, planes: int, width: int, groups: int, stride: int, downsample: bool):
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if downsample
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(out + res)


class ResNeXt(nn.Module):
    """torchvision-layout ResNeXt trunk without its classifier head."""

    def __init__(self, layers: tuple[int, ...], width: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for li, n in enumerate(layers):
            planes = width * 2**li
            bw = planes * 2  # width_per_group 4 with 32 groups: planes * 4 / 64 * 32
            blocks = []
            for b in range(n):
                stride = 2 if (b == 0 and li > 0) else 1
                blocks.append(Bottleneck(cin, planes, bw, groups, stride, downsample=(b == 0)))
                cin = planes * 4
            setattr(self, f"layer{li + 1}", nn.Sequential(*blocks))
        self.out_channels = cin

    def forward(self, x: Tensor) -> Tensor:  # [B,3,224,224] -> [B,32*width,7,7]
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class IdentityEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.model = ResNeXt(cfg.id_layers, cfg.id_width, cfg.id_groups)
        self.start = cfg.start
        if cfg.generator == "warp":  # the map is the photo's own features and pixels (models/warp.py)
            from rt_engine.models.warp import AppearanceEncoder

            self.appearance = AppearanceEncoder(cfg)
        else:
            self.conv1x1 = nn.Conv2d(self.model.out_channels, cfg.id_map_channels, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if hasattr(self, "appearance"):
            x = self.appearance.mask_mouth(x)  # warp_mouth_mask: V and the appearance map see no mouth
        feat = self.model(x)  # [B,2048,7,7]
        id_feature0 = feat.mean(dim=(2, 3))  # [B,2048]
        if hasattr(self, "appearance"):
            return id_feature0, self.appearance(x)  # [B,F+48,S/4,S/4] (warp generator)
        id_feature1 = F.adaptive_avg_pool2d(self.conv1x1(feat), self.start)  # [B,512,7,7]
        return id_feature0, id_feature1
