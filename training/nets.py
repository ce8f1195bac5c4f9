"""Training-only networks and losses: heads, multi-scale discriminator, VGG19 perceptual loss.

The four inference networks are :class:`rt_engine.models.pcavs.PCAVS`; what only training needs
lives here:

* :class:`Heads`: identity classifier on ``id_feature0`` (stage 1) and the visual content head
  that maps the pose encoder's non-identity feature into the speech-content space (stage 2);
* :class:`MultiScaleDiscriminator`: PatchGAN discriminators at several image scales, returning
  their intermediate features for the feature-matching loss;
* :class:`VGG19` / :class:`PerceptualLoss`: torchvision-layout VGG19 in plain torch (its ImageNet
  ``state_dict`` loads by key), weights from a path or URL;
* :class:`SyncExpert`: a frozen copy of the content encoders that scores how well a *generated*
  frame's mouth matches its audio (the lip-sync loss ``w_sync``);
* :func:`info_nce`, hinge GAN losses, feature matching.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rt_engine.config import ModelConfig

log = logging.getLogger(__name__)


class Heads(nn.Module):
    def __init__(self, cfg: ModelConfig, num_identities: int):
        super().__init__()
        self.id_classifier = nn.Linear(cfg.id_dim, max(1, num_identities))  # id_feature0 -> identity logits
        # non-identity feature -> speech content space (same width as the audio content feature)
        self.visual_content = nn.Sequential(
            nn.Linear(cfg.fan_feature, cfg.fan_feature), nn.ReLU(), nn.Linear(cfg.fan_feature, cfg.audio_feature)
        )
        # audio content -> mouth opening (z-scored within the clip); the w_open auxiliary
        self.audio_opening = nn.Sequential(nn.Linear(cfg.audio_feature, 64), nn.ReLU(), nn.Linear(64, 1))
        # mouth box of an image -> mouth opening: learns on real targets, judges generated frames (w_open_img)
        self.image_opening = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 1),
        )


# ------------------------------------------------------------------------------------ contrastive
def info_nce(query: Tensor, pos: Tensor, neg: Tensor, temperature: float) -> Tensor:
    """InfoNCE with cosine similarity: query [B,D], positive [B,D], negatives [B,N,D] -> scalar.
    The positive sits at index 0 of the logits [B,1+N]."""
    q = F.normalize(query.float(), dim=-1)
    p = F.normalize(pos.float(), dim=-1)
    n = F.normalize(neg.float(), dim=-1)
    logits = torch.cat([(q * p).sum(-1, keepdim=True), torch.einsum("bd,bnd->bn", q, n)], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


# ------------------------------------------------------------------------------------ lip-sync expert
class SyncExpert(nn.Module):
    """Frozen speech-content encoders (visual: pose encoder's non-identity feature + content head;
    audio: the audio encoder), copied from the networks at the start of a run.

    ``loss(fake, mel, neg_mel)`` is InfoNCE of the generated frame's visual content against its own
    audio window, with the negatives' audio windows (time shifts of the same clip) as negatives.
    Gradients reach the generator through ``fake`` only: the expert itself never learns, so the
    generator cannot win by changing the judge (the Wav2Lip argument for a frozen sync expert)."""

    def __init__(self, model: nn.Module, heads: Heads):
        super().__init__()
        self.visual = copy.deepcopy(model.pose_encoder.model)  # FAN -> non-identity feature
        self.head = copy.deepcopy(heads.visual_content)
        self.audio = copy.deepcopy(model.audio_encoder)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SyncExpert:  # always in eval mode (frozen batch-norm statistics)
        return super().train(False)

    def loss(self, fake: Tensor, mel: Tensor, neg_mel: Tensor, temperature: float) -> Tensor:
        """fake [B,3,S,S], mel [B,1,80,20], neg_mel [B,N,1,80,20] -> scalar."""
        if fake.shape[-1] != 224:
            fake = F.interpolate(fake, size=(224, 224), mode="bilinear", align_corners=False)
        v = self.head(self.visual(fake))  # [B,D]
        with torch.no_grad():
            a = self.audio(mel)  # [B,D]
            bs, n = neg_mel.shape[:2]
            neg = self.audio(neg_mel.flatten(0, 1)).reshape(bs, n, -1)  # [B,N,D]
        return info_nce(v, a, neg, temperature)


# ------------------------------------------------------------------------------------ discriminator
class PatchDiscriminator(nn.Module):
    """pix2pixHD-style PatchGAN: 4x4 convs, stride 2 then 1, LeakyReLU; no normalisation."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks = [nn.Sequential(nn.Conv2d(3, channels, 4, 2, 2), nn.LeakyReLU(0.2))]
        c = channels
        for _ in range(1, layers):
            c2 = min(c * 2, 512)
            blocks.append(nn.Sequential(nn.Conv2d(c, c2, 4, 2, 2), nn.LeakyReLU(0.2)))
            c = c2
        c2 = min(c * 2, 512)
        blocks.append(nn.Sequential(nn.Conv2d(c, c2, 4, 1, 2), nn.LeakyReLU(0.2)))
        blocks.append(nn.Conv2d(c2, 1, 4, 1, 2))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> list[Tensor]:  # [B,3,H,W] -> features..., logits [B,1,h,w]
        feats = []
        for b in self.blocks:
            x = b(x)
            feats.append(x)
        return feats


