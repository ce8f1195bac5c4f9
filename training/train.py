"""Train PC-AVS (paper Sec. 3-4) in three stages; one small loop for all of them.

    python -m training.train --stage identity --data runs/data/train --out runs/x/identity --steps 500
    python -m training.train --stage content  --data runs/data/train --out runs/x/content \\
        --init runs/x/identity/last.pt
    python -m training.train --stage joint    --data runs/data/train --out runs/x/joint \\
        --init runs/x/content/last.pt
    torchrun --nproc_per_node 8 -m training.train --config my.yaml     # DDP (nccl on GPU, gloo on CPU)

Stages:

1. ``identity``: the identity encoder V learns to classify the identity of a reference frame.
2. ``content``: the non-identity encoder E (through a visual content head) and the audio encoder
   A meet in one speech-content space: InfoNCE with cosine similarity in both directions
   (visual->audio and audio->visual) against N negatives from other clips and time shifts.
3. ``joint``: G, the pose mapping and all encoders reconstruct the target frame from the identity
   of another frame of the clip, the pose of the augmented target and the target's audio:
   hinge GAN with a multi-scale discriminator, feature matching, VGG perceptual, pixel L1, plus
   the content and identity losses (weights ``w_*``).

A run folder holds ``config.yaml`` (resolved config + git revision), ``last.pt`` (rewritten every
``ckpt_every`` steps / ``ckpt_minutes`` and on Ctrl-C or SIGTERM), ``stats.jsonl``, ``loss.png`` and
``samples/step_*.png`` (reference | generated | target). Rerunning the same command resumes from
``last.pt``; the batches and noise of step k depend only on (seed, k, rank), and the optimiser,
model and RNG states are restored, so a resumed run continues the same schedule bit for bit.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rt_engine.cli import cli_main
from rt_engine.config import ModelConfig, mouth_box
from rt_engine.errors import ConfigError, RtEngineError
from rt_engine.inputs import audio as audio_in
from rt_engine.models.pcavs import PCAVS
from training.config import TrainConfig, git_revision, resolve, save_run_config
from training.data import AugmentParams, Batcher, ClipStore, read_holdout
from training.nets import (
    Heads,
    MultiScaleDiscriminator,
    PerceptualLoss,
    SyncExpert,
    d_hinge_loss,
    feature_matching_loss,
    g_hinge_loss,
    info_nce,
    load_vgg19,
)

log = logging.getLogger("training")


OPEN_IMG_SCALE = 10.0  # image head target: 10 x (inner-lip gap / eye width), about 0-3


def mouth_region(img: Tensor) -> Tensor:
    """[B,3,S,S] -> the MOUTH_BOX part, scaled to the image size S."""
    y0, y1, x0, x1 = mouth_box(img.shape[-1])
    return img[..., y0:y1, x0:x1]


def _other_generator(a, b) -> bool:
    """True when model configs ``a`` and ``b`` differ in the generator variant only (same encoders)."""
    gen = ("name", "generator", "gen_channels", "id_map_channels")  # and every warp_* field
    da, db = a.to_dict(), b.to_dict()
    return a.generator != b.generator and all(da[k] == db[k] for k in da if k not in gen and not k.startswith("warp_"))


def _gains_opening(a, b) -> bool:
    """True when warp model config ``b`` is ``a`` plus the mouth-opening channel (model.warp_open)."""
    da, db = a.to_dict(), b.to_dict()
    same = all(da[k] == db[k] for k in da if k not in ("name", "warp_open"))
    return same and a.generator == "warp" and b.warp_open and not a.warp_open


@torch.no_grad()
def labelled_mouth_codes(model: PCAVS, store: ClipStore, device: torch.device) -> tuple[Tensor, Tensor, np.ndarray]:
    """Every labelled frame of the speech clips of ``store`` -> (mouth codes [N,500], z-scored openings
    [N], identity index [N]), through the model's audio encoder in eval mode (batch-norm statistics
    stay as they are; the caller restores the mode it needs)."""
    model.eval()
    codes, ys, who = [], [], []
    for c in store.clips:
        if c.mel is None or c.opening is None:
            continue
        v = c.valid[np.isfinite(c.opening[c.valid])]
        for k in range(0, len(v), 256):
            w = torch.from_numpy(audio_in.mel_windows(c.mel, v[k : k + 256])).float().to(device)
            w = w if w.ndim == 4 else w[:, None]  # [n,1,80,20]
            codes.append(model.encode_mouth(w).float())
        ys.append(torch.from_numpy(c.opening[v]).float())
        who.append(np.full(len(v), c.label))
    if not codes:
        raise ConfigError(f"no mouth-opening labels in {store.root}: run python -m training.mouth_labels {store.root}")
    return torch.cat(codes), torch.cat(ys).to(device), np.concatenate(who)


def widen_for_opening(sd: dict[str, Tensor], own: dict[str, Tensor], mcfg) -> dict[str, Tensor]:
    """A warp model's state dict -> the same model with warp_open: each modulation weight [Cin,S] gains
    OPEN_FEATS zero columns and is rescaled by sqrt((S+k)/S), so EqualLinear's product is unchanged and
    the widened model draws the same frames; the opening head keeps its fresh initialisation."""
    from rt_engine.models.warp import OPEN_FEATS

    s = mcfg.style_dim
    out = dict(own)
    for k, v in sd.items():
        if k not in own:
            raise RtEngineError(f"unexpected weight {k} for a warp_open model")
        if own[k].shape != v.shape:
            if not k.endswith("modulation.weight") or tuple(own[k].shape) != (v.shape[0], s + OPEN_FEATS):
                raise RtEngineError(f"{k}: {tuple(v.shape)} does not widen to {tuple(own[k].shape)}")
            w = torch.zeros_like(own[k])
            w[:, :s] = v.to(w.dtype) * ((s + OPEN_FEATS) / s) ** 0.5
            v = w
        out[k] = v.to(own[k].dtype)
    return out


# ------------------------------------------------------------------------------------ distributed
def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE set) joins the process group."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def all_reduce_mean(tensors: list[Tensor], world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t)
            t.div_(world)


def sync_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks (what DDP does, written out: one flat all-reduce)."""
    if world <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean([flat], world)
    o = 0
    for g in grads:
        g.copy_(flat[o : o + g.numel()].view_as(g))
        o += g.numel()


