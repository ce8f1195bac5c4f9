"""The four PC-AVS stage graphs in ONNX: build, check, verify against PyTorch, manifest.

Part of the runtime: the ONNX Runtime and OpenVINO backends build their graphs with
:func:`export_onnx` on first use (``backends/onnx_backend.py``); ``python -m export onnx`` is the
command line over the same function, and ``export/trt_build.py`` builds TensorRT engines from its output.

The chain (Polygraphy style: loaders ending in runners, every result compared)::

    PCAVS (torch)  --stage wrapper-->  torch.onnx.export (TorchScript exporter, constant folding)
                   --> <stage>.onnx (+ metadata)  --graph checks-->  ONNX Runtime  vs  PyTorch
                   --> verification.json, manifest.json

One graph per stage, batch axis symbolic (``batch``)::

    identity   img [B,3,224,224]                       -> id_feature0 [B,2048], id_feature1 [B,512,7,7]
    pose       img [B,3,224,224]                       -> pose [B,12]
    audio      mel [B,1,80,20]                         -> mouth [B,500]   (audio encoder, x1.2, mouth_embed)
    generator  style [B,S], id_map [B,C,7,7] (, noise_0..noise_k [B,1,r,r]) -> image [B,3,H,W]

The generator is exported in the static-weight modulated-conv form, so every weight (and the
demodulation matrix ``W2``) is a graph initializer. ``half=True`` adds ``<stage>.fp16.onnx``
variants for TensorRT (strongly typed networks take their precision from the ONNX types): weights
and activations in fp16, inputs/outputs fp32, the demodulation ``rsqrt(s^2 @ W2 + 1e-8)`` in fp32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rt_engine.backends.base import compare
from rt_engine.config import ModelConfig
from rt_engine.errors import RtEngineError
from rt_engine.models.pcavs import PCAVS

log = logging.getLogger(__name__)

EXPORT_FORMAT = "rt_engine.onnx/1"  # bump when graph names, I/O or layout change
STAGES = ("identity", "pose", "audio", "generator")
NOISE_INPUT_MODES = ("stored", "input", "zero")
MANIFEST = "manifest.json"
VERIFICATION = "verification.json"
NOISES = "noises.npz"  # the checkpoint's stored noise maps noise_i [1,1,r,r], for graphs with noise inputs
BATCH_AXIS = "batch"
DEFAULT_TOL = 1e-4  # max abs error allowed for fp32 graphs (images in [-1,1]; features: relative)
FP16_MIN_PSNR = 30.0  # dB, fp16 variants against fp32 PyTorch (only checked where ORT runs fp16)

# Operators our graphs may contain; all are in TensorRT's ONNX operator list (and ORT's/OpenVINO's).
SUPPORTED_OPS = frozenset(
    {
        "Add",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "ConvTranspose",
        "DepthToSpace",
        "Div",
        "Expand",
        "Flatten",
        "Gather",
        "Gemm",
        "GlobalAveragePool",
        "GridSample",
        "Identity",
        "SpaceToDepth",
        "LeakyRelu",
        "MatMul",
        "MaxPool",
        "Mul",
        "Neg",
        "Pad",
        "Pow",
        "Reciprocal",
        "ReduceMean",
        "ReduceSum",
        "Relu",
        "Reshape",
        "Resize",
        "Shape",
        "Sigmoid",
        "Slice",
        "Softmax",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Tanh",
        "Transpose",
        "Unsqueeze",
    }
)


class ExportError(RtEngineError):
    """An export step failed, a graph failed a check, or exported files do not match their manifest."""


# ----------------------------------------------------------------------------------------------
# stage wrappers: the exact computation of each graph, fp32 in / fp32 out


class _Stage(nn.Module):
    """Casts fp32 inputs to the compute dtype of the wrapped model and outputs back to fp32."""

    def __init__(self, model: PCAVS, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def _in(self, x: Tensor) -> Tensor:
        return x.to(self.dtype)


class IdentityStage(_Stage):
    def forward(self, img: Tensor) -> tuple[Tensor, Tensor]:  # [B,3,224,224] -> [B,2048], [B,512,7,7]
        id0, id1 = self.model.encode_identity(self._in(img))
        return id0.float(), id1.float()


class PoseStage(_Stage):
    def forward(self, img: Tensor) -> Tensor:  # [B,3,224,224] -> [B,12]
        return self.model.encode_pose(self._in(img)).float()


class AudioStage(_Stage):
    def forward(self, mel: Tensor) -> Tensor:  # [B,1,80,20] -> [B,500]
        return self.model.encode_mouth(self._in(mel)).float()


class GeneratorStage(_Stage):
    def __init__(self, model: PCAVS, dtype: torch.dtype, noise: str):
        super().__init__(model, dtype)
        self.noise = noise

    def forward(self, style: Tensor, id_map: Tensor, *noises: Tensor) -> Tensor:  # -> [B,3,H,W]
        noise: str | list[Tensor] = [self._in(n) for n in noises] if self.noise == "input" else self.noise
        # static form, chosen for this call: every weight becomes a graph constant
        return self.model.generator(self._in(style), self._in(id_map), noise, form="static").float()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # "batch" marks the symbolic axis

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH_AXIS else int(d) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": "float32"}


def stage_io(cfg: ModelConfig, stage: str, noise: str = "stored") -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of one stage graph."""
    B = BATCH_AXIS
    img = TensorSpec("img", (B, 3, 224, 224))
    if stage == "identity":
        return [img], [TensorSpec("id_feature0", (B, cfg.id_dim)), TensorSpec("id_feature1", (B, *cfg.id_map_shape))]
    if stage == "pose":
        return [img], [TensorSpec("pose", (B, cfg.pose_dim))]
    if stage == "audio":
        return [TensorSpec("mel", (B, 1, cfg.n_mels, 20))], [TensorSpec("mouth", (B, cfg.mouth_dim))]
    if stage == "generator":
        ins = [TensorSpec("style", (B, cfg.style_dim)), TensorSpec("id_map", (B, *cfg.id_map_shape))]
        if noise == "input":
            ins += [TensorSpec(f"noise_{i}", (B, 1, r, r)) for i, r in enumerate(noise_resolutions(cfg))]
        return ins, [TensorSpec("image", (B, 3, cfg.size, cfg.size))]
    raise ExportError(f"unknown stage {stage!r}; choose from {STAGES}")


