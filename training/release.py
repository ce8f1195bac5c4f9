"""Training checkpoint (.pt) -> the engine's single-file model (.safetensors) with provenance.

    python -m training.release runs/default/joint/last.pt rt_engine/assets/default.safetensors --half \\
        --command "bash training/train_default.sh"

The provenance stored in the file (and printed) holds the data, the stage configs, the steps,
the training wall time and the mean of the last logged losses.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from rt_engine.cli import cli_main
from rt_engine.config import ModelConfig
from rt_engine.errors import CheckpointError, ConfigError
from rt_engine.models.checkpoint import save_single
from rt_engine.models.pcavs import PCAVS

log = logging.getLogger(__name__)


def recent_losses(stats: Path, last: int = 20) -> dict[str, float]:
    """Mean of each logged value over the last ``last`` records of a stats.jsonl."""
    if not stats.is_file():
        return {}
    recs = [json.loads(x) for x in stats.read_text().splitlines() if x.strip()][-last:]
    keys = sorted({k for r in recs for k in r} - {"step", "time", "sec_per_step", "elapsed"})
    return {k: round(sum(r[k] for r in recs if k in r) / max(1, sum(k in r for r in recs)), 4) for k in keys}


def stage_history(ckpt: Path) -> list[dict[str, Any]]:
    """Steps / time / config of this run and of the runs it was initialised from (``init`` chain)."""
    out, seen = [], set()
    p: Path | None = ckpt
    while p is not None and p.is_file() and p not in seen:
        seen.add(p)
        if p.suffix == ".safetensors":  # fine-tuned from a released model: its own recorded history
            from rt_engine.models.checkpoint import read_single_meta

            out.extend(reversed(_released_before(read_single_meta(p)["provenance"].get("stages", []), out)))
            break
        ck = torch.load(p, map_location="cpu", weights_only=False)
        out.append(_stage_record(p, ck))
        if ck.get("init_stages") is not None:  # history of the released file as it was when this run began
            out.extend(reversed(ck["init_stages"]))
            break
        c = ck["config"]
        p = Path(c["init"]) if c.get("init") else None
    return list(reversed(out))


def _stage_record(p: Path, ck: dict[str, Any]) -> dict[str, Any]:
    c = ck["config"]
    return {
        "stage": c["stage"],
        "steps": ck["step"],
        "train_seconds": round(ck["elapsed"], 1),
        "batch_size": c["batch_size"],
        "data": c["data"],
        "holdout": c["holdout"],
        "run": str(p.parent),
        "git": ck.get("git", "unknown"),
        "losses_last_logged": recent_losses(p.parent / "stats.jsonl"),
    }


def _released_before(stages: list[dict[str, Any]], chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A released file's stages, cut where they reach a run already in this chain: the file at the
    init path may have been re-exported from a later run of this very chain since (the bundled model
    is overwritten in place), and that run must not be counted twice."""
    runs = {h["run"] for h in chain}
    for k, h in enumerate(stages):
        if h.get("run") in runs:
            return stages[:k]
    return stages


def release(
    ckpt: str | Path,
    out: str | Path,
    half: bool = True,
    command: str = "",
    extra: dict[str, Any] | None = None,
    raw: bool = False,
    open_gain: float | str = 1.0,
    data: str | Path | None = None,
) -> Path:
    """Write the model of a training checkpoint; its weight average (``--ema``) when it has one,
    unless ``raw``. ``open_gain``: see :func:`calibrate_opening`; ``"fit"``: :func:`fitted_open_gain` on
    ``data`` (default: the run's own cache and holdout)."""
    p = Path(ckpt)
    if not p.is_file():
        raise CheckpointError(f"training checkpoint not found: {p}")
    ck = torch.load(p, map_location="cpu", weights_only=False)
    model = PCAVS(ModelConfig.from_dict(ck["model_config"]))
    use_ema = ck.get("model_ema") is not None and not raw
    model.load_state_dict(ck["model_ema"] if use_ema else ck["model"])
    model.generator.set_form("ref")
    if open_gain == "fit":
        open_gain = fitted_open_gain(model, data or ck["config"]["data"], ck["config"].get("holdout"))
    if open_gain != 1.0:
        calibrate_opening(model, open_gain)
    hist = stage_history(p)
    weights = f"moving average, decay {ck['ema_decay']}" if use_ema else "last step"
    prov = {
        "trained_by": "training/train.py (rt_engine)",
        "command": command,
        "stages": hist,
        "total_steps": sum(h["steps"] for h in hist),
        "total_train_seconds": sum(h["train_seconds"] for h in hist),
        "identities_trained": len(ck.get("identities", [])),
        "weights": weights,
        **({"open_gain": round(open_gain, 4)} if open_gain != 1.0 else {}),
        **(extra or {}),
    }
    path = save_single(model.eval(), out, half=half, provenance=prov)
    log.info("wrote %s (%.1f MB): %s", path, path.stat().st_size / 1e6, json.dumps(prov))
    return path


