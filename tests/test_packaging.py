"""The runtime package stands alone: it imports none of the repository's tools, and a wheel
installed outside the checkout serves with the OpenVINO backend.

The import scan is quick and always runs. The wheel check (``slow``) builds the wheel without the
native kernels, installs it into a fresh venv beside the current site-packages (torch, openvino and
the other dependencies are reused, not downloaded), starts ``python -m rt_engine.serve`` from an
empty folder and asks ``/health`` which backend it runs.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rt_engine"
REPO_TOOLS = ("export", "benchmarks", "training", "tests", "scripts")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_runtime_never_imports_repo_tools():
    bad = [
        f"{p.relative_to(REPO)}:{line} imports {mod}"
        for p in sorted(PACKAGE.rglob("*.py"))
        for line, mod in imported_modules(p)
        if mod.split(".")[0] in REPO_TOOLS
    ]
    assert not bad, "the wheel ships only rt_engine; these imports break an installed runtime:\n" + "\n".join(bad)


def test_import_scan_sees_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from export.trt_build import build_engines\n    import training.data\n")
    assert [m for _, m in imported_modules(f)] == ["export.trt_build", "training.data"]


def test_kernel_sources_ship_in_the_package():
    from rt_engine.models import fused_modconv as fm

    assert fm.KERNEL_DIR.parent == PACKAGE
    assert all((fm.KERNEL_DIR / rel).is_file() for rel in fm._SOURCES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_wheel_outside_checkout_serves_openvino(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    wheels = tmp_path / "wheels"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "-q",
            "-w",
            str(wheels),
            "-C",
            "cmake.define.RT_ENGINE_BUILD_KERNELS=OFF",
        ],
        check=True,
        env=env,
        timeout=600,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    wheel = next(wheels.glob("rt_engine-*.whl"))
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, env=env)
    run_dir = tmp_path / "elsewhere"  # no checkout on sys.path: only the installed package
    run_dir.mkdir()
    where = subprocess.run(
        [str(py), "-c", "import rt_engine, sys; print(rt_engine.__file__)"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert str(venv) in where, f"rt_engine imported from {where}, not from the venv"

    port = _free_port()
    env["RT_ENGINE_ONNX_CACHE"] = str(tmp_path / "onnx")  # a first start: the graphs are built from the wheel
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(py), "-m", "rt_engine.serve", "--port", str(port), "--backend", "auto"],
        cwd=run_dir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        health = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    health = json.loads(r.read())
                if health.get("warm"):
                    break
            except OSError:
                pass
            time.sleep(1.0)
        out = (tmp_path / "serve.log").read_text()
        assert health is not None and health.get("warm"), f"server did not come up:\n{out[-3000:]}"
        assert health["model"].startswith("openvino"), f"/health: {health}\n{out[-3000:]}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
