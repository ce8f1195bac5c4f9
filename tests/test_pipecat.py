"""The Pipecat video service in a real Pipecat pipeline, offline: a source plays the bundled speech
as TTS frames, our service makes the face, a sink collects what a transport would get."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="pipecat-ai not installed (pip install 'rt_engine[pipecat]')")

from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from rt_engine.integrations.pipecat import RtEngineVideoService  # noqa: E402
from tests.avatar_checks import Shown, check_barge_in, check_rate_and_sync, speech  # noqa: E402

pytestmark = pytest.mark.timeout(120)
TTS_RATE = 24000


class SpeechSource(FrameProcessor):
    """Plays a clip as a TTS would: TTSStarted, 20 ms TTSAudioRawFrames (faster than real time), TTSStopped."""

    def __init__(self, pcm: np.ndarray):
        super().__init__()
        self.pcm = pcm

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(TTSStartedFrame())
            for k in range(0, self.pcm.size, TTS_RATE // 50):
                await self.push_frame(
                    TTSAudioRawFrame(
                        audio=self.pcm[k : k + TTS_RATE // 50].tobytes(), sample_rate=TTS_RATE, num_channels=1
                    )
                )
            await self.push_frame(TTSStoppedFrame())


class Sink(FrameProcessor):
    """Collects images and audio like an output transport, and anything that comes after EndFrame."""

    def __init__(self):
        super().__init__()
        self.shown: list[Shown] = []
        self.audio: list[np.ndarray] = []
        self.received = 0
        self.tts_passed = 0
        self.ended = False
        self.after_end = 0
        self.cleared_at: int | None = None
        self.images = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if self.ended and isinstance(frame, (OutputImageRawFrame, OutputAudioRawFrame)):
            self.after_end += 1
        if isinstance(frame, TTSAudioRawFrame):
            self.tts_passed += 1
        elif isinstance(frame, OutputImageRawFrame):
            w, h = frame.size
            meta = frame.metadata["rt_engine"]
            img = np.frombuffer(frame.image, np.uint8).reshape(h, w, 3)
            self.shown.append(Shown(img, self.received, meta["index"], self.cleared_at is not None))
            self.shown[-1].fresh = meta["fresh"]
            self.images.set()
        elif isinstance(frame, OutputAudioRawFrame):
            assert frame.sample_rate == 48000 and frame.num_channels == 1
            x = np.frombuffer(frame.audio, "<i2").astype(np.float32) / 32768
            self.audio.append(x)
            self.received += x.size
        elif isinstance(frame, EndFrame):
            self.ended = True
        await self.push_frame(frame, direction)


async def _until(sink: Sink, n: int) -> None:
    while len(sink.shown) < n:
        sink.images.clear()
        await asyncio.wait_for(sink.images.wait(), 30)


def test_pipecat_pipeline_speech_interruption_and_end(avatar_engine):
    async def run():
        sink = Sink()
        service = RtEngineVideoService(avatar_engine, pose="still")
        worker = PipelineWorker(
            Pipeline([SpeechSource(speech(TTS_RATE, 3.0)), service, sink]),
            idle_timeout_secs=None,
            enable_rtvi=False,
            check_dangling_tasks=False,
        )

        async def drive():
            await _until(sink, 30)  # 1.2 s of speech shown
            sink.cleared_at = sink.received
            await worker.queue_frame(InterruptionFrame())
            await _until(sink, 30 + 25)  # 1 s of silence
            await worker.queue_frame(EndFrame())

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await asyncio.gather(runner.run(), drive())
        return sink, service

    sink, service = asyncio.run(run())
    assert sink.ended and sink.after_end == 0  # nothing after the EndFrame
    assert sink.tts_passed == 0  # the original TTS audio is not passed on
    assert service.avatar is None  # the stream was closed
    audio = np.concatenate(sink.audio)
    check_rate_and_sync(sink.shown, sink.received)
    held = sum(not s.fresh for s in sink.shown if s.after_clear)
    check_barge_in(sink.shown, audio, sink.cleared_at, held_after=held)
    idx = [s.index for s in sink.shown]
    assert all(b > a for a, b in zip(idx, idx[1:], strict=False))  # one clock, no jump back


def test_echo_example_serves_pages_and_sessions(avatar_engine):
    """examples/pipecat_echo_avatar.py: its pages and the session handshake (the WebRTC part was run
    against headless Chromium by hand, see docs/agents.md)."""
    import importlib.util
    from pathlib import Path

    import aiohttp
    from aiohttp import web

    pytest.importorskip("pipecat_ai_small_webrtc_prebuilt", reason="pipecat-ai-small-webrtc-prebuilt not installed")
    path = Path(__file__).resolve().parents[1] / "examples" / "pipecat_echo_avatar.py"
    spec = importlib.util.spec_from_file_location("pipecat_echo_avatar", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    async def run():
        app = mod.create_app(avatar_engine, own_engine=False)  # the shared test engine stays open
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{url}/local") as r:
                    local = (r.status, await r.text())
                async with http.get(f"{url}/client/") as r:
                    client = (r.status, await r.text())
                async with http.post(f"{url}/start", json={}) as r:
                    sid = (await r.json())["sessionId"]
                async with http.post(f"{url}/sessions/nope/api/offer", json={"sdp": "", "type": "offer"}) as r:
                    bad = r.status
        finally:
            await runner.cleanup()
        return local, client, sid, bad

    local, client, sid, bad = asyncio.run(run())
    assert local[0] == 200 and "/api/offer" in local[1] and "RTCPeerConnection" in local[1]
    assert client[0] == 200 and '<div id="root">' in client[1]
    assert len(sid) == 36 and bad == 404


@pytest.mark.browser
@pytest.mark.timeout(240)
def test_echo_example_streams_to_headless_chromium(avatar_engine, tmp_path):
    """examples/pipecat_echo_avatar.py's offline page in headless Chromium with a fake microphone
    playing the bundled speech: the avatar's video plays (frames decoded, time advancing)."""
    import importlib.util
    import os
    import shutil
    import threading
    import time
    from pathlib import Path

    import soundfile as sf
    from aiohttp import web

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if chromium is None or driver_bin is None:
        pytest.skip("needs Debian chromium + chromium-driver (apt-get install -y chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium not installed")
    pytest.importorskip("pipecat_ai_small_webrtc_prebuilt", reason="pipecat-ai-small-webrtc-prebuilt not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    path = Path(__file__).resolve().parents[1] / "examples" / "pipecat_echo_avatar.py"
    spec = importlib.util.spec_from_file_location("pipecat_echo_avatar", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sf.write(tmp_path / "mic.wav", speech(48000, 10.0), 48000, subtype="PCM_16")

    loop = asyncio.new_event_loop()
    ready, stop = threading.Event(), []

    async def serve() -> None:
        app = mod.create_app(avatar_engine, own_engine=False)  # the shared test engine stays open
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        stop.append(asyncio.Event())
        stop.append(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")
        ready.set()
        await stop[0].wait()
        await runner.cleanup()

    th = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    th.start()
    assert ready.wait(30)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={tmp_path / 'mic.wav'}",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(flag)
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(tmp_path)
    try:
        driver = webdriver.Chrome(options=opts, service=Service(driver_bin))
        try:
            driver.get(stop[1] + "/local")
            driver.find_element(By.ID, "start").click()
            got, t = {}, time.monotonic()
            while time.monotonic() - t < 60 and got.get("frames", 0) < 75:
                time.sleep(1.0)
                got = driver.execute_script(
                    "const v = document.getElementById('video');"
                    "return {w: v.videoWidth, t: v.currentTime, frames: v.getVideoPlaybackQuality().totalVideoFrames,"
                    " state: document.getElementById('state').textContent};"
                )
        finally:
            driver.quit()
    finally:
        if old_home is not None:
            os.environ["HOME"] = old_home
        loop.call_soon_threadsafe(stop[0].set)
        th.join(30)
        loop.close()
    print(got)
    assert got["state"] == "connected" and got["w"] == avatar_engine.runner.cfg.size
    assert got["frames"] >= 75 and got["t"] > 2.0, got