def noise_resolutions(cfg: ModelConfig) -> list[int]:
    """Side length of each generator noise map (pcavs: noise_0 at 7, then two per resolution)."""
    return cfg.noise_sizes


def example_inputs(cfg: ModelConfig, stage: str, batch: int, noise: str = "stored", seed: int = 0) -> dict[str, Tensor]:
    """Random inputs in the ranges the engine feeds: images in [-1,1], mel in [0,1], styles like
    encoder outputs (identity vector >= 0), unit-normal identity maps and noise."""
    g = torch.Generator().manual_seed(seed)
    ins, _ = stage_io(cfg, stage, noise)
    out = {}
    for spec in ins:
        shape = spec.concrete(batch)
        if spec.name == "img":
            x = torch.rand(shape, generator=g) * 2 - 1
        elif spec.name == "mel":
            x = torch.rand(shape, generator=g)
        elif spec.name == "style":
            x = torch.randn(shape, generator=g) * 0.5
            x[:, : cfg.id_dim] = x[:, : cfg.id_dim].abs()  # id_feature0 is a mean of ReLU outputs
        else:
            x = torch.randn(shape, generator=g)
        out[spec.name] = x
    return out


# ----------------------------------------------------------------------------------------------
# hashing, versions


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """Hash of the state_dict (names, shapes and fp32 values): identifies the weights of an export."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        t = t.float() if torch.is_floating_point(t) else t
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def rt_engine_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("rt_engine")
    except (ImportError, PackageNotFoundError):
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        import tomllib

        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "0+unknown"


# ----------------------------------------------------------------------------------------------
# graph checks


def check_graph(path: str | Path, stage: str, cfg: ModelConfig, noise: str = "stored") -> dict[str, Any]:
    """Structural checks of one exported graph; raises ExportError naming the first failure.

    * ONNX checker passes; inputs/outputs are the expected names with ``batch`` symbolic at axis 0
      and every other axis static;
    * weights are initializers: the only graph inputs are the data inputs, and every Conv /
      ConvTranspose / Gemm / MatMul takes its weight from an initializer or a Constant;
    * only operators of :data:`SUPPORTED_OPS` occur.
    """
    import onnx

    path = Path(path)
    m = onnx.load(str(path))
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name}: ONNX checker failed: {e}") from None
    g = m.graph
    want_in, want_out = stage_io(cfg, stage, noise)
    inits = {t.name for t in g.initializer}
    consts = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    real_inputs = [i for i in g.input if i.name not in inits]
    for kind, got, want in (("input", real_inputs, want_in), ("output", list(g.output), want_out)):
        if [v.name for v in got] != [s.name for s in want]:
            raise ExportError(f"{path.name}: {kind}s are {[v.name for v in got]}, expected {[s.name for s in want]}")
        for v, s in zip(got, want, strict=True):
            dims = v.type.tensor_type.shape.dim
            shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in dims)
            if shape != s.shape:
                raise ExportError(
                    f"{path.name}: {kind} '{v.name}' has shape {list(shape)}, expected "
                    f"{list(s.shape)} (batch must be the symbolic axis '{BATCH_AXIS}')"
                )
    ops: dict[str, int] = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    bad = sorted(set(ops) - SUPPORTED_OPS)
    if bad:
        raise ExportError(f"{path.name}: unsupported operators {bad}")
    n_weighted = 0
    for n in g.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            w = n.input[1]
            if w not in inits and w not in consts:
                # MatMul may multiply two activations (none of our graphs do, but say so clearly)
                raise ExportError(
                    f"{path.name}: {n.op_type} node '{n.name}' takes its weight '{w}' from an "
                    "activation, not an initializer (dynamic weights; use the static form)"
                )
            n_weighted += 1
    return {
        "ops": dict(sorted(ops.items())),
        "initializers": len(inits),
        "weighted_nodes": n_weighted,
        "inputs": [s.to_dict() for s in want_in],
        "outputs": [s.to_dict() for s in want_out],
    }


# ----------------------------------------------------------------------------------------------
# comparison


def ort_session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _reference(model: PCAVS, stage: str, inputs: dict[str, Tensor], noise: str) -> list[Tensor]:
    """PyTorch fp32 outputs of a stage, with the official (per-sample weight) modulated conv."""
    with torch.inference_mode():
        if stage == "identity":
            return list(model.encode_identity(inputs["img"]))
        if stage == "pose":
            return [model.encode_pose(inputs["img"])]
        if stage == "audio":
            return [model.encode_mouth(inputs["mel"])]
        noises = [v for k, v in inputs.items() if k.startswith("noise_")] if noise == "input" else noise
        return [model.generator(inputs["style"], inputs["id_map"], noises, form="ref")]


def verify_graph(
    model: PCAVS,
    path: str | Path,
    stage: str,
    batches: Sequence[int],
    noise: str = "stored",
    tol: float = DEFAULT_TOL,
    min_psnr: float | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run ``path`` with ONNX Runtime and the fp32 PyTorch model (reference form) on the same random
    inputs at each batch size. Returns one record per (batch, output); ``passed`` is max_rel <= tol
    (max abs for images, which lie in [-1,1]) and, when given, psnr >= min_psnr."""
    cfg = model.cfg
    sess = ort_session(path)
    _, outs = stage_io(cfg, stage, noise)
    records = []
    for b in batches:
        inputs = example_inputs(cfg, stage, b, noise, seed=seed + b)
        ref = _reference(model, stage, inputs, noise)
        got = sess.run([o.name for o in outs], {k: v.numpy() for k, v in inputs.items()})
        for spec, r, o in zip(outs, ref, got, strict=True):
            is_image = spec.name == "image"
            try:
                c = compare(r, o, value_range=2.0 if is_image else None)
            except ValueError as e:  # shape mismatch
                raise ExportError(f"{Path(path).name}, output {spec.name}: {e}") from None
            err = c["max_abs"] if is_image else c["max_rel"]
            ok = c["finite"] and err <= tol and (min_psnr is None or c["psnr_db"] >= min_psnr)
            records.append({"batch": b, "output": spec.name, **c, "tol": tol, "passed": bool(ok)})
    return records