def broadcast_params(modules: list[torch.nn.Module], world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        for m in modules:
            for t in m.state_dict().values():
                dist.broadcast(t, 0)


def params_checksum(modules: list[torch.nn.Module]) -> float:
    return float(sum(p.detach().double().sum() for m in modules for p in m.parameters()))


# ------------------------------------------------------------------------------------ trainer
@dataclass
class JointPass:
    """One joint-stage forward pass: what the generator's loss terms read (B samples, S output size)."""

    b: dict[str, Tensor]  # the batch
    target: Tensor  # [B,3,S,S] the target frame at the model's size
    fake: Tensor  # [B,3,S,S] float32, generated
    speech: Tensor  # [B] bool; False: video-only sample, its mel is someone else's: mouth not judged
    any_speech: bool
    all_speech: bool
    judged: Tensor | None  # [B,1,S,S] 1 where a pixel is judged: all but the video-only samples' mouth boxes;
    # None when every sample is speech
    id0: Tensor  # [B,I] identity feature of the reference frame
    audio: Tensor  # [B,D] audio content
    noid: Tensor | None  # [B,F] visual content of the augmented target (sees the mouth)
    neg_noid: Tensor | None  # [B,N,F] negatives' visual content (w_content > 0)
    neg_a: Tensor | None  # [B,N,D] negatives' audio content (w_content > 0)
    open_g: Tensor | None  # [] loss of the generator's opening head (warp_open)
    d_out: tuple[list[list[Tensor]], list[list[Tensor]]] | None = None  # cached (D(target), D(fake))
    open_img: tuple[Tensor, Tensor] | None = None  # cached image-opening losses (real, fake) [], []


@dataclass(frozen=True)
class LossTerm:
    """One term of the joint generator loss: ``logs[name] = fn(trainer, pass)``, weighted into the total."""

    name: str  # log key
    weight: str | float  # a TrainConfig attribute (the term is skipped while it is 0) or a fixed weight
    fn: Callable[[Trainer, JointPass], Tensor | None]  # -> the term [], None: it does not apply to this batch


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.cfg = cfg
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        self.git = git_revision()  # the code this process runs; a later commit must not relabel its checkpoints
        self.out = Path(cfg.out)
        self.mcfg = cfg.model_config()
        need_audio = cfg.stage != "identity"
        self.store = ClipStore(cfg.data, read_holdout(cfg.holdout), need_audio=need_audio and cfg.video_only_frac == 0)
        wants = cfg.w_open > 0 or cfg.w_open_img > 0 or (cfg.stage == "joint" and self.mcfg.has_opening)
        if wants and not self.store.has_opening:
            raise ConfigError(
                f"w_open / w_open_img / model.warp_open need mouth-opening labels in {cfg.data}: run "
                f"python -m training.mouth_labels {cfg.data}"
            )
        aug = AugmentParams(cfg.color_strength, cfg.persp_margin, cfg.persp_shift, cfg.crop_min)
        self.batcher = Batcher(
            self.store,
            cfg.batch_size,
            cfg.num_negatives,
            cfg.min_shift,
            cfg.seed,
            rank,
            aug,
            negatives=need_audio and (cfg.stage == "content" or cfg.w_content > 0 or cfg.w_sync > 0),
            same_frac=cfg.same_clip_negatives,
            video_only_frac=cfg.video_only_frac,
            look_p=cfg.look_p,
            look_strength=cfg.look_strength,
        )
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.model = PCAVS(self.mcfg).to(self.device)
        self.model.generator.set_form("static")  # equal maths, dense convs: faster for training batches
        self.heads = Heads(self.mcfg, self.store.num_identities).to(self.device)
        self.D = (
            MultiScaleDiscriminator(cfg.d_scales, cfg.d_channels, cfg.d_layers).to(self.device)
            if cfg.stage == "joint"
            else None
        )
        self.vgg = None
        if cfg.stage == "joint" and cfg.w_vgg > 0:
            vgg = load_vgg19(cfg.vgg_weights)
            self.vgg = PerceptualLoss(vgg).to(self.device) if vgg is not None else None
        self.init_stages: list | None = None  # a released init file's stage history, as it is now
        if cfg.init:
            self.load_networks(cfg.init)
        broadcast_params([self.model, self.heads] + ([self.D] if self.D is not None else []), world)
        # frozen lip-sync expert: the content encoders as they are at the start (after --init)
        self.expert = SyncExpert(self.model, self.heads) if cfg.stage == "joint" and cfg.w_sync > 0 else None
        self.ema = None  # moving average of the model weights (cfg.ema), starting at the initial weights
        if cfg.ema > 0:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.g_params = self._trainable()
        self.opt_g = torch.optim.Adam(self.g_params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.opt_d = (
            torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
            if self.D is not None
            else None
        )
        self.step = 0
        self.elapsed = 0.0  # training wall seconds over all sessions
        self.stop_requested = False

    # -------------------------------------------------------------- parameters per stage
    def _trainable(self) -> list[torch.nn.Parameter]:
        m, h, stage = self.model, self.heads, self.cfg.stage
        if stage == "identity":
            mods = [m.identity_encoder, h.id_classifier]
        elif stage == "content":
            mods = [m.pose_encoder.model, m.audio_encoder, h.visual_content, h.audio_opening]
        elif self.cfg.freeze_encoders:
            mods = [m.generator, h] + (
                [m.identity_encoder.appearance]
                if hasattr(m.identity_encoder, "appearance")
                else [m.identity_encoder.conv1x1]
            )
        else:
            mods = [m, h]
        for p in list(m.parameters()) + list(h.parameters()):
            p.requires_grad_(False)
        params: list[torch.nn.Parameter] = []
        for mod in mods:
            for p in mod.parameters():
                p.requires_grad_(True)
                params.append(p)
        self._train_mods = mods
        return params

    def _set_modes(self) -> None:
        self.model.eval()
        self.heads.eval()
        for mod in self._train_mods:
            mod.train()
        if self.D is not None:
            self.D.train()

    def _autocast(self):
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # -------------------------------------------------------------- losses
    def _content_pass(self, b: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Visual and audio content of the positives and their negatives, each modality in ONE forward
        pass. Separate passes would let batch-norm statistics (train mode) tell a positive from a
        negative, and InfoNCE then falls without learning anything about lips.
        -> noid [B,F], audio [B,D], neg_noid [B,N,F], neg_audio [B,N,D]"""
        m = self.model
        bs, n = b["neg_mel"].shape[:2]
        noid = m.pose_encoder.noid_feature(torch.cat([b["aug"], b["neg_aug"].flatten(0, 1)]))  # [B+BN,F]
        audio = m.audio_encoder(torch.cat([b["mel"], b["neg_mel"].flatten(0, 1)]))  # [B+BN,D]
        return noid[:bs], audio[:bs], noid[bs:].reshape(bs, n, -1), audio[bs:].reshape(bs, n, -1)

    def _opening_loss(self, audio: Tensor, b: dict[str, Tensor]) -> Tensor:
        """Smooth L1 of the predicted mouth opening (from the audio content [B,D]) against the labels
        [B] (z-scored within the clip; NaN labels are skipped)."""
        y = b["opening"]
        ok = torch.isfinite(y)
        if not bool(ok.any()):
            return torch.zeros((), device=y.device)
        pred = self.heads.audio_opening(audio.float()).squeeze(1)  # [B]
        return F.smooth_l1_loss(pred[ok], y[ok])

    def _generator_opening(self, style: Tensor, b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """warp_open -> (the opening [B] the generator draws, the opening head's loss []).

        The generator's opening head learns the labels (z-scored, smooth L1; its only gradient). A share
        ``open_teacher`` of the labelled samples gets the measured opening, the rest the head's own
        (detached). Video-only samples have no label: they get the head's."""
        pred = self.model.generator.predict_opening(style).squeeze(1)  # [B]
        y = b.get("opening")  # [B] z-scored, NaN = no label
        if y is None:
            return pred.detach(), torch.zeros((), device=style.device)
        ok = torch.isfinite(y)
        loss = F.smooth_l1_loss(pred[ok], y[ok]) if bool(ok.any()) else torch.zeros((), device=y.device)
        g = torch.Generator().manual_seed(int(self.step) * 7919 + self.rank)  # resumable draws
        teach = ok & (torch.rand(y.shape, generator=g) < self.cfg.open_teacher).to(y.device)
        return torch.where(teach, torch.nan_to_num(y), pred.detach()), loss

    def _image_opening_losses(self, fake: Tensor, target: Tensor, b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(head's loss on the real target's mouth box, generated frame's loss under the frozen head).
        The first trains the head only (the target carries no gradient); the second reaches the
        generator only (the head is frozen for it, as D is for the GAN term)."""
        raw = b["opening_raw"]  # [B] absolute: what an image shows, whoever speaks
        ok = torch.isfinite(raw)
        if not bool(ok.any()):
            z = torch.zeros((), device=raw.device)
            return z, z
        real = self._image_opening_loss(target.detach()[ok], raw[ok])
        head = self.heads.image_opening
        head.requires_grad_(False)
        gen = self._image_opening_loss(fake[ok], raw[ok])
        head.requires_grad_(True)
        return real, gen

    def _image_opening_loss(self, img: Tensor, raw: Tensor) -> Tensor:
        """Smooth L1 of the image head on the mouth box of ``img`` [B,3,S,S] against OPEN_IMG_SCALE x
        the measured opening ``raw`` [B] (all finite)."""
        pred = self.heads.image_opening(mouth_region(img)).squeeze(1)  # [B]
        return F.smooth_l1_loss(pred, OPEN_IMG_SCALE * raw)

    def warm_up_image_opening(self, steps: int, batch: int = 32) -> float:
        """Train the image mouth-opening head alone on real frames (mouth box of the network crop ->
        OPEN_IMG_SCALE x measured opening, as in the joint step). Same data on every rank (seeded by
        ``seed`` only), so ranks stay equal.
        Returns the mean loss of the last 20 steps."""
        from rt_engine.inputs.image import official_crop, to_tensor

        head = self.heads.image_opening
        opt = torch.optim.Adam(head.parameters(), lr=1e-3)
        rng = np.random.default_rng([self.cfg.seed, 7])
        clips = [c for c in self.store.clips if c.opening_raw is not None]
        losses = []
        for _ in range(steps):
            imgs, ys = [], []
            while len(imgs) < batch:
                c = clips[int(rng.integers(len(clips)))]
                i = int(rng.integers(len(c.frames)))
                if np.isfinite(c.opening_raw[i]):
                    imgs.append(official_crop(c.frames[i]))
                    ys.append(c.opening_raw[i])
            x = self._target({"target": to_tensor(np.stack(imgs)).to(self.device)})  # [B,3,S,S]
            loss = self._image_opening_loss(x, torch.tensor(ys, device=self.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        tail = float(np.mean(losses[-20:]))
        log.info(
            "image mouth-opening head: %d warm-up steps, loss %.3f -> %.3f", steps, float(np.mean(losses[:20])), tail
        )
        return tail

    def warm_up_generator_opening(self, steps: int, batch: int = 256) -> float:
        """warp_open: fit the generator's opening head (mouth code -> opening) on every labelled frame
        before the joint run, with the encoders as they are (frozen in this recipe). Logs the pooled
        correlation on a fifth of the identities held out, then fits on all. Same data on every rank.
        Returns that held-out correlation."""
        head = self.model.generator.open_head
        x, y, who = labelled_mouth_codes(self.model, self.store, self.device)  # [N,500], [N], [N]
        ids = np.unique(who)
        test = torch.from_numpy(np.isin(who, ids[:: max(1, min(5, len(ids)))])).to(self.device)
        start = {k: v.clone() for k, v in head.state_dict().items()}
        rng = torch.Generator().manual_seed(self.cfg.seed)

        def fit(mask: Tensor) -> None:
            head.load_state_dict(start)
            opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
            idx = torch.nonzero(mask).squeeze(1)
            for _ in range(steps):
                pick = idx[torch.randint(len(idx), (batch,), generator=rng).to(idx.device)]
                loss = F.smooth_l1_loss(head(x[pick]).squeeze(1), y[pick])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        r = float("nan")
        if bool(test.any()) and bool((~test).any()):
            fit(~test)
            with torch.no_grad():
                p = head(x[test]).squeeze(1)
            r = float(torch.corrcoef(torch.stack([p, y[test]]))[0, 1])
        fit(torch.ones_like(test))
        with torch.no_grad():
            std = float(head(x).std())
        log.info(
            "opening head: %d warm-up steps on %d labelled frames; held-out identities r %.3f; output std %.2f",
            steps,
            len(y),
            r,
            std,
        )
        return r

    def _content_loss(self, noid: Tensor, audio: Tensor, neg_noid: Tensor, neg_a: Tensor) -> Tensor:
        """Symmetric InfoNCE between visual content (from the non-identity feature) and audio content."""
        v = self.heads.visual_content(noid)  # [B,D]
        neg_v = self.heads.visual_content(neg_noid)  # [B,N,D]
        t = self.cfg.temperature
        return 0.5 * (info_nce(v, audio, neg_a, t) + info_nce(audio, v, neg_v, t))

    def train_step(self, step: int) -> tuple[list[str], Tensor]:
        """One optimisation step -> (term names, their values [K] float64, averaged over ranks)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + self.rank)  # noise of this step
        b = {k: v.to(self.device) for k, v in self.batcher.batch(0 if cfg.overfit_one_batch else step).items()}
        self._set_modes()
        logs: dict[str, Tensor] = {}  # every loss term, detached; read once per logging interval
        m = self.model
        if cfg.stage == "identity":
            with self._autocast():
                id0, _ = m.encode_identity(torch.cat([b["ref"], b["target"]]))
                logits = self.heads.id_classifier(id0)
            loss = F.cross_entropy(logits.float(), torch.cat([b["label"], b["label"]]))
            logs["id"] = loss.detach()
            logs["id_acc"] = (logits.argmax(1) == torch.cat([b["label"], b["label"]])).float().mean().detach()
        elif cfg.stage == "content":
            with self._autocast():
                noid, audio, neg_noid, neg_a = self._content_pass(b)
                loss = self._content_loss(noid, audio, neg_noid, neg_a)
            logs["content"] = loss.detach()
            if cfg.w_open > 0:
                logs["open"] = (op := self._opening_loss(audio, b)).detach()
                loss = loss + cfg.w_open * op
        else:
            loss, fake = self._joint_g_loss(b, logs)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(self.g_params, self.world)
        self.opt_g.step()
        self._update_ema()
        if cfg.stage == "joint":
            self._d_step(b, fake, logs)
            self._last = (b, fake.detach())
        logs["loss"] = loss.detach()
        keys = sorted(logs)
        # one tensor of every term, left on the device: read once per logging interval, not per term per step
        vals = torch.stack([logs[k].double().reshape(()) for k in keys])
        all_reduce_mean([vals], self.world)
        return keys, vals

    def _target(self, b: dict[str, Tensor]) -> Tensor:
        t = b["target"]  # [B,3,224,224]
        s = self.mcfg.size
        return (
            t
            if t.shape[-1] == s
            else F.interpolate(t, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        )

    def _joint_pass(self, b: dict[str, Tensor]) -> JointPass:
        """The joint stage's forward: identity, content, pose, style, the optional opening channel and
        the generated frame (random noise: the draws follow the step's seed)."""
        cfg, m = self.cfg, self.model
        target = self._target(b)  # [B,3,S,S]
        neg_noid = neg_a = None
        with self._autocast():
            id0, id1 = m.encode_identity(b["ref"])  # identity of another frame of the clip
            noid = None  # [B,F] visual content of the augmented target (sees the mouth)
            if cfg.w_content > 0:
                noid, audio, neg_noid, neg_a = self._content_pass(b)
            else:
                audio = m.audio_encoder(b["mel"])  # [B,512]
                if not self.mcfg.pose_mouth_mask:
                    noid = m.pose_encoder.noid_feature(b["aug"])
            if self.mcfg.pose_mouth_mask:  # pose from the augmented target with its mouth blanked
                pose = m.pose_encoder(b["aug"])  # [B,12]
            else:  # official: one feature for both
                pose = m.pose_encoder.headpose(noid)  # [B,12]
            style = m.make_style(id0, m.pose_encoder.mouth(audio), pose)
            opening, open_g = self._generator_opening(style, b) if self.mcfg.has_opening else (None, None)
            fake = m.generate(style, id1, noise="random", opening=opening)  # [B,3,S,S]
        fake = fake.float()
        speech = b["speech"]  # [B]
        all_speech = bool(speech.all())
        judged = None
        if not all_speech:
            judged = torch.ones_like(fake[:, :1])  # [B,1,S,S]
            y0, y1, x0, x1 = mouth_box(fake.shape[-1])
            judged[~speech, :, y0:y1, x0:x1] = 0.0
        return JointPass(
            b, target, fake, speech, bool(speech.any()), all_speech, judged, id0, audio, noid, neg_noid, neg_a, open_g
        )

    def _joint_g_loss(self, b: dict[str, Tensor], logs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The generator's loss of the joint stage, term by term from JOINT_TERMS (each logged detached)
        -> (total [], generated frame [B,3,S,S])."""
        p = self._joint_pass(b)
        total = torch.zeros((), device=self.device)
        for term in self.JOINT_TERMS:
            w = getattr(self.cfg, term.weight) if isinstance(term.weight, str) else term.weight
            if not w > 0:
                continue
            value = term.fn(self, p)
            if value is None:
                continue
            logs[term.name] = value.detach()
            total = total + w * value
        return total, p.fake

    def _d_outputs(self, p: JointPass) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
        """(D(target), D(fake)): one discriminator pass shared by the GAN and feature-matching terms,
        with D frozen (the gradient reaches the generator only)."""
        if p.d_out is None:
            self.D.requires_grad_(False)
            with self._autocast():
                d_fake = self.D(p.fake)
                with torch.no_grad():
                    d_real = self.D(p.target)
            self.D.requires_grad_(True)
            p.d_out = (d_real, d_fake)
        return p.d_out

    def _open_img(self, p: JointPass) -> tuple[Tensor, Tensor]:
        """The two image-opening losses (real target, generated frame), from one call."""
        if p.open_img is None:
            p.open_img = self._image_opening_losses(p.fake, p.target, p.b)
        return p.open_img

    # one method per term of JOINT_TERMS: (trainer, pass) -> the term [], or None where it does not apply
    def _term_open_g(self, p: JointPass) -> Tensor | None:
        return p.open_g  # the opening head's regression (its only gradient)

    def _term_l1(self, p: JointPass) -> Tensor:
        if p.judged is None:
            return F.l1_loss(p.fake, p.target)
        # mean absolute error over the judged pixels
        return ((p.fake - p.target).abs() * p.judged).sum() / (p.judged.sum() * p.fake.shape[1])

    def _term_mouth(self, p: JointPass) -> Tensor | None:
        if not p.any_speech:
            return None
        return F.l1_loss(mouth_region(p.fake[p.speech]), mouth_region(p.target[p.speech]))

    def _term_g_gan(self, p: JointPass) -> Tensor | None:
        if not self._gan_on():
            return None
        return g_hinge_loss(self._d_outputs(p)[1])

    def _term_fm(self, p: JointPass) -> Tensor | None:
        # speech samples only: else it pulls a video-only mouth to its target too
        if not self._gan_on() or not p.any_speech:
            return None
        d_real, d_fake = self._d_outputs(p)
        if not p.all_speech:
            d_real = [[f[p.speech] for f in fs] for fs in d_real]
            d_fake = [[f[p.speech] for f in fs] for fs in d_fake]
        return feature_matching_loss(d_real, d_fake)

    def _term_vgg(self, p: JointPass) -> Tensor | None:
        if self.vgg is None:
            return None
        # video-only samples: their mouth box shows the target's, so it adds nothing
        shown = p.fake if p.judged is None else p.fake * p.judged + p.target * (1 - p.judged)
        with self._autocast():
            return self.vgg(shown, p.target)

    def _term_open(self, p: JointPass) -> Tensor:
        return self._opening_loss(p.audio, p.b)

    def _term_open_real(self, p: JointPass) -> Tensor | None:
        return self._open_img(p)[0] if self.cfg.w_open_img > 0 else None  # trains the image head only

    def _term_open_fake(self, p: JointPass) -> Tensor:
        return self._open_img(p)[1]  # reaches the generator only

    def _term_sync(self, p: JointPass) -> Tensor | None:
        if self.expert is None:
            return None
        with self._autocast():
            return self.expert.loss(p.fake, p.b["mel"], p.b["neg_mel"], self.cfg.temperature)

    def _term_content(self, p: JointPass) -> Tensor:
        with self._autocast():
            return self._content_loss(p.noid, p.audio, p.neg_noid, p.neg_a)

    def _term_id(self, p: JointPass) -> Tensor:
        logits = self.heads.id_classifier(p.id0.float())
        return F.cross_entropy(logits, p.b["label"])

    # the joint generator loss, in this order (the order of the random draws and of the sum)
    JOINT_TERMS: tuple[LossTerm, ...] = (
        LossTerm("open_g", 1.0, _term_open_g),
        LossTerm("l1", "w_l1", _term_l1),
        LossTerm("mouth", "w_mouth", _term_mouth),
        LossTerm("g_gan", "w_gan", _term_g_gan),
        LossTerm("fm", "w_fm", _term_fm),
        LossTerm("vgg", "w_vgg", _term_vgg),
        LossTerm("open", "w_open", _term_open),
        LossTerm("open_real", 1.0, _term_open_real),
        LossTerm("open_fake", "w_open_img", _term_open_fake),
        LossTerm("sync", "w_sync", _term_sync),
        LossTerm("content", "w_content", _term_content),
        LossTerm("id", "w_id", _term_id),
    )

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights; buffers (batch-norm statistics) are copied."""
        if self.ema is None:
            return
        for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
            e.lerp_(p, 1.0 - self.cfg.ema)
        for e, b in zip(self.ema.buffers(), self.model.buffers(), strict=True):
            e.copy_(b)

    def _gan_on(self) -> bool:
        return (self.cfg.w_gan > 0 or self.cfg.w_fm > 0) and self.step >= self.cfg.gan_start

    def _d_step(self, b: dict[str, Tensor], fake: Tensor, logs: dict[str, Tensor]) -> None:
        if not self._gan_on():
            return
        with self._autocast():
            d_real = self.D(self._target(b))
            d_fake = self.D(fake.detach())
        loss_d = d_hinge_loss(d_real, d_fake)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        sync_grads(list(self.D.parameters()), self.world)
        self.opt_d.step()
        logs["d"] = loss_d.detach()

    # -------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "elapsed": self.elapsed,
            "config": self.cfg.to_dict(),
            "model_config": self.mcfg.to_dict(),
            "identities": self.store.identities,
            "git": self.git,
            "model": self.model.state_dict(),
            "heads": self.heads.state_dict(),
            "model_ema": self.ema.state_dict() if self.ema is not None else None,
            "ema_decay": self.cfg.ema,
            "D": self.D.state_dict() if self.D is not None else None,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict() if self.opt_d else None,
            "expert": self.expert.state_dict() if self.expert is not None else None,
            "init_stages": self.init_stages,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def save(self, path: Path | None = None) -> Path | None:
        if self.rank != 0:
            return None
        path = path or self.out / "last.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)
        log.info("checkpoint %s (step %d)", path, self.step)
        return path

    def resume(self, path: Path) -> None:
        ck = torch.load(path, map_location=self.device, weights_only=False)
        if ck["config"]["stage"] != self.cfg.stage:
            raise RtEngineError(
                f"{path}: checkpoint of stage {ck['config']['stage']!r}, this run is "
                f"{self.cfg.stage!r}; use another --out"
            )
        changed = sorted(
            k for k, v in ck["config"].items() if k not in ("steps", "out") and self.cfg.to_dict().get(k) != v
        )
        if changed:
            log.warning("resuming with changed config fields %s: the schedule is no longer the same", changed)
        self.model.load_state_dict(ck["model"])
        if self.ema is not None:
            if ck.get("model_ema") is None:
                raise RtEngineError(f"{path}: no weight average in the checkpoint; resume with --ema 0")
            self.ema.load_state_dict(ck["model_ema"])
        missing, unexpected = self.heads.load_state_dict(ck["heads"], strict=False)
        if unexpected:
            raise RtEngineError(f"{path}: heads this code does not have: {unexpected[:3]}")
        if missing:  # a head added to the code after this checkpoint was written starts fresh
            log.warning(
                "resume: heads not in the checkpoint start fresh: %s", sorted({k.split(".")[0] for k in missing})
            )
        if self.D is not None and ck["D"] is not None:
            self.D.load_state_dict(ck["D"])
        if ck.get("init_stages") is not None:
            self.init_stages = ck["init_stages"]  # the init file may have been overwritten since the start
        if self.expert is not None and ck.get("expert") is not None:
            self.expert.load_state_dict(ck["expert"])
        self.opt_g.load_state_dict(ck["opt_g"])
        if self.opt_d is not None and ck["opt_d"] is not None:
            self.opt_d.load_state_dict(ck["opt_d"])
        torch.set_rng_state(ck["rng"]["torch"])
        np.random.set_state(ck["rng"]["numpy"])
        random.setstate(ck["rng"]["python"])
        self.step, self.elapsed = int(ck["step"]), float(ck["elapsed"])
        log.info("resumed %s at step %d", path, self.step)

    def load_networks(self, path: str) -> None:
        """Start from another run's networks (an earlier stage): model weights, and heads whose shapes fit.
        A ``.safetensors`` model (e.g. the bundled one) gives the model weights only: fine-tuning it
        starts with new heads, discriminator and optimiser state."""
        if str(path).endswith(".safetensors"):
            from rt_engine.models.checkpoint import load_single, read_single_meta

            meta = read_single_meta(path)
            file_cfg = ModelConfig.from_dict(meta["config"])
            # fp32; CheckpointError if its config is neither this run's model nor its other generator variant
            own_cfg = _other_generator(file_cfg, self.mcfg) or _gains_opening(file_cfg, self.mcfg)
            src = load_single(path, None if own_cfg else self.mcfg)
            self._take_model(src.state_dict(), file_cfg, path)
            self.init_stages = meta.get("provenance", {}).get("stages", [])
            log.info("initialised the model from %s (heads, discriminator and optimiser start fresh)", path)
            return
        ck = torch.load(path, map_location=self.device, weights_only=False)
        self._take_model(ck["model"], ModelConfig.from_dict(ck["model_config"]), path)
        own = self.heads.state_dict()
        ok = {k: v for k, v in ck["heads"].items() if k in own and own[k].shape == v.shape}
        if ck.get("identities") != self.store.identities:
            ok = {k: v for k, v in ok.items() if not k.startswith("id_classifier")}
        self.heads.load_state_dict({**own, **ok})
        log.info("initialised networks from %s (stage %s, step %d)", path, ck["config"]["stage"], ck["step"])

    def _take_model(self, sd: dict[str, Tensor], file_cfg: ModelConfig, path: str) -> None:
        """This run's model from a state dict of ``file_cfg``: every weight, or only the encoders when
        ``file_cfg`` has the other generator variant."""
        if _other_generator(file_cfg, self.mcfg):
            self._load_encoders(sd, path)
        elif _gains_opening(file_cfg, self.mcfg):
            self.model.load_state_dict(widen_for_opening(sd, self.model.state_dict(), self.mcfg))
            log.info("%s has no mouth-opening channel: its new style columns and opening head start at zero", path)
        else:
            self.model.load_state_dict(sd)

    def _load_encoders(self, sd: dict[str, Tensor], path: str) -> None:
        """Start a model of another generator variant from ``sd``: every encoder weight (V, E, A) is
        taken; the generator and the identity map's head start fresh."""
        own = self.model.state_dict()
        fresh = ("generator.", "identity_encoder.conv1x1.", "identity_encoder.appearance.")
        enc = {k: v for k, v in sd.items() if not k.startswith(fresh)}
        bad = sorted(k for k, v in enc.items() if k not in own or own[k].shape != v.shape)
        if bad:
            raise RtEngineError(f"{path}: encoder weights do not fit this model: {bad[:3]}")
        missing = sorted(k for k in own if not k.startswith(fresh) and k not in enc)
        if missing:
            raise RtEngineError(f"{path}: encoder weights missing: {missing[:3]}")
        self.model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in enc.items()}})
        log.info(
            "%s has another generator: took its encoders, the %s generator starts fresh", path, self.mcfg.generator
        )

    # -------------------------------------------------------------- outputs
    def write_samples(self) -> None:
        if self.rank != 0 or self.cfg.stage != "joint" or not hasattr(self, "_last"):
            return
        import cv2

        from rt_engine.inputs.image import to_uint8

        b, fake = self._last
        s = self.mcfg.size
        k = min(4, fake.shape[0])
        ref = F.interpolate(b["ref"][:k], size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        rows = [np.concatenate(list(to_uint8(x)), axis=1) for x in (ref, fake[:k], self._target(b)[:k])]
        grid = np.concatenate(
            [np.concatenate([r[:, i * s : (i + 1) * s] for r in rows], axis=1) for i in range(k)], axis=0
        )  # one row per sample: reference | generated | target
        d = self.out / "samples"
        d.mkdir(exist_ok=True)
        cv2.imwrite(str(d / f"step_{self.step:07d}.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))

    def plot_losses(self) -> None:
        if self.rank != 0:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            log.warning("matplotlib missing: no loss.png")
            return
        recs = [json.loads(x) for x in (self.out / "stats.jsonl").read_text().splitlines() if x.strip()]
        keys = sorted({k for r in recs for k in r} - {"step", "time", "sec_per_step", "elapsed"})
        if not keys:
            return
        fig, axes = plt.subplots(len(keys), 1, figsize=(6, 1.6 * len(keys)), sharex=True, squeeze=False)
        for ax, k in zip(axes[:, 0], keys, strict=True):
            pts = [(r["step"], r[k]) for r in recs if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8)
            ax.set_ylabel(k, fontsize=8)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=80)
        plt.close(fig)

    # -------------------------------------------------------------- loop
    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        if self.rank == 0:
            save_run_config(cfg, self.out)
        if (self.out / "last.pt").is_file():
            self.resume(self.out / "last.pt")
        else:
            if cfg.stage == "joint" and cfg.w_open_img > 0 and cfg.open_img_warmup > 0:
                self.warm_up_image_opening(cfg.open_img_warmup)
            if cfg.stage == "joint" and self.mcfg.has_opening and cfg.open_g_warmup > 0:
                self.warm_up_generator_opening(cfg.open_g_warmup)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        stats_f = open(self.out / "stats.jsonl", "a") if self.rank == 0 else None
        last_ckpt = time.monotonic()
        keys: list[str] = []
        vals = torch.zeros(0, dtype=torch.float64)  # the last step's terms
        try:
            from tqdm import tqdm

            bar = tqdm(
                total=cfg.steps, initial=self.step, desc=cfg.stage, unit="step", disable=self.rank != 0, mininterval=5
            )
            while self.step < cfg.steps and not self.stop_requested:
                t0 = time.perf_counter()
                keys, vals = self.train_step(self.step)
                dt = time.perf_counter() - t0
                self.elapsed += dt
                if not bool(torch.isfinite(vals).all()):  # the one read of the losses every step
                    raise RtEngineError(
                        f"non-finite loss at step {self.step}: {dict(zip(keys, vals.tolist(), strict=True))}"
                    )
                self.step += 1
                bar.update(1)
                if stats_f and (self.step % cfg.log_every == 0 or self.step == 1):
                    logs = dict(zip(keys, vals.tolist(), strict=True))  # once per logging interval
                    rec = {
                        "step": self.step - 1,
                        "time": time.time(),
                        "sec_per_step": dt,
                        "elapsed": self.elapsed,
                        **logs,
                    }
                    stats_f.write(json.dumps(rec) + "\n")
                    stats_f.flush()
                    bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k != "loss"}, refresh=False)
                if self.step % cfg.sample_every == 0:
                    self.write_samples()
                    self.plot_losses()
                if self.step % cfg.ckpt_every == 0 or time.monotonic() - last_ckpt > 60 * cfg.ckpt_minutes:
                    self.save()
                    last_ckpt = time.monotonic()
            bar.close()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.save()
            if stats_f:
                stats_f.close()
                self.write_samples()
                self.plot_losses()
        if self.world > 1:
            import torch.distributed as dist

            mods = [self.model, self.heads] + ([self.D] if self.D is not None else [])
            sums = [None] * self.world
            dist.all_gather_object(sums, params_checksum(mods))
            if self.rank == 0:
                if max(sums) - min(sums) != 0:
                    raise RtEngineError(f"DDP ranks diverged: parameter checksums {sums}")
                log.info("DDP: %d ranks in sync (parameter checksum %.6f)", self.world, sums[0])
        if self.stop_requested:
            log.info("stopped at step %d on request; rerun the same command to resume", self.step)
        return dict(zip(keys, vals.tolist(), strict=True))

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_requested:  # second Ctrl-C: give up at once (the checkpoint is still written)
            raise KeyboardInterrupt
        log.warning("signal %d: finishing this step, then saving a checkpoint", signum)
        self.stop_requested = True


@cli_main
def main(argv: list[str] | None = None) -> int:
    cfg = resolve(argv)
    rank, world, device = setup_distributed(cfg)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        trainer = Trainer(cfg, rank, world, device)
        logs = trainer.fit()
        if rank == 0:
            log.info(
                "done: step %d, %.0f s of training, last losses %s",
                trainer.step,
                trainer.elapsed,
                {k: round(v, 4) for k, v in logs.items()},
            )
        return 0
    finally:
        torch.set_num_threads(old_threads)  # main() may run inside another program (tests)
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
