"""ONNX export: parity with PyTorch through ONNX Runtime, graph checks, manifest, bad input.

Parity is recomputed here (not read back from verification.json): ONNX Runtime on the exported
graph vs the PyTorch model in its official per-sample-weight form, at the export batch and at
other batch sizes. Random small models only; no bundled weights.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# skip only where the packages are absent; an installed but broken onnx (e.g. a protobuf older than
# its generated code) must fail loudly, not skip
for _mod in ("onnx", "onnxruntime"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} not installed (pip install rt_engine[export])", allow_module_level=True)

import onnx  # noqa: E402

from export.__main__ import main as export_main  # noqa: E402
from rt_engine.config import ModelConfig, model_preset  # noqa: E402
from rt_engine.models.checkpoint import save_single  # noqa: E402
from rt_engine.models.modconv import NoiseInjection  # noqa: E402
from rt_engine.models.pcavs import PCAVS  # noqa: E402
from rt_engine.onnx_graphs import (  # noqa: E402
    BATCH_AXIS,
    MANIFEST,
    NOISES,
    STAGES,
    SUPPORTED_OPS,
    VERIFICATION,
    ExportError,
    check_graph,
    example_inputs,
    export_onnx,
    ort_session,
    read_manifest,
    rt_engine_version,
    sha256_file,
    stage_io,
    weights_sha256,
)

TOL = 1e-4


def _model(preset: str, seed: int = 0) -> PCAVS:
    torch.manual_seed(seed)
    m = PCAVS(model_preset(preset)).eval()
    # give the BatchNorms non-trivial statistics so folding them into the convs is exercised
    g = torch.Generator().manual_seed(seed + 1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
        if isinstance(mod, NoiseInjection):  # zero-initialised: make the noise path matter
            mod.weight.data.fill_(0.3)
    return m


def _torch_outputs(model: PCAVS, stage: str, feeds: dict[str, torch.Tensor], noise: str) -> list[np.ndarray]:
    model.generator.set_form("ref")
    with torch.inference_mode():
        if stage == "identity":
            outs = list(model.encode_identity(feeds["img"]))
        elif stage == "pose":
            outs = [model.encode_pose(feeds["img"])]
        elif stage == "audio":
            outs = [model.encode_mouth(feeds["mel"])]
        else:
            nz = [v for k, v in feeds.items() if k.startswith("noise_")] if noise == "input" else noise
            outs = [model.generator(feeds["style"], feeds["id_map"], nz)]
    return [o.numpy() for o in outs]


def _assert_parity(model: PCAVS, graph: Path, stage: str, batch: int, noise: str = "stored") -> float:
    """ORT vs PyTorch on fresh random inputs; returns the max abs error seen."""
    feeds = example_inputs(model.cfg, stage, batch, noise, seed=100 + batch)
    ref = _torch_outputs(model, stage, feeds, noise)
    _, outs = stage_io(model.cfg, stage, noise)
    got = ort_session(graph).run([o.name for o in outs], {k: v.numpy() for k, v in feeds.items()})
    worst = 0.0
    for spec, r, o in zip(outs, ref, got, strict=True):
        assert o.shape == r.shape, f"{stage}/{spec.name}: shape {o.shape} vs {r.shape}"
        assert np.isfinite(o).all()
        err = float(np.abs(o - r).max())
        if spec.name == "image":
            assert np.abs(r).max() <= 1.0 and 0.05 < np.abs(r).mean() < 0.95, "generator output degenerate"
            assert err <= TOL, f"{stage}/{spec.name} batch {batch}: max abs {err:.3g} > {TOL}"
        else:  # features: tolerance relative to their scale
            assert err <= TOL * max(1.0, float(np.abs(r).max())), f"{stage}/{spec.name} batch {batch}: {err:.3g}"
        worst = max(worst, err)
    return worst


def _weight_count(model: PCAVS, stage: str) -> int:
    """Elements of the conv/linear weights a stage graph must hold (BatchNorms fold into them)."""
    pe = model.pose_encoder
    mods = {
        "identity": [model.identity_encoder],
        "pose": [pe.model, pe.to_headpose, pe.headpose_embed],
        "audio": [model.audio_encoder, pe.mouth_embed],
        "generator": [model.generator],
    }[stage]
    return sum(p.numel() for m in mods for n, p in m.named_parameters() if n.endswith("weight") and p.ndim >= 2)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    torch.set_num_threads(1)
    model = _model("tiny")
    ckpt = save_single(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    out = tmp_path_factory.mktemp("onnx_tiny")
    paths = export_onnx(model, out, batch=1, noise="stored", half=True, checkpoint=ckpt)
    return model, out, paths, ckpt


def test_export_returns_four_graphs(tiny_export):
    _, out, paths, _ = tiny_export
    assert list(paths) == list(STAGES)
    for stage, p in paths.items():
        assert p == out / f"{stage}.onnx" and p.is_file()
        assert (out / f"{stage}.fp16.onnx").is_file()


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("batch", [1, 5])
def test_tiny_parity(tiny_export, stage, batch):
    model, _, paths, _ = tiny_export
    _assert_parity(model, paths[stage], stage, batch)


def test_export_leaves_model_form(tiny_export):
    model, *_ = tiny_export
    model.generator.set_form("ref")
    export_onnx(model, Path(tiny_export[1]).parent / "again", stages=("generator",), verify=False)
    assert {m.form for m in model.modules() if hasattr(m, "form")} == {"ref"}


@pytest.mark.parametrize("stage", STAGES)
def test_graph_checks(tiny_export, stage):
    model, out, paths, _ = tiny_export
    for path in (paths[stage], out / f"{stage}.fp16.onnx"):
        info = check_graph(path, stage, model.cfg)
        m = onnx.load(str(path))
        inits = {t.name for t in m.graph.initializer}
        # weights are initializers: the only graph inputs are the data inputs
        assert [i.name for i in m.graph.input if i.name not in inits] == [s.name for s in stage_io(model.cfg, stage)[0]]
        assert info["weighted_nodes"] > 0
        n_init = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
        assert n_init >= _weight_count(model, stage)  # every conv/linear weight is stored in the graph
        for v in list(m.graph.input) + list(m.graph.output):
            dims = v.type.tensor_type.shape.dim
            assert dims[0].dim_param == BATCH_AXIS
            assert all(d.dim_value > 0 for d in dims[1:])
        assert set(info["ops"]) <= SUPPORTED_OPS


def test_fp16_variant_keeps_demodulation_fp32(tiny_export):
    _, out, _, _ = tiny_export
    m = onnx.load(str(out / "generator.fp16.onnx"))
    types = {t.name: t.data_type for t in m.graph.initializer}
    # the styled 3x3 convs (and their upsampling/blur) compute in fp16; ToRGB may stay fp32 by design
    conv_w = [
        types[n.input[1]]
        for n in m.graph.node
        if n.op_type in ("Conv", "ConvTranspose") and n.input[1] in types and "to_rgb" not in n.name
    ]
    demod = [types[n.input[1]] for n in m.graph.node if n.op_type == "MatMul"]
    assert len(conv_w) >= model_preset("tiny").num_noises and set(conv_w) == {onnx.TensorProto.FLOAT16}
    assert len(demod) == model_preset("tiny").num_noises  # one per demodulated (styled) conv
    assert set(demod) == {onnx.TensorProto.FLOAT}
    io = [v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)]
    assert set(io) == {onnx.TensorProto.FLOAT}


def test_verification_and_manifest(tiny_export):
    model, out, paths, ckpt = tiny_export
    ver = json.loads((out / VERIFICATION).read_text())
    for stage in STAGES:
        recs = ver["graphs"][stage]["records"]
        assert sorted({r["batch"] for r in recs}) == [1, 3]
        assert all(r["passed"] and r["max_rel"] <= TOL and r["psnr_db"] > 80 for r in recs)
    man = json.loads((out / MANIFEST).read_text())
    assert man["rt_engine_version"] == rt_engine_version()
    assert ModelConfig.from_dict(man["model_config"]) == model.cfg
    assert man["weights_sha256"] == weights_sha256(model)
    assert man["checkpoint_sha256"] == sha256_file(ckpt)
    assert man["opset"] == 17 and man["noise"] == "stored"
    for stage, p in paths.items():
        g = man["graphs"][stage]
        assert g["sha256"] == sha256_file(p)
        assert [i["name"] for i in g["inputs"]] == [s.name for s in stage_io(model.cfg, stage)[0]]
        assert g["outputs"][0]["shape"][0] == BATCH_AXIS
    meta = {p.key: p.value for p in onnx.load(str(paths["generator"])).metadata_props}
    assert meta["stage"] == "generator" and meta["weights_sha256"] == man["weights_sha256"]
    assert read_manifest(out, model.cfg)["graphs"].keys() == man["graphs"].keys()


def test_noise_as_input_and_zero(tmp_path):
    model = _model("tiny", seed=3)
    for noise in ("input", "zero"):
        paths = export_onnx(model, tmp_path / noise, noise=noise, stages=("generator",), batch=2, verify=False)
        m = onnx.load(str(paths["generator"]))
        names = [i.name for i in m.graph.input]
        if noise == "input":
            assert names == ["style", "id_map"] + [f"noise_{i}" for i in range(model.cfg.num_noises)]
            # the stored maps ship beside the graph: fed back they reproduce noise="stored"
            with np.load(tmp_path / noise / NOISES) as z:
                feeds = {k: np.repeat(z[k], 2, axis=0) for k in z.files}
            x = example_inputs(model.cfg, "generator", 2)
            got = ort_session(paths["generator"]).run(["image"], {**{k: v.numpy() for k, v in x.items()}, **feeds})[0]
            want = _torch_outputs(model, "generator", x, "stored")[0]
            assert np.abs(got - want).max() <= TOL
            assert read_manifest(tmp_path / noise)["noises"]["file"] == NOISES
        else:
            assert names == ["style", "id_map"]
            assert not (tmp_path / noise / NOISES).exists()
        for b in (1, 2, 4):
            _assert_parity(model, paths["generator"], "generator", b, noise)


def test_manifest_mismatch_is_named(tiny_export, tmp_path):
    model, out, _, _ = tiny_export
    d = tmp_path / "copy"
    shutil.copytree(out, d)
    man = json.loads((d / MANIFEST).read_text())

    stale = dict(man, rt_engine_version="0.0.1")
    (d / MANIFEST).write_text(json.dumps(stale))
    with pytest.raises(ExportError, match=r"rt_engine '0\.0\.1'"):
        read_manifest(d)

    (d / MANIFEST).write_text(json.dumps(dict(man, format="rt_engine.onnx/0")))
    with pytest.raises(ExportError, match="export format"):
        read_manifest(d)

    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ExportError, match="model config 'tiny'"):
        read_manifest(d, model_preset("small"))

    # a graph file from another export (other weights) put into this export
    other = export_onnx(_model("tiny", seed=7), tmp_path / "other", stages=("audio",), verify=False)
    shutil.copy(other["audio"], d / "audio.onnx")
    with pytest.raises(ExportError, match=r"audio\.onnx: sha256 differs"):
        read_manifest(d)

    (d / "audio.onnx").unlink()
    with pytest.raises(ExportError, match="missing"):
        read_manifest(d)
    with pytest.raises(ExportError, match="no manifest.json"):
        read_manifest(tmp_path)


def test_check_graph_rejects_dynamic_weights_and_static_batch(tmp_path):
    from onnx import TensorProto, helper

    cfg = model_preset("tiny")
    a = helper.make_tensor_value_info("mel", TensorProto.FLOAT, [BATCH_AXIS, 1, 80, 20])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [cfg.mouth_dim, 20])
    y = helper.make_tensor_value_info("mouth", TensorProto.FLOAT, [BATCH_AXIS, cfg.mouth_dim])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 20])
    nodes = [
        helper.make_node("Reshape", ["mel", "shape"], ["r"]),
        helper.make_node("Gemm", ["r", "w"], ["mouth"], transB=1),
    ]
    g = helper.make_graph(nodes, "bad", [a, w], [y], initializer=[shape])
    p = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    with pytest.raises(ExportError, match="inputs are"):
        check_graph(p, "audio", cfg)

    a_static = helper.make_tensor_value_info("mel", TensorProto.FLOAT, [4, 1, 80, 20])
    g = helper.make_graph([helper.make_node("Identity", ["mel"], ["mouth"])], "b", [a_static], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    with pytest.raises(ExportError, match="symbolic axis 'batch'"):
        check_graph(p, "audio", cfg)

    g = helper.make_graph([helper.make_node("Erf", ["mel"], ["mouth"])], "b", [a], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    with pytest.raises(ExportError, match=r"unsupported operators \['Erf'\]"):
        check_graph(p, "audio", cfg)


def test_cli_checkpoint_config_mismatch(tmp_path, capsys):
    ckpt = save_single(_model("tiny"), tmp_path / "tiny.safetensors")
    rc = export_main(["onnx", "--checkpoint", str(ckpt), "--preset", "small", "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "config 'tiny' does not match the requested config 'small'" in err
    assert not (tmp_path / "o" / MANIFEST).exists()


def test_bad_arguments():
    m = _model("tiny")
    with pytest.raises(ExportError, match="noise must be one of"):
        export_onnx(m, "/nonexistent", noise="random")
    with pytest.raises(ExportError, match="batch must be >= 1"):
        export_onnx(m, "/nonexistent", batch=0)
    with pytest.raises(ExportError, match="opset 11 not supported"):
        export_onnx(m, "/nonexistent", opset=11)


def test_small_preset_cli_export_batch2(tmp_path, capsys):
    """The CLI on a small-preset checkpoint, traced at batch 2, verified at 1 and 3 here."""
    torch.set_num_threads(1)
    model = _model("small", seed=5)
    ckpt = save_single(model, tmp_path / "small.safetensors")
    rc = export_main(
        [
            "onnx",
            "--checkpoint",
            str(ckpt),
            "--preset",
            "small",
            "--out",
            str(tmp_path / "o"),
            "--batch",
            "2",
            "--no-fp16",
            "--no-verify",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    man = read_manifest(tmp_path / "o", model.cfg)
    assert man["export_batch"] == 2 and man["checkpoint_sha256"] == sha256_file(ckpt)
    for stage in STAGES:
        for b in (1, 3):
            _assert_parity(model, tmp_path / "o" / f"{stage}.onnx", stage, b)


@pytest.mark.slow
def test_official_size_parity(tmp_path):
    torch.set_num_threads(2)
    model = _model("official", seed=11)
    paths = export_onnx(model, tmp_path, batch=1, verify=False)
    for stage in STAGES:
        for b in (1, 2):
            _assert_parity(model, paths[stage], stage, b)