# ----------------------------------------------------------------------------------------------
# export


def _export_one(
    module: nn.Module, args: tuple[Tensor, ...], path: Path, ins: list[TensorSpec], outs: list[TensorSpec], opset: int
) -> None:
    """TorchScript-based ONNX export with axis 0 of every input/output symbolic and constant folding
    (so weight scaling, ``W2`` of the demodulation and stored noise become initializers)."""
    names = [s.name for s in ins] + [s.name for s in outs]
    dynamic = {n: {0: BATCH_AXIS} for n in names}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[s.name for s in ins],
            output_names=[s.name for s in outs],
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    _static_io_dims(path, ins + outs)
    fold_constants(path)


def fold_constants(path: str | Path) -> int:
    """Evaluate every node whose inputs are all initializers/Constants (the exporter leaves e.g. the
    demodulation's ``W2 = sum_k w^2`` and its transpose as runtime ops) and store the results as
    initializers; drop what became unused. Returns the number of folded nodes."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    path = Path(path)
    m = onnx.load(str(path))
    g = m.graph
    known = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    kept, folded = [], 0
    for n in g.node:
        ins = [i for i in n.input if i]
        if n.op_type == "Constant" or (ins and all(i in known for i in ins) and n.domain in ("", "ai.onnx")):
            one = onnx.helper.make_graph(
                [n],
                "fold",
                [onnx.helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None) for i in ins],
                [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in n.output],
            )
            tiny = onnx.helper.make_model(one, opset_imports=m.opset_import)
            res = ReferenceEvaluator(tiny).run(None, {i: known[i] for i in ins})
            for name, val in zip(n.output, res, strict=True):
                known[name] = np.asarray(val)
            folded += 1
        else:
            kept.append(n)
    used = {i for n in kept for i in n.input} | {o.name for o in g.output}
    del g.node[:]
    g.node.extend(kept)
    del g.initializer[:]
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in known.items() if k in used)
    onnx.save(m, str(path))
    return folded


def _static_io_dims(path: Path, specs: list[TensorSpec]) -> None:
    """Write the known static sizes into the graph's I/O shapes (the exporter leaves names such as
    ``Castimage_dim_2`` where its shape inference lost track through Pad); batch stays ``batch``.
    ONNX Runtime verification then proves the real output shapes."""
    import onnx

    m = onnx.load(str(path))
    by_name = {s.name: s for s in specs}
    for v in list(m.graph.input) + list(m.graph.output):
        spec = by_name.get(v.name)
        if spec is None:
            continue
        dims = v.type.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            raise ExportError(f"{path.name}: '{v.name}' has rank {len(dims)}, expected {len(spec.shape)}")
        for d, want in zip(dims, spec.shape, strict=True):
            if isinstance(want, str):
                d.dim_param = want
            elif d.dim_param:
                d.dim_value = want  # clears dim_param (oneof)
    onnx.save(m, str(path))


def _set_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    m = onnx.load(str(path))
    keep = [p for p in m.metadata_props if p.key not in meta]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    m.producer_name = "rt_engine"
    m.producer_version = meta.get("rt_engine_version", "")
    onnx.save(m, str(path))


def export_onnx(
    model: PCAVS,
    out_dir: str | Path,
    batch: int = 1,
    noise: str = "stored",
    opset: int = 17,
    *,
    half: bool = False,
    verify: bool = True,
    tol: float = DEFAULT_TOL,
    checkpoint: str | Path | None = None,
    stages: Sequence[str] = STAGES,
) -> dict[str, Path]:
    """Export the four stage graphs of ``model`` into ``out_dir``; returns ``{stage: fp32 graph path}``.

    ``batch``: batch size used for tracing (the batch axis stays symbolic); verification runs at
    ``batch`` and at ``batch + 2``. ``noise``: ``stored`` (the checkpoint's noise maps as
    initializers), ``input`` (``noise_0..noise_k`` graph inputs), ``zero``. ``half``: also write
    ``<stage>.fp16.onnx`` (fp16 weights/activations, fp32 demodulation and I/O) for TensorRT.
    ``verify``: compare every graph with PyTorch through ONNX Runtime, write ``verification.json``
    and raise :class:`ExportError` when an fp32 graph exceeds ``tol``. ``checkpoint``: the file the
    weights came from (its sha256 goes into the manifest).
    """
    if noise not in NOISE_INPUT_MODES:
        raise ExportError(f"noise must be one of {NOISE_INPUT_MODES}, got {noise!r}")
    if batch < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    if not 17 <= opset <= 21:
        raise ExportError(f"opset {opset} not supported (17..21)")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ExportError(f"unknown stages {bad}; choose from {STAGES}")
    cfg = model.cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    wsha = weights_sha256(model)
    meta = {
        "format": EXPORT_FORMAT,
        "rt_engine_version": rt_engine_version(),
        "model_config": cfg.to_json(),
        "weights_sha256": wsha,
        "noise": noise,
    }
    manifest: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "rt_engine_version": meta["rt_engine_version"],
        "torch_version": torch.__version__,
        "opset": opset,
        "model_config": cfg.to_dict(),
        "weights_sha256": wsha,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
        "noise": noise,
        "export_batch": batch,
        "batch_axis": BATCH_AXIS,
        "graphs": {},
    }
    paths: dict[str, Path] = {}
    verification: dict[str, Any] = {
        "tol": tol,
        "reference": "torch fp32, per-sample-weight modulated conv",
        "runtime": "onnxruntime CPUExecutionProvider",
        "graphs": {},
    }
    variants = [("fp32", torch.float32)] + ([("fp16", torch.float16)] if half else [])
    for prec, dtype in variants:
        for stage in stages:
            name = f"{stage}.onnx" if prec == "fp32" else f"{stage}.{prec}.onnx"
            path = out / name
            ins, outs = stage_io(cfg, stage, noise)
            # fp16 variants trace a copy in that dtype; the generator stage uses the static form
            m = model if dtype == torch.float32 else _half_copy(model)
            wrapper = (
                GeneratorStage(m, dtype, noise)
                if stage == "generator"
                else {"identity": IdentityStage, "pose": PoseStage, "audio": AudioStage}[stage](m, dtype)
            )
            args = tuple(example_inputs(cfg, stage, batch, noise).values())
            log.info("exporting %s (%s)", name, prec)
            _export_one(wrapper.eval(), args, path, ins, outs, opset)
            _set_metadata(path, {**meta, "stage": stage, "precision": prec})
            checks = check_graph(path, stage, cfg, noise)
            entry = {"file": name, "sha256": sha256_file(path), "precision": prec, **checks}
            manifest["graphs"][f"{stage}.{prec}" if prec != "fp32" else stage] = entry
            if prec == "fp32":
                paths[stage] = path
            if verify:
                key = name[: -len(".onnx")]
                verification["graphs"][key] = _verify_variant(model, path, stage, batch, noise, tol, prec)
    if noise == "input" and "generator" in stages:
        # runtimes feed these for noise="stored" (the graph has no noise constants of its own)
        gen = model.generator
        np.savez(
            out / NOISES,
            **{f"noise_{i}": getattr(gen.noises, f"noise_{i}").detach().float().numpy() for i in range(cfg.num_noises)},
        )
        manifest["noises"] = {"file": NOISES, "sha256": sha256_file(out / NOISES)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if verify:
        verification["host"] = platform.machine()
        (out / VERIFICATION).write_text(json.dumps(verification, indent=1))
        failed = [
            f"{k} (batch {r['batch']}, {r['output']}: max_abs {r['max_abs']:.3g}, psnr {r['psnr_db']:.1f} dB)"
            for k, v in verification["graphs"].items()
            if v.get("records")
            for r in v["records"]
            if not r["passed"]
        ]
        if failed:
            raise ExportError(
                f"graphs differ from PyTorch beyond tolerance: {'; '.join(failed)} (see {out / VERIFICATION})"
            )
    log.info("exported %s to %s", ", ".join(paths), out)
    return paths


def _half_copy(model: PCAVS) -> PCAVS:
    import copy

    # a copy: .half() converts the weights in place, and the export traces encoders in eval mode (BN)
    return copy.deepcopy(model).half().eval()


def _verify_variant(
    model: PCAVS, path: Path, stage: str, batch: int, noise: str, tol: float, prec: str
) -> dict[str, Any]:
    batches = [batch, batch + 2]
    if prec == "fp32":
        return {"records": verify_graph(model, path, stage, batches, noise, tol)}
    # fp16 graphs: ONNX Runtime runs them slowly on CPUs (or not at all, for some ops); one batch size
    # suffices, the fp32 graph of the same trace already proves the symbolic batch axis
    try:
        recs = verify_graph(model, path, stage, [batch], noise, tol=float("inf"), min_psnr=FP16_MIN_PSNR)
    except Exception as e:  # onnxruntime raises its own exception types
        log.warning("%s: not verified on CPU (%s)", path.name, str(e).splitlines()[0][:200])
        return {"records": [], "skipped": f"onnxruntime CPU cannot run this fp16 graph: {str(e).splitlines()[0][:300]}"}
    return {"records": recs}


# ----------------------------------------------------------------------------------------------
# reading an export back


def read_manifest(onnx_dir: str | Path, cfg: ModelConfig | None = None, check_files: bool = True) -> dict[str, Any]:
    """Load ``manifest.json`` of an export and check it belongs to this rt_engine: export format,
    rt_engine version, model config (when ``cfg`` is given) and, with ``check_files``, the sha256 of
    every graph. Raises ExportError naming the mismatch."""
    d = Path(onnx_dir)
    mp = d / MANIFEST
    if not mp.is_file():
        raise ExportError(f"{d}: no {MANIFEST} (not an rt_engine ONNX export; run `python -m export onnx`)")
    try:
        man = json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{mp}: unreadable manifest ({e})") from None
    if man.get("format") != EXPORT_FORMAT:
        raise ExportError(
            f"{mp}: export format {man.get('format')!r} does not match this rt_engine's "
            f"{EXPORT_FORMAT!r}; re-export the graphs"
        )
    ver = rt_engine_version()
    if man.get("rt_engine_version") != ver:
        raise ExportError(
            f"{mp}: exported by rt_engine {man.get('rt_engine_version')!r}, this is {ver!r}; re-export the graphs"
        )
    if cfg is not None and ModelConfig.from_dict(man["model_config"]) != cfg:
        raise ExportError(
            f"{mp}: graphs are for model config '{man['model_config'].get('name')}', expected '{cfg.name}'"
        )
    if check_files:
        files = dict(man.get("graphs", {}))
        if man.get("noises"):
            files["noises"] = man["noises"]
        for key, g in files.items():
            p = d / g["file"]
            if not p.is_file():
                raise ExportError(f"{d}: graph {g['file']} listed in the manifest is missing")
            if sha256_file(p) != g["sha256"]:
                raise ExportError(
                    f"{p}: sha256 differs from the manifest (graph '{key}' was replaced by a file "
                    "from another export); re-export the graphs"
                )
    return man
