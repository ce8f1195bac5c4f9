"""Appearance-preserving generator variant (``ModelConfig.generator == "warp"``).

PC-AVS draws the whole frame from a 512-number identity code, which generalises only after thousands
of identities. This variant keeps the three PC-AVS codes (identity, 12-number pose, speech content
as the mouth code) as the style of every modulated convolution, but starts from the photo itself:

* :class:`AppearanceEncoder` (part of the identity encoder, once per identity) turns the photo
  ``[B,3,S,S]`` into features ``[B,F,S/4,S/4]`` and packs them with the photo's own pixels
  (``pixel_unshuffle`` by 4: ``[B,48,S/4,S/4]``) into one identity map ``[B,F+48,S/4,S/4]``.
* :class:`WarpGenerator`: a motion net (plain strided convs on the features, then modulated convs
  driven by the style) predicts a backward flow and an occlusion map at S/4. The features are
  warped (``grid_sample``) and decoded by modulated convs up to S, which draw what warping cannot
  show (mouth interior, teeth, disoccluded background). The photo's pixels are warped at full
  resolution by the upsampled flow, and a predicted mask blends them with the drawn image.

At initialisation the flow is zero and the mask keeps the warped photo except over the mouth box,
where a fixed prior blends in the drawn image evenly, so an untrained model returns the photo
around a half-drawn mouth; training (self-reconstruction: another frame of the same clip is the
source) learns motion and mouth. Every op exports to ONNX (GridSample needs opset >= 16).

With ``warp_open`` a small head reads the mouth opening (z-scored within a speaker) off the mouth
code, and every modulated conv sees it beside the style (:func:`open_features`). Training may pass
the measured opening instead (``opening=``): with one clean number to follow, the motion net learns
to open and close the photo's mouth far sooner than from the 500-number code alone. The opening
also weighs three learned templates in the aligned crop (a flow, a blend logit and a colour offset:
a one-number mouth "blendshape"), which give it a direct path to the pixels from the first step.
They are coarse (S/16, S/8, upsampled) and windowed around the mouth and jaw (``mouth_envelope``).

Noise maps (``ModelConfig.noise_sizes``): one per styled conv, in order motion 14, 28, 56, decoder
56, 56, 112, 112, 224, 224 (official-size numbers for S = 224).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rt_engine.config import ModelConfig, NoiseMode, mouth_box
from rt_engine.models.generator import StyledGenerator
from rt_engine.models.modconv import FUSED_FORMS, LRELU_SLOPE, StyledConv, ToRGB
from rt_engine.models.pose import mouth_keep

PACK = 4  # pixels packed per side into the identity map (pixel_unshuffle factor)
MASK_INIT = 4.0  # blend logit at start: sigmoid(4) = 0.98 of the warped photo
OPEN_FEATS = 3  # style columns added by warp_open (open_features)
OPEN_MAX = 3.0  # the opening is clamped to +-3 (z-score units)
# warp_open templates (learned, zero at start), in the aligned crop: per unit of opening above and
# below the speaker's average, a flow at S/4 (normalised units), a blend logit and a drawn-colour
# offset at S. Gains scale their effective learning rate (a blend logit must travel about 4).
OPEN_GAIN_FLOW, OPEN_GAIN_MASK, OPEN_GAIN_RGB = 1.0, 10.0, 3.0
# Template resolution (divisor of S; upsampled bilinearly): coarse, so they stay smooth (per-pixel
# templates under Adam grew pixel noise), and windowed by mouth_envelope (no edits far from the mouth).
OPEN_DIV_FLOW, OPEN_DIV_IMG = 16, 8


def open_features(opening: Tensor, style_dim: int) -> Tensor:
    """Mouth opening [B,1] (z-score) -> the style columns [B,OPEN_FEATS] that warp_open appends.

    [o, relu(o), relu(-o)] lets a modulation bend at the speaker's average. The gain sqrt(style_dim)
    undoes EqualLinear's 1/sqrt(style_dim): these few columns train at the speed of a plain linear
    layer instead of being drowned by the 2,560 style numbers."""
    o = opening.float().clamp(-OPEN_MAX, OPEN_MAX)
    return torch.cat([o, F.relu(o), F.relu(-o)], dim=1) * style_dim**0.5


class AppearanceEncoder(nn.Module):
    """Photo [B,3,S,S] in [-1,1] -> identity map [B,F+48,S/4,S/4] = [features | packed pixels]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        f = cfg.warp_feat
        self.size = cfg.size
        if cfg.warp_mouth_mask:  # not in the state_dict
            self.register_buffer("mouth_keep", mouth_keep(), persistent=False)  # [1,1,224,224]
        self.conv0 = nn.Conv2d(3, f // 2, 3, padding=1)
        self.conv1 = nn.Conv2d(f // 2, f, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)

    def mask_mouth(self, img: Tensor) -> Tensor:
        """[B,3,224,224] -> the same with the mouth box grey (0) under warp_mouth_mask (the photo's mouth
        never reaches the output), else unchanged. Idempotent."""
        return img * self.mouth_keep.to(img.dtype) if hasattr(self, "mouth_keep") else img

    def forward(self, img: Tensor) -> Tensor:
        img = self.mask_mouth(img)
        if img.shape[-1] != self.size:  # the 224 input crop at the output size S (224 / S whole)
            img = F.avg_pool2d(img, img.shape[-1] // self.size)  # [B,3,S,S]
        x = F.leaky_relu(self.conv0(img), LRELU_SLOPE)  # [B,F/2,S,S]
        x = F.leaky_relu(self.conv1(x), LRELU_SLOPE)  # [B,F,S/2,S/2]
        x = F.leaky_relu(self.conv2(x), LRELU_SLOPE)  # [B,F,S/4,S/4]
        x = self.conv3(x)  # [B,F,S/4,S/4]
        return torch.cat([x, F.pixel_unshuffle(img, PACK)], dim=1)  # [B,F+48,S/4,S/4]


def base_grid(h: int, w: int, like: Tensor) -> Tensor:
    """Identity sampling grid [1,H,W,2] (x, y in [-1,1], pixel centres: align_corners=False)."""
    ys = (torch.arange(h, device=like.device, dtype=torch.float32) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=like.device, dtype=torch.float32) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)[None]


def warp(x: Tensor, flow: Tensor, grid0: Tensor | None = None) -> Tensor:
    """Backward warp: x [B,C,H,W] sampled at identity + flow [B,2,H,W] (normalised units) -> [B,C,H,W].
    ``grid0``: the identity grid [1,H,W,2] if precomputed (a constant in exported graphs)."""
    if grid0 is None:
        grid0 = base_grid(x.shape[-2], x.shape[-1], x)
    grid = grid0 + flow.permute(0, 2, 3, 1).float()  # [B,H,W,2]
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)


def mouth_envelope(size: int) -> Tensor:
    """[1,1,S,S] window of the mouth-opening templates: 1 over the mouth box of the aligned crop widened
    by S/14 on the sides and above and by S/5.6 below (the jaw drops), 0 beyond, with a soft edge."""
    y0, y1, x0, x1 = mouth_box(size)
    a, b = round(size / 14), round(size / 5.6)
    box = torch.zeros(1, 1, size, size)
    box[..., max(0, y0 - a) : min(size, y1 + b), max(0, x0 - a) : min(size, x1 + a)] = 1.0
    k = max(3, size // 16) | 1
    return F.avg_pool2d(F.pad(box, (k // 2,) * 4, mode="replicate"), k, stride=1)


def mouth_prior(size: int, owned: bool = False) -> Tensor:
    """Blend-logit prior [1,1,S,S], added to the mask head's logit (bias MASK_INIT): over the mouth box
    of the aligned crop -MASK_INIT (an even blend of warped photo and drawn image at start, so the
    drawn branch learns the mouth at once) or, ``owned`` (the photo's mouth is blanked), -2 MASK_INIT
    (the drawn image owns the box); 0 far from it (the warped photo), with a smooth edge (no seam)."""
    box = 1.0 - mouth_keep(size)  # [1,1,S,S]
    k = max(3, size // 16) | 1  # box blur of about size/16: the edge ramps over ~14 px at 224
    soft = F.avg_pool2d(F.pad(box, (k // 2,) * 4, mode="replicate"), k, stride=1)
    return -(2.0 if owned else 1.0) * MASK_INIT * soft


class WarpGenerator(StyledGenerator):
    """style [B,S] (identity | mouth | pose), id_map [B,F+48,S/4,S/4] -> image [B,3,S,S] in [-1,1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.generator != "warp":
            raise ValueError("WarpGenerator needs ModelConfig.generator == 'warp'")
        self.cfg = cfg
        sd, f, m = cfg.style_dim + (OPEN_FEATS if cfg.warp_open else 0), cfg.warp_feat, cfg.warp_motion
        d0, d1, d2 = cfg.warp_dec
        if cfg.warp_open:  # mouth code [B,500] -> opening [B,1] (z-score)
            self.open_head = nn.Sequential(nn.Linear(cfg.mouth_dim, 64), nn.LeakyReLU(LRELU_SLOPE), nn.Linear(64, 1))
            s, cf, ci = cfg.size, cfg.size // OPEN_DIV_FLOW, cfg.size // OPEN_DIV_IMG
            # a mouth opening as a linear "blendshape": index 0 per unit above the average, 1 below
            self.open_flow = nn.Parameter(torch.zeros(2, 2, cf, cf))  # [2,2,S/16,S/16]
            self.open_mask = nn.Parameter(torch.zeros(2, 1, ci, ci))  # [2,1,S/8,S/8]
            self.open_rgb = nn.Parameter(torch.zeros(2, 3, ci, ci))  # [2,3,S/8,S/8]
            env = mouth_envelope(s)
            self.register_buffer("open_env", env, persistent=False)  # [1,1,S,S]
            self.register_buffer("open_env_q", F.avg_pool2d(env, PACK), persistent=False)  # [1,1,S/4,S/4]
        # motion net: S/4 -> S/16 plain, then style-driven back up to S/4
        self.down1 = nn.Conv2d(f, m, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(m, m, 3, stride=2, padding=1)
        self.motion = nn.ModuleList(
            [StyledConv(m, m, sd), StyledConv(m, m, sd, upsample=True), StyledConv(m, m, sd, upsample=True)]
        )
        self.flow_head = nn.Conv2d(m, 3, 3, padding=1)  # flow x, flow y, occlusion logit
        nn.init.zeros_(self.flow_head.weight)
        with torch.no_grad():
            self.flow_head.bias.copy_(torch.tensor([0.0, 0.0, MASK_INIT]))
        # decoder: S/4 -> S
        self.decoder = nn.ModuleList(
            [
                StyledConv(f, d0, sd),
                StyledConv(d0, d0, sd),
                StyledConv(d0, d1, sd, upsample=True),
                StyledConv(d1, d1, sd),
                StyledConv(d1, d2, sd, upsample=True),
                StyledConv(d2, d2, sd),
            ]
        )
        self.to_rgbs = nn.ModuleList([ToRGB(d0, sd), ToRGB(d1, sd), ToRGB(d2, sd)])
        self.mask_head = nn.Conv2d(d2, 1, 3, padding=1)  # blend logit: warped photo vs drawn image
        nn.init.zeros_(self.mask_head.weight)
        nn.init.constant_(self.mask_head.bias, MASK_INIT)
        self._register_noises(cfg)
        s, q = cfg.size, cfg.size // PACK
        self.register_buffer("mask_prior", mouth_prior(s, cfg.warp_mouth_mask), persistent=False)  # [1,1,S,S]
        self.register_buffer("grid_q", base_grid(q, q, torch.empty(0)), persistent=False)  # [1,S/4,S/4,2]
        self.register_buffer("grid_s", base_grid(s, s, torch.empty(0)), persistent=False)  # [1,S,S,2]

    def predict_opening(self, style: Tensor) -> Tensor:
        """style [B,S] -> the mouth opening its mouth code asks for [B,1] (z-score; warp_open only)."""
        c = self.cfg
        with torch.autocast(style.device.type, enabled=False):
            return self.open_head(style[:, c.id_dim : c.id_dim + c.mouth_dim].float())

    def full_style(self, style: Tensor, opening: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """style [B,S] -> (what the modulated convs see, the template weights [B,2,1,1] or None).

        Without warp_open: (style, None). With it: [B,S+OPEN_FEATS], the opening ``opening`` [B] if
        given (teacher forcing in training), else the predicted one; the template weights are the
        opening above and below the average (relu(o), relu(-o))."""
        if not self.cfg.warp_open:
            return style, None
        o = self.predict_opening(style) if opening is None else opening.reshape(-1, 1).float()
        feats = open_features(o, self.cfg.style_dim + OPEN_FEATS)  # [B,3]
        amount = feats[:, 1:] / (self.cfg.style_dim + OPEN_FEATS) ** 0.5  # [B,2]
        return torch.cat([style.float(), feats], dim=1).to(style.dtype), amount[:, :, None, None]

    @staticmethod
    def _template(amount: Tensor, bases: Tensor, gain: float, env: Tensor) -> Tensor:
        """amount [B,2,1,1], coarse bases [2,C,h,w], window env [1,1,H,W] -> the windowed weighted sum
        [B,C,H,W] (fp32) of the bases upsampled to H x W."""
        up = F.interpolate(bases.float(), size=env.shape[-2:], mode="bilinear", align_corners=False)  # [2,C,H,W]
        return gain * env * (amount[:, 0:1] * up[0:1] + amount[:, 1:2] * up[1:2])

    def motion_field(
        self, style: Tensor, feat: Tensor, noises: list[Tensor], form: str | None = None
    ) -> tuple[Tensor, Tensor]:
        """-> flow [B,2,S/4,S/4] (normalised units), occlusion [B,1,S/4,S/4] in (0,1)."""
        h1 = F.leaky_relu(self.down1(feat), LRELU_SLOPE)  # [B,M,S/8,S/8]
        h = F.leaky_relu(self.down2(h1), LRELU_SLOPE)  # [B,M,S/16,S/16]
        h = self.motion[0](h, style, noises[0], form)  # [B,M,S/16,S/16]
        h = self.motion[1](h, style, noises[1], form) + h1  # [B,M,S/8,S/8]
        h = self.motion[2](h, style, noises[2], form)  # [B,M,S/4,S/4]
        out = self.flow_head(h).float()  # [B,3,S/4,S/4]
        return out[:, :2], torch.sigmoid(out[:, 2:])

    def forward(
        self,
        style: Tensor,
        id_map: Tensor,
        noise: str | list[Tensor] = NoiseMode.STORED,
        taps: dict[str, Tensor] | None = None,
        form: str | None = None,
        opening: Tensor | None = None,
    ) -> Tensor:
        """``form``: the modulated-conv form of this call (None: each layer's own), as Generator.forward.
        ``opening`` [B]: the mouth opening to draw (warp_open; None: read off the mouth code)."""
        noises = self.noise_list(noise, style) if isinstance(noise, str) else noise
        style, amount = self.full_style(style, opening)  # [B,S(+OPEN_FEATS)], [B,2,1,1] | None
        f = self.cfg.warp_feat
        feat = id_map[:, :f]  # [B,F,S/4,S/4]
        photo = F.pixel_shuffle(id_map[:, f:].float(), PACK)  # [B,3,S,S]
        b = style.shape[0]
        if feat.shape[0] != b:
            feat, photo = feat.expand(b, -1, -1, -1), photo.expand(b, -1, -1, -1)
        flow, occ = self.motion_field(style, feat, noises, form)
        if amount is not None:
            flow = flow + self._template(amount, self.open_flow, OPEN_GAIN_FLOW, self.open_env_q)  # [B,2,S/4,S/4]
        x = warp(feat, flow, self.grid_q) * occ.to(feat.dtype)  # [B,F,S/4,S/4]
        skip = None
        for j in range(3):
            x = self.decoder[2 * j](x, style, noises[3 + 2 * j], form)  # level j: [B,D_j,S/4*2^j,...]
            x = self.decoder[2 * j + 1](x, style, noises[4 + 2 * j], form)
            skip = self.to_rgbs[j](x, style, skip, form)  # [B,3,...]
        skip = skip.float()
        logit = self.mask_head(x).float() + self.mask_prior  # [B,1,S,S]
        if amount is not None:
            skip = skip + self._template(amount, self.open_rgb, OPEN_GAIN_RGB, self.open_env)
            logit = logit + self._template(amount, self.open_mask, OPEN_GAIN_MASK, self.open_env)
        drawn = torch.tanh(skip)  # [B,3,S,S]
        big = F.interpolate(flow, scale_factor=PACK, mode="bilinear", align_corners=False)  # [B,2,S,S]
        warped = warp(photo, big, self.grid_s)  # [B,3,S,S]
        mask = torch.sigmoid(logit)  # [B,1,S,S]
        if taps is not None:
            taps.update(flow=flow, occlusion=occ, drawn=drawn, warped=warped, mask=mask)
        return mask * warped + (1 - mask) * drawn


class FastWarpGenerator(nn.Module):
    """Inference twin of :class:`WarpGenerator` with the interface of ``models.fast_generator.FastGenerator``:
    ``identity_base(id0)`` once per identity, ``forward(base, var, id_map, noise)`` per batch.

    ``form``: "static" (shared weights, pre-packable; torch-fast) or a fused form of
    ``modconv.FUSED_FORMS`` (the fused modulated-conv op on every plain 3x3 StyledConv; torch-cuda).
    ``dtype`` bf16/fp16: autocast storage (modulation, demodulation, flow, warps and the blend stay
    fp32). No copy: the twin holds the caller's generator, passes ``form`` per call and runs without
    autograd, so that module's weights, form and mode stay as they are (it has no mode-dependent
    layers). ``.to()`` / ``.eval()`` on the twin reach that module: the runners call neither.
    """

    def __init__(self, gen: WarpGenerator, dtype: torch.dtype = torch.bfloat16, form: str = "static"):
        super().__init__()
        self.gen = gen
        self.dtype = dtype
        self.form = form

    def identity_base(self, id0: Tensor) -> Tensor:  # [1|B,id_dim]: the identity part of the style
        return id0.float()

    def ops(self) -> list[str]:
        """Which op runs each modulated conv, in execution order (for tests and reports)."""
        impl = self.form.split("-", 1)[1] if self.form in FUSED_FORMS else None
        out = []
        for m in self.gen.modules():
            if isinstance(m, StyledConv):
                fused = impl is not None and not m.conv.upsample
                out.append(
                    f"fused_modconv[{impl}]" if fused else ("conv_transpose2d+blur" if m.conv.upsample else "conv2d")
                )
            elif isinstance(m, ToRGB):
                out.append("conv2d_1x1")
        return out

    @torch.no_grad()
    def forward(self, base: Tensor, var: Tensor, id_map: Tensor, noise: str = NoiseMode.STORED) -> Tensor:
        style = torch.cat([base.float().expand(var.shape[0], -1), var.float()], dim=1)  # [B, id | mouth | pose]
        with torch.autocast(id_map.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.gen(style, id_map, noise, form=self.form).float()  # [B,3,S,S]
