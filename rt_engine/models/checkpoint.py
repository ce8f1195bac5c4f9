"""Checkpoints: the official five-file layout, our single-file format, and conversion.

Official layout (a directory, or its ``demo/`` subdirectory, as upstream writes it)::

    latest_net_G.pth  latest_net_A_sync.pth  latest_net_E.pth  latest_net_V.pth  [latest_net_D.pth]

Each file is a plain ``state_dict`` (legacy or zip ``torch.save``). Loading is strict: every key
is consumed by our networks or declared unused below; a missing, unexpected or mis-shaped key is
a :class:`CheckpointError` naming the file, the key and both shapes.

Our format: one ``.safetensors`` file with keys ``<network>.<official key>`` (network one of
``generator``, ``audio_encoder``, ``pose_encoder``, ``identity_encoder``) and metadata
``format`` = ``rt_engine/1``, ``config`` (ModelConfig JSON) and ``provenance`` (free JSON).

Command line::

    python -m rt_engine.models.checkpoint convert SRC DST [--preset official] [--half]

converts official directory -> .safetensors, or .safetensors -> official directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rt_engine.assets import DEFAULT_MODEL
from rt_engine.cli import cli_main
from rt_engine.config import ModelConfig, model_preset
from rt_engine.errors import CheckpointError, ConfigError
from rt_engine.models.modconv import blur_kernel
from rt_engine.models.pcavs import PCAVS

log = logging.getLogger(__name__)

FORMAT = "rt_engine/1"
# official file tag -> our sub-network
OFFICIAL_NETS = {"G": "generator", "A_sync": "audio_encoder", "E": "pose_encoder", "V": "identity_encoder"}
OPTIONAL_NETS = ("D",)  # discriminator: training only, ignored at inference
# Keys of the official networks that the inference path never reads.
UNUSED_PREFIXES = {
    "G": ("style.", "input."),  # style MLP (input_is_latent=True); ConstantInput replaced by id map
    "A_sync": ("fc.",),  # speaker classifier head
    "E": ("classifier.", "to_mouth.", "mouth_fc.", "headpose_fc."),
    "V": ("model.fc.", "fc."),  # torchvision head; identity classifier
}
N_CLASSES = 5830  # VoxCeleb2 identities of the official heads
BUNDLED = DEFAULT_MODEL


def _is_unused(net: str, key: str) -> bool:
    return key.endswith("num_batches_tracked") or key.startswith(UNUSED_PREFIXES[net])


def _is_fir(key: str) -> bool:
    return key.endswith((".blur.kernel", ".upsample.kernel"))


def find_official_dir(path: str | Path) -> Path:
    """The directory holding ``latest_net_G.pth`` (``path`` itself or one subdirectory)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path not found: {p}")
    if (p / "latest_net_G.pth").is_file():
        return p
    hits = sorted(q.parent for q in p.glob("*/latest_net_G.pth"))
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise CheckpointError(f"{p}: several checkpoint folders ({', '.join(h.name for h in hits)}); name one")
    raise CheckpointError(f"{p}: no latest_net_G.pth (official PC-AVS layout) found")


def _torch_load(f: Path) -> dict[str, Tensor]:
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{f.name}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{f.name}: not a state_dict (got {type(sd).__name__})")
    # DataParallel checkpoints prefix every key with "module."
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def _shape(t: Any) -> list[int]:
    return list(t.shape)


