"""Shared pytest fixtures.

Streaming / server fixtures: a random ``tiny`` model saved to a temp dir (never the bundled
weights), an :class:`rt_engine.stream.session.Engine` on it, and :func:`served`, an async context
manager that runs the real aiohttp server on 127.0.0.1 (random port) in the test's event loop.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch


def shared_dir() -> Path | None:
    p = Path(os.environ.get("RT_ENGINE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from rt_engine.config import model_preset
    from rt_engine.models.checkpoint import save_single
    from rt_engine.models.pcavs import PCAVS

    torch.manual_seed(0)
    model = PCAVS(model_preset("tiny"))
    return save_single(
        model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", provenance={"kind": "random tiny model for tests"}
    )


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from rt_engine.backends.torch_backend import TorchRunner
    from rt_engine.models.checkpoint import load_checkpoint
    from rt_engine.stream.session import Engine

    torch.set_num_threads(1)
    engine = Engine(TorchRunner(load_checkpoint(tiny_checkpoint)), threads=1)
    yield engine
    engine.close()


@contextlib.asynccontextmanager
async def served(engine, **cfg):
    """Run the server on 127.0.0.1:<free port>; yields (base url, app)."""
    from aiohttp import web

    from rt_engine.serve.app import ServerConfig, create_app

    # the tiny model's measured capacity on a loaded test machine decides nothing here, unless asked
    cfg.setdefault("admit_by_capacity", False)
    app = create_app(engine, ServerConfig(port=0, **cfg), own_engine=False)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


@pytest.fixture(scope="session")
def avatar_engine(tiny_checkpoint):
    """An engine for avatar streams: the tiny model, wrapped so that frames show whether the mouth is
    closed (tests.avatar_checks.MouthProbe), and 200 ms of compute margin, so that a busy CI machine
    still makes every frame in time (these tests check content and timestamps, not speed)."""
    from rt_engine.backends.torch_backend import TorchRunner
    from rt_engine.models.checkpoint import load_checkpoint
    from rt_engine.stream.clock import ClockConfig
    from rt_engine.stream.session import Engine

    torch.set_num_threads(1)
    from tests.avatar_checks import MouthProbe

    runner = MouthProbe(TorchRunner(load_checkpoint(tiny_checkpoint)))
    engine = Engine(runner, clock_cfg=ClockConfig(margin_s=0.2), threads=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """A fresh ONNX graph cache per test module (exports are shared within it, never the user's cache)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RT_ENGINE_ONNX_CACHE", str(tmp_path_factory.mktemp("onnx")))
    yield
    mp.undo()
