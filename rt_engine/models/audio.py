"""Audio content encoder ``A_sync``: ResNet-SE over a 0.2 s mel window, attentive pooling.

Input: mel windows ``[B,1,80,20]`` (channel, mel bin, time) in [0,1].
Output: ``audio_content`` ``[B,audio_feature]`` (512 official).
Note the order conv -> ReLU -> BN in the stem and in each block's first conv (as upstream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rt_engine.config import ModelConfig


class SELayer(nn.Module):
    def __init__(self, c: int, reduction: int = 8):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(c, c // reduction), nn.ReLU(inplace=True), nn.Linear(c // reduction, c), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:  # [B,C,F,T]
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class SEBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SELayer(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if (stride != 1 or cin != cout)
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(F.relu(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(out + res)


class ResNetSE(nn.Module):
    def __init__(self, layers: tuple[int, ...], width: int, out_dim: int, n_mels: int = 80):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for li, n in enumerate(layers):
            cout = width * 2**li
            blocks = [SEBasicBlock(cin if b == 0 else cout, cout, 2 if (b == 0 and li > 0) else 1) for b in range(n)]
            cin = cout
            setattr(self, f"layer{li + 1}", nn.Sequential(*blocks))
        freq = n_mels // 2 ** (len(layers) - 1)  # 80 -> 10
        dim = cin * freq
        self.attention = nn.Sequential(
            nn.Conv1d(dim, 128, 1), nn.ReLU(), nn.BatchNorm1d(128), nn.Conv1d(128, dim, 1), nn.Softmax(dim=2)
        )
        self.fc = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:  # [B,1,80,20] -> [B,512]
        x = self.bn1(F.relu(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B,256,10,3]
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [B,2560,3], index = channel * 10 + freq
        w = self.attention(x)  # [B,2560,3], softmax over time
        return self.fc(torch.sum(x * w, dim=2))


class AudioEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.model = ResNetSE(cfg.audio_layers, cfg.audio_width, cfg.audio_feature, cfg.n_mels)

    def forward(self, mel: Tensor) -> Tensor:  # [B,1,80,20] -> [B,512]
        return self.model(mel)