def load_state_into(model: PCAVS, net: str, sd: Mapping[str, Tensor], fname: str) -> None:
    """Strictly copy one official state_dict into ``model``'s sub-network ``OFFICIAL_NETS[net]``."""
    sub = getattr(model, OFFICIAL_NETS[net])
    expected = sub.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        k = missing[0]
        raise CheckpointError(
            f"{fname}: missing key '{k}' (expected shape {_shape(expected[k])})"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    out = {}
    for k, v in sd.items():
        if k in expected:
            if tuple(v.shape) != tuple(expected[k].shape):
                raise CheckpointError(
                    f"{fname}: key '{k}' has shape {_shape(v)}, the model config "
                    f"'{model.cfg.name}' expects {_shape(expected[k])}"
                )
            out[k] = v.to(expected[k].dtype)
        elif _is_fir(k):
            if v.shape != (4, 4) or not torch.allclose(v.float(), blur_kernel(), atol=1e-6):
                raise CheckpointError(f"{fname}: key '{k}' must be the [1,3,3,1] blur kernel / 16")
        elif not _is_unused(net, k):
            raise CheckpointError(f"{fname}: unexpected key '{k}' (shape {_shape(v)}) not used by the model")
        # else: declared unused, consumed without reading its values (they may even be NaN)
    bad = [k for k, v in out.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{fname}: key '{bad[0]}' holds NaN or Inf")
    sub.load_state_dict(out, strict=True)


def load_official(path: str | Path, cfg: ModelConfig | None = None) -> PCAVS:
    """Load the official four/five-file checkpoint layout into a PCAVS model (eval mode)."""
    d = find_official_dir(path)
    cfg = (cfg or model_preset("official")).validate()
    model = PCAVS(cfg)
    for net in OFFICIAL_NETS:
        f = d / f"latest_net_{net}.pth"
        if not f.is_file():
            raise CheckpointError(f"{d}: missing file {f.name}")
        load_state_into(model, net, _torch_load(f), f.name)
    for net in OPTIONAL_NETS:
        if (d / f"latest_net_{net}.pth").is_file():
            log.info("ignoring latest_net_%s.pth (only used for training)", net)
    log.info("loaded official PC-AVS checkpoint from %s (config %s)", d, cfg.name)
    return model.eval()


def official_state_dicts(model: PCAVS) -> dict[str, dict[str, Tensor]]:
    """The official layout of ``model``: used keys from the model, unused keys zero-filled."""
    cfg = model.cfg
    out: dict[str, dict[str, Tensor]] = {}
    for net, name in OFFICIAL_NETS.items():
        sd = {
            k: v.detach().float().clone() if torch.is_floating_point(v) else v.detach().clone()
            for k, v in getattr(model, name).state_dict().items()
        }
        for k in [k for k in sd if k.endswith("running_var")]:
            sd[k[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        out[net] = sd
    g = out["G"]
    for j in range(cfg.n_up):
        g[f"convs.{2 * j}.conv.blur.kernel"] = blur_kernel()
        g[f"to_rgbs.{j}.upsample.kernel"] = blur_kernel()
    s = cfg.style_dim
    for i in range(1, 9):
        g[f"style.{i}.weight"], g[f"style.{i}.bias"] = torch.zeros(s, s), torch.zeros(s)
    g["input.input"] = torch.zeros(1, cfg.gen_channels[0], cfg.start, cfg.start)
    out["A_sync"]["fc.weight"] = torch.zeros(N_CLASSES, cfg.audio_feature)
    out["A_sync"]["fc.bias"] = torch.zeros(N_CLASSES)
    e, f = out["E"], cfg.fan_feature
    for pre, shape in (
        ("classifier.0", (f, f)),
        ("classifier.2", (N_CLASSES, f)),
        ("to_mouth.0", (f, f)),
        ("to_mouth.2", (f, f)),
        ("mouth_fc.1", (N_CLASSES, f)),
        ("headpose_fc.1", (N_CLASSES, cfg.pose_dim)),
    ):
        e[pre + ".weight"], e[pre + ".bias"] = torch.zeros(shape), torch.zeros(shape[0])
    v = out["V"]
    v["model.fc.weight"], v["model.fc.bias"] = torch.zeros(1000, cfg.id_dim), torch.zeros(1000)
    v["fc.weight"], v["fc.bias"] = torch.zeros(N_CLASSES, cfg.id_dim), torch.zeros(N_CLASSES)
    return out


def save_official(model: PCAVS, out_dir: str | Path, legacy: bool = False) -> Path:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    for net, sd in official_state_dicts(model).items():
        torch.save(sd, d / f"latest_net_{net}.pth", _use_new_zipfile_serialization=not legacy)
    return d


def save_single(model: PCAVS, path: str | Path, half: bool = False, provenance: dict[str, Any] | None = None) -> Path:
    """Write our single-file format (safetensors + config JSON). ``half`` stores fp16."""
    from safetensors.torch import save_file

    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if half and torch.is_floating_point(v):
            v = v.half()
        tensors[k] = v
    meta = {"format": FORMAT, "config": model.cfg.to_json(), "provenance": json.dumps(provenance or {})}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p), metadata=meta)
    return p


def read_single_meta(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{Path(path).name}: cannot read safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{Path(path).name}: not an rt_engine checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    return {"config": json.loads(meta["config"]), "provenance": json.loads(meta.get("provenance", "{}"))}


def load_single(path: str | Path, cfg: ModelConfig | None = None) -> PCAVS:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    meta = read_single_meta(p)
    try:
        file_cfg = ModelConfig.from_dict(meta["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{p.name}: bad embedded config ({e})") from None
    if cfg is not None and cfg != file_cfg:
        raise CheckpointError(
            f"{p.name}: checkpoint config '{file_cfg.name}' does not match the requested config '{cfg.name}'"
        )
    model = PCAVS(file_cfg)
    sd = load_file(str(p))
    expected = model.state_dict()
    for k in expected:
        if k not in sd:
            raise CheckpointError(f"{p.name}: missing key '{k}' (expected shape {_shape(expected[k])})")
    for k, v in sd.items():
        if k not in expected:
            raise CheckpointError(f"{p.name}: unexpected key '{k}'")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{p.name}: key '{k}' has shape {_shape(v)}, expected {_shape(expected[k])}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)
    return model.eval()


def load_checkpoint(path: str | Path | None = None, cfg: ModelConfig | None = None) -> PCAVS:
    """Load any supported checkpoint: official directory, ``.safetensors`` file, or the bundled
    default model when ``path`` is None."""
    if path is None:
        if not BUNDLED.is_file():
            raise CheckpointError(f"bundled default weights missing: {BUNDLED}")
        return load_single(BUNDLED, cfg)
    p = Path(path)
    if p.is_dir():
        return load_official(p, cfg)
    if p.suffix == ".safetensors":
        return load_single(p, cfg)
    if p.is_file() and p.name.startswith("latest_net_"):
        return load_official(p.parent, cfg)
    if not p.exists():
        raise CheckpointError(f"checkpoint path not found: {p}")
    raise CheckpointError(f"{p}: unknown checkpoint kind (expected an official directory or .safetensors)")


def count_params(model: torch.nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m rt_engine.models.checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="official dir <-> .safetensors")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--preset", default="official", help="model config of an official checkpoint")
    c.add_argument("--half", action="store_true", help="store fp16 in the .safetensors file")
    c.add_argument("--legacy", action="store_true", help="write official files in the legacy torch format")
    i = sub.add_parser("info", help="print the config of a checkpoint")
    i.add_argument("src")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "info":
        m = load_checkpoint(args.src)
        print(json.dumps({"config": m.cfg.to_dict(), "params": count_params(m)}, indent=1))
        return 0
    if str(args.dst).endswith(".safetensors"):
        m = load_checkpoint(args.src, model_preset(args.preset) if Path(args.src).is_dir() else None)
        save_single(m, args.dst, half=args.half, provenance={"converted_from": str(args.src)})
    else:
        save_official(load_checkpoint(args.src), args.dst, legacy=args.legacy)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