class MultiScaleDiscriminator(nn.Module):
    def __init__(self, scales: int = 2, channels: int = 64, layers: int = 3):
        super().__init__()
        self.ds = nn.ModuleList(PatchDiscriminator(channels, layers) for _ in range(scales))

    def forward(self, x: Tensor) -> list[list[Tensor]]:
        out = []
        for k, d in enumerate(self.ds):
            if k:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(d(x))
        return out


def d_hinge_loss(real: list[list[Tensor]], fake: list[list[Tensor]]) -> Tensor:
    return sum(
        F.relu(1 - r[-1].float()).mean() + F.relu(1 + f[-1].float()).mean() for r, f in zip(real, fake, strict=True)
    ) / len(real)


def g_hinge_loss(fake: list[list[Tensor]]) -> Tensor:
    return sum(-f[-1].float().mean() for f in fake) / len(fake)


def feature_matching_loss(real: list[list[Tensor]], fake: list[list[Tensor]]) -> Tensor:
    """L1 between the discriminator's intermediate features of real and generated images."""
    total = 0.0
    for r, f in zip(real, fake, strict=True):
        for a, b in zip(r[:-1], f[:-1], strict=True):
            total = total + F.l1_loss(b.float(), a.detach().float())
    return total / len(real)


# ------------------------------------------------------------------------------------ VGG19
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
VGG_SLICES = (2, 7, 12, 21, 30)  # after relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (features index + 1)
VGG_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


class VGG19(nn.Module):
    """torchvision's VGG19 ``features`` (same module indices, so its ``features.*`` keys load)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in VGG19_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> list[Tensor]:  # [B,3,H,W] in [-1,1] -> 5 feature maps
        x = ((x + 1) / 2 - self.mean) / self.std
        out, start = [], 0
        for end in VGG_SLICES:
            x = self.features[start:end](x)
            out.append(x)
            start = end
        return out


def load_vgg19(source: str) -> VGG19 | None:
    """VGG19 with ImageNet weights from a file path or an http(s) URL; None (and a warning that the
    perceptual loss is off) when ``source`` is empty or unusable."""
    if not source:
        log.warning(
            "VGG perceptual loss DISABLED: no ImageNet VGG19 weights given (--vgg-weights PATH|URL, "
            "e.g. torchvision's vgg19-dcbb9e9d.pth)"
        )
        return None
    try:
        if source.startswith(("http://", "https://")):
            sd = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=True)
        else:
            if not Path(source).is_file():
                raise FileNotFoundError(source)
            sd = torch.load(source, map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.items() if k.startswith("features.")}
        vgg = VGG19()
        missing, _ = vgg.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k not in ("mean", "std")]
        if missing:
            raise KeyError(f"missing VGG19 keys, e.g. {missing[0]}")
    except Exception as e:  # any failure leaves the loss off, loudly
        log.warning(
            "VGG perceptual loss DISABLED: cannot load VGG19 weights from %s (%s: %s)", source, type(e).__name__, e
        )
        return None
    for p in vgg.parameters():
        p.requires_grad_(False)
    log.info("VGG perceptual loss on (weights %s)", source)
    return vgg.eval()


class PerceptualLoss(nn.Module):
    def __init__(self, vgg: VGG19):
        super().__init__()
        self.vgg = vgg

    def forward(self, fake: Tensor, real: Tensor) -> Tensor:
        ff, fr = self.vgg(fake), self.vgg(real)
        return sum(w * F.l1_loss(a.float(), b.detach().float()) for w, a, b in zip(VGG_WEIGHTS, ff, fr, strict=True))
