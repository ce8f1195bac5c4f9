"""TensorRT path: engine builds with TensorRT-RTX as the CPU stand-in, sidecar checks, runner guards.

What a CPU can prove: every exported graph parses and builds into a serialized engine (TensorRT-RTX
shares the builder/parser API with TensorRT), the sidecars describe the engines, and every
mismatch (TensorRT version, GPU architecture, model config, stale export, corrupt graph) is a clear
error raised before TensorRT touches the engine. Running engines, CUDA graphs and torch-tensorrt
need a GPU: those tests are marked ``gpu`` and skip with a reason elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

# skip only where the packages are absent; an installed but broken onnx (e.g. a protobuf older than
# its generated code) must fail loudly, not skip
for _mod in ("onnx", "onnxruntime"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} not installed (pip install rt_engine[export])", allow_module_level=True)

from export.trt_build import TrtBuildConfig, build_engines  # noqa: E402
from rt_engine.backends.tensorrt_backend import (  # noqa: E402
    ENGINE_FORMAT,
    EngineError,
    TensorRTRunner,
    buckets_for,
    check_sidecar,
    read_sidecar,
    sidecar_path,
)
from rt_engine.config import model_preset  # noqa: E402
from rt_engine.errors import RtEngineError  # noqa: E402
from rt_engine.models.pcavs import PCAVS  # noqa: E402
from rt_engine.onnx_graphs import MANIFEST, STAGES, ExportError, export_onnx, sha256_file  # noqa: E402

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = torch.cuda.is_available()
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx not installed (pip install tensorrt-rtx-cu13)")
needs_gpu_trt = pytest.mark.skipif(
    not (HAS_GPU and HAS_TRT), reason="needs an NVIDIA GPU and the `tensorrt` package (engine execution)"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = PCAVS(model_preset("tiny")).eval()
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(model, out, half=True, verify=False)  # parity is covered by test_export.py
    return model, out


@pytest.fixture(scope="module")
def rtx_engines(tiny, tmp_path_factory):
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx not installed (pip install tensorrt-rtx-cu13)")
    _, onnx_dir = tiny
    out = tmp_path_factory.mktemp("engines")
    cfg = TrtBuildConfig(runtime="rtx", precision="fp16", max_batch=8, opt_batch=4, compute_capability="SM89")
    return build_engines(onnx_dir, out, cfg), out


@needs_rtx
def test_rtx_builds_all_four_fp16(tiny, rtx_engines):
    import tensorrt_rtx

    model, onnx_dir = tiny
    engines, out = rtx_engines
    assert list(engines) == list(STAGES)
    man = json.loads((onnx_dir / MANIFEST).read_text())
    for stage, p in engines.items():
        assert p.stat().st_size > 10_000
        s = read_sidecar(p)
        assert s["runtime"] == "tensorrt_rtx" and s["trt_version"] == tensorrt_rtx.__version__
        assert s["stage"] == stage and s["precision"] == "fp16" and s["targets"] == ["SM89"]
        assert s["profiles"] == [{"min_batch": 1, "opt_batch": 4, "max_batch": 8}]
        assert s["source_onnx"] == f"{stage}.fp16.onnx"
        assert s["source_onnx_sha256"] == sha256_file(onnx_dir / f"{stage}.fp16.onnx")
        assert s["engine_sha256"] == sha256_file(p)
        assert s["weights_sha256"] == man["weights_sha256"]
        assert [i["name"] for i in s["inputs"]] == [i["name"] for i in man["graphs"][stage]["inputs"]]
        assert all(i["shape"][0] == "batch" and i["dtype"] == "float32" for i in s["inputs"] + s["outputs"])
        assert s["verification"] == {"skipped": "no CUDA GPU in the build process; engine not executed"} or HAS_GPU
    gen = read_sidecar(engines["generator"])
    assert gen["outputs"][0]["shape"] == ["batch", 3, model.cfg.size, model.cfg.size]
    # the sidecar check accepts this engine on a matching (hypothetical) GPU
    check_sidecar(
        gen,
        runtime="tensorrt_rtx",
        trt_version=tensorrt_rtx.__version__,
        capability=(8, 9),
        cfg=model.cfg,
        stage="generator",
    )


@needs_rtx
def test_rtx_builds_fp32_all_four_two_targets(tiny, tmp_path):
    _, onnx_dir = tiny
    cfg = TrtBuildConfig(runtime="rtx", precision="fp32", max_batch=2, compute_capability="SM80,SM120")
    engines = build_engines(onnx_dir, tmp_path, cfg)
    assert list(engines) == list(STAGES)
    assert all(read_sidecar(p)["source_onnx"] == f"{st}.onnx" for st, p in engines.items())
    s = read_sidecar(engines["generator"])
    assert s["targets"] == ["SM80", "SM120"] and s["source_onnx"] == "generator.onnx"


def _sidecar(rtx_engines) -> dict:
    engines, _ = rtx_engines
    return read_sidecar(engines["pose"])


@needs_rtx
def test_sidecar_mismatches_are_named(rtx_engines):
    s = _sidecar(rtx_engines)
    ok = {"runtime": "tensorrt_rtx", "trt_version": s["trt_version"], "capability": (8, 9)}
    with pytest.raises(EngineError, match=rf"built with tensorrt_rtx {s['trt_version']}, this process has 1\.0\.0"):
        check_sidecar(s, **{**ok, "trt_version": "1.0.0"})
    with pytest.raises(EngineError, match="built for GPU architecture SM89 .* this GPU is SM90"):
        check_sidecar(s, **{**ok, "capability": (9, 0)})
    with pytest.raises(EngineError, match="built with tensorrt_rtx, but this process uses tensorrt"):
        check_sidecar(s, **{**ok, "runtime": "tensorrt"})
    with pytest.raises(EngineError, match="model config 'tiny', the runner expects 'small'"):
        check_sidecar(s, **ok, cfg=model_preset("small"))
    with pytest.raises(EngineError, match="is the 'pose' engine, expected 'audio'"):
        check_sidecar(s, **ok, stage="audio")


def test_sidecar_mismatch_without_rtx():
    """The same checks on a hand-written sidecar of a TensorRT 10 engine built on an H100."""
    s = {
        "format": ENGINE_FORMAT,
        "runtime": "tensorrt",
        "trt_version": "10.13.0.35",
        "stage": "generator",
        "precision": "fp16",
        "targets": ["SM90"],
        "device": "NVIDIA H100 80GB HBM3",
        "profiles": [],
        "inputs": [],
        "outputs": [],
        "model_config": model_preset("official").to_dict(),
        "source_onnx_sha256": "0" * 64,
    }
    check_sidecar(s, runtime="tensorrt", trt_version="10.13.0.35", capability=(9, 0), cfg=model_preset("official"))
    with pytest.raises(EngineError, match=r"SM90 \(NVIDIA H100 80GB HBM3\), this GPU is SM80"):
        check_sidecar(s, runtime="tensorrt", trt_version="10.13.0.35", capability=(8, 0))
    with pytest.raises(EngineError, match="10.13.0.35, this process has 11.0.0"):
        check_sidecar(s, runtime="tensorrt", trt_version="11.0.0", capability=(9, 0))


@needs_rtx
def test_runner_refuses_bad_engine_dirs(rtx_engines, tmp_path):
    _, out = rtx_engines
    d = tmp_path / "e"
    shutil.copytree(out, d)
    # no GPU here: a clear error, not a crash inside TensorRT
    if not HAS_GPU:
        with pytest.raises(EngineError, match="needs an NVIDIA GPU"):
            TensorRTRunner(d, runtime="tensorrt_rtx")
    side = sidecar_path(d / "audio.engine")
    s = json.loads(side.read_text())
    side.write_text(json.dumps(dict(s, format="rt_engine.trt/0")))
    with pytest.raises(EngineError, match=r"sidecar format 'rt_engine.trt/0'"):
        TensorRTRunner(d, runtime="tensorrt_rtx")
    side.unlink()
    with pytest.raises(EngineError, match="engine sidecar missing"):
        TensorRTRunner(d, runtime="tensorrt_rtx")
    (d / "audio.engine").unlink()
    with pytest.raises(EngineError, match="missing audio.engine"):
        TensorRTRunner(d)


@needs_rtx
def test_build_refuses_stale_or_corrupt_export(tiny, tmp_path):
    _, onnx_dir = tiny
    d = tmp_path / "onnx"
    shutil.copytree(onnx_dir, d)
    cfg = TrtBuildConfig(runtime="rtx", max_batch=2)
    man = json.loads((d / MANIFEST).read_text())
    (d / MANIFEST).write_text(json.dumps(dict(man, rt_engine_version="0.0.1")))
    with pytest.raises(ExportError, match="exported by rt_engine '0.0.1'"):
        build_engines(d, tmp_path / "e", cfg)
    # a corrupt graph whose manifest entry was "fixed up": TensorRT's parser error becomes ExportError
    (d / "audio.fp16.onnx").write_bytes(b"\x08\x07garbage" * 100)
    man["graphs"]["audio.fp16"]["sha256"] = sha256_file(d / "audio.fp16.onnx")
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ExportError, match="audio.fp16.onnx: tensorrt_rtx cannot parse the graph"):
        build_engines(d, tmp_path / "e", cfg, stages=["audio"])
    # fp16 requested from an fp32-only export
    del man["graphs"]["pose.fp16"]
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ExportError, match="no fp16 graph for 'pose'"):
        build_engines(d, tmp_path / "e", cfg, stages=["pose"])


def test_build_config_validation():
    with pytest.raises(ExportError, match="runtime must be one of"):
        TrtBuildConfig(runtime="cuda").validate()
    with pytest.raises(ExportError, match="opt_batch must be in 0..max_batch"):
        TrtBuildConfig(max_batch=4, opt_batch=8).validate()
    with pytest.raises(ExportError, match="compute_capability is a TensorRT-RTX option"):
        TrtBuildConfig(runtime="trt", compute_capability="SM90").validate()
    assert buckets_for(1) == [1] and buckets_for(12) == [1, 2, 4, 8, 12] and buckets_for(16) == [1, 2, 4, 8, 16]


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error path")
def test_full_tensorrt_build_without_gpu_is_a_clear_error(tiny, tmp_path):
    _, onnx_dir = tiny
    with pytest.raises(RtEngineError, match="(no CUDA GPU is visible|not importable)"):
        build_engines(onnx_dir, tmp_path, TrtBuildConfig(runtime="trt", max_batch=2), stages=["audio"])


# ---------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@needs_gpu_trt
def test_gpu_engines_match_torch(tiny, tmp_path):
    from rt_engine.backends.torch_backend import TorchRunner

    model, onnx_dir = tiny
    for prec, min_psnr in (("fp32", 80.0), ("fp16", 35.0)):
        out = tmp_path / prec
        build_engines(onnx_dir, out, TrtBuildConfig(runtime="trt", precision=prec, max_batch=8))
        trt_runner = TensorRTRunner(out, cfg=model.cfg)
        ref = TorchRunner(model)
        g = torch.Generator().manual_seed(0)
        img = torch.rand(5, 3, 224, 224, generator=g) * 2 - 1
        mel = torch.rand(5, 1, 80, 20, generator=g)
        id0, id1 = ref.encode_identity(img[:1])
        want = ref.generate(id0, id1, ref.encode_audio(mel), ref.encode_pose(img))
        for _ in range(3):  # warm-up launch, capture, replay
            got = trt_runner.step(img, mel, id0, id1)
            mse = float(((got - want) ** 2).mean())
            psnr = 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-20))).item()
            assert psnr >= min_psnr, f"{prec}: PSNR {psnr:.1f} dB"
        assert trt_runner.stage("generator").bindings[8].graph is not None  # CUDA graph captured


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_GPU and importlib.util.find_spec("torch_tensorrt")), reason="needs an NVIDIA GPU and torch_tensorrt"
)
def test_gpu_torch_tensorrt_compiles(tiny, tmp_path):
    from export.torch_trt import compile_torch_trt, load_torch_trt

    model, _ = tiny
    paths = compile_torch_trt(model, tmp_path, precision="fp16", max_batch=4)
    mods = load_torch_trt(tmp_path)
    assert set(paths) == set(mods) == set(STAGES)
    mel = torch.rand(3, 1, 80, 20, device="cuda")
    with torch.inference_mode():
        ref = model.encode_mouth(mel.cpu())
    got = mods["audio"](mel).float().cpu()
    assert torch.allclose(got, ref, atol=5e-2 * max(1.0, float(ref.abs().max())))


def test_torch_tensorrt_without_gpu_is_a_clear_error(tmp_path):
    if HAS_GPU and importlib.util.find_spec("torch_tensorrt"):
        pytest.skip("torch_tensorrt is usable here; covered by test_gpu_torch_tensorrt_compiles")
    from export.torch_trt import compile_torch_trt

    with pytest.raises(ExportError, match="(torch_tensorrt not importable|no CUDA GPU)"):
        compile_torch_trt(PCAVS(model_preset("tiny")), tmp_path)


def test_engine_dir_missing_is_named(tmp_path):
    with pytest.raises(EngineError, match="engine directory not found"):
        TensorRTRunner(tmp_path / "nope")


@needs_rtx
def test_rtx_generator_with_noise_inputs(tmp_path):
    torch.manual_seed(1)
    model = PCAVS(model_preset("tiny")).eval()
    export_onnx(model, tmp_path / "onnx", noise="input", stages=("generator",), half=True, verify=False)
    engines = build_engines(
        tmp_path / "onnx", tmp_path / "e", TrtBuildConfig(runtime="rtx", max_batch=4), stages=["generator"]
    )
    s = read_sidecar(engines["generator"])
    assert s["noise"] == "input"
    assert [i["name"] for i in s["inputs"]] == ["style", "id_map"] + [f"noise_{i}" for i in range(9)]
    assert (tmp_path / "e" / "noises.npz").is_file()  # the stored maps travel with the engines