def recalibrate(released: str | Path, out: str | Path, open_gain: float | str, data: str | Path | None = None) -> Path:
    """A released model (.safetensors) with its opening head scaled once more (:func:`calibrate_opening`):
    every other weight is written back as it was (fp16 stays fp16, bit for bit), the provenance keeps
    its history and records the product of the gains. ``"fit"`` needs ``data`` (the training cache)."""
    from rt_engine.models.checkpoint import load_single, read_single_meta

    meta = read_single_meta(released)
    model = load_single(released)
    model.generator.set_form("ref")
    if open_gain == "fit":
        if data is None:
            raise ConfigError("--open-gain fit on a released file needs --data (the training cache)")
        holdout = next(
            (h.get("holdout") for h in reversed(meta["provenance"].get("stages", [])) if h.get("holdout")), None
        )
        open_gain = fitted_open_gain(model, data, holdout)
    calibrate_opening(model, float(open_gain))
    prov = dict(meta["provenance"])
    prov["open_gain"] = round(float(prov.get("open_gain", 1.0)) * float(open_gain), 4)
    half = _stored_half(released)
    path = save_single(model.eval(), out, half=half, provenance=prov)
    log.info("wrote %s: opening gain %.3f in all (x %.3f now)", path, prov["open_gain"], float(open_gain))
    return path


def _stored_half(path: str | Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(f.get_slice(k).get_dtype() == "F16" for k in f.keys())


def _need_opening_channel(model: PCAVS) -> None:
    if not model.cfg.has_opening:
        raise ConfigError("open_gain needs a warp model with the mouth-opening channel (model.warp_open)")


@torch.no_grad()
def calibrate_opening(model: PCAVS, gain: float) -> None:
    """warp_open: scale the opening head's output around its value in silence, o -> o_sil + gain (o -
    o_sil), by rewriting its last layer. The head is a regression onto z-scored openings, so its output
    swings less than the labels (std about 0.76 against 1 on the training frames); the generator was
    taught with the labels themselves. Raises ConfigError for a model without the channel."""
    from rt_engine.inputs import audio as audio_in

    gen = model.generator
    _need_opening_channel(model)
    if not 0.0 < gain <= 3.0:
        raise ConfigError(f"open_gain must be in (0, 3], got {gain}")
    model.eval()
    win = torch.from_numpy(audio_in.silence_window().copy())[None]  # [1,1,80,20]
    o_sil = float(gen.open_head(model.encode_mouth(win).float()))
    last = gen.open_head[-1]
    last.weight.mul_(gain)
    last.bias.mul_(gain).add_((1.0 - gain) * o_sil)
    log.info("opening head: gain %.2f around the silence opening %.3f", gain, o_sil)


@torch.no_grad()
def fitted_open_gain(model: PCAVS, data: str | Path, holdout: str | Path | None) -> float:
    """The gain that makes the opening head swing as far as its labels: 1 / the standard deviation of
    its output over every labelled frame of ``data`` (the training cache; ``holdout`` identities left
    out), where the labels, z-scored per clip, have 1. Chosen from the training data alone, never from
    the clips the model is evaluated on."""
    from training.data import ClipStore, read_holdout
    from training.train import labelled_mouth_codes

    _need_opening_channel(model)
    store = ClipStore(data, read_holdout(holdout) if holdout else None)
    x, y, _ = labelled_mouth_codes(model, store, torch.device("cpu"))  # [N,500], [N]
    std = float(model.generator.open_head(x).std())
    gain = min(3.0, 1.0 / max(std, 1e-6))
    log.info("opening head: output std %.3f on %d labelled frames of %s (labels 1): gain %.3f", std, len(y), data, gain)
    return gain


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.release", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "checkpoint", help="last.pt of a training run, or a released .safetensors (only --open-gain applies)"
    )
    ap.add_argument("out", help="output .safetensors")
    ap.add_argument("--half", action="store_true", help="store fp16 weights")
    ap.add_argument("--command", default="", help="the command that trained it (provenance)")
    ap.add_argument("--note", default="", help="free text stored in the provenance")
    ap.add_argument("--raw", action="store_true", help="the last step's weights, not the run's moving average")
    ap.add_argument(
        "--open-gain",
        default="1",
        help="warp_open models: scale the opening head's output around silence (calibrates its shrinkage); "
        "'fit': 1 / the head's output std on the run's labelled training frames (--data to read another cache)",
    )
    ap.add_argument("--data", default=None, help="with --open-gain fit: the cache (default: the run's own)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if args.open_gain == "fit":
        gain: float | str = "fit"
    else:
        try:
            gain = float(args.open_gain)
        except ValueError:
            raise ConfigError(f"--open-gain takes a number or 'fit', got {args.open_gain!r}") from None
    if args.checkpoint.endswith(".safetensors"):  # a released model: its opening calibrated once more
        recalibrate(args.checkpoint, args.out, gain, args.data)
        return 0
    release(
        args.checkpoint,
        args.out,
        args.half,
        args.command,
        {"note": args.note} if args.note else None,
        raw=args.raw,
        open_gain=gain,
        data=args.data,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
