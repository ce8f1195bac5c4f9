"""Real browser: headless Chromium (Debian packages) loads the page, starts a session with a fake
microphone and webcam played from files, and the page reports decoded frames.

Needs ``apt-get install -y chromium chromium-driver`` and ``pip install selenium``; skipped with a
reason otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rt_engine.serve.app import STATE
from tests.conftest import served

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _write_y4m(path: Path, frames: np.ndarray) -> None:
    import cv2

    h, w = frames.shape[1:3]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F25:1 Ip A1:1 C420jpeg\n".encode())
        for img in frames:
            f.write(b"FRAME\n")
            f.write(cv2.cvtColor(img, cv2.COLOR_RGB2YUV_I420).tobytes())  # [H*3/2,W] planar


def _write_wav48(path: Path) -> None:
    import soundfile as sf

    from rt_engine.inputs.audio import load_audio

    sf.write(path, load_audio(ROOT / "rt_engine/assets/speech.flac", 48000), 48000, subtype="PCM_16")


class _ServerThread:
    """The real server in its own event loop thread (selenium blocks the test thread)."""

    def __init__(self, engine):
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.url: str | None = None
        self.app = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self):
        self._stop = asyncio.Event()
        async with served(self.engine) as (url, app):
            self.url, self.app = url, app
            self.ready.set()
            await self._stop.wait()

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(30), "server did not start"
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        self.loop.close()


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian chromium + chromium-driver (apt-get install -y chromium chromium-driver)",
)
def test_browser_page_streams_with_fake_mic_and_webcam(tiny_engine, tmp_path):
    selenium = pytest.importorskip("selenium", reason="needs selenium (pip install selenium==4.51.0)")
    del selenium
    import cv2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    img = cv2.cvtColor(cv2.imread(str(ROOT / "rt_engine/assets/identity.jpg")), cv2.COLOR_BGR2RGB)
    _write_y4m(tmp_path / "cam.y4m", np.stack([np.roll(img, (k % 10) - 5, axis=1) for k in range(50)]))
    _write_wav48(tmp_path / "mic.wav")
    home = tmp_path / "home"
    home.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={tmp_path / 'cam.y4m'}",
        f"--use-file-for-fake-audio-capture={tmp_path / 'mic.wav'}",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        opts.add_argument(flag)
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        with _ServerThread(tiny_engine) as srv:
            driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
            try:
                driver.get(srv.url + "/")
                driver.find_element(By.CSS_SELECTOR, 'input[name="pose"][value="webcam"]').click()
                driver.find_element(By.ID, "start").click()
                decoded = 0
                t = time.monotonic()
                while time.monotonic() - t < 60 and decoded < 50:
                    time.sleep(1.0)
                    decoded = int(driver.find_element(By.ID, "decoded").text or 0)
                status = driver.find_element(By.ID, "status").text
                stats = driver.find_element(By.ID, "stats").text
                sessions = list(srv.app[STATE].sessions.values())
                server = sessions[0].session.describe() if sessions else {}
                driver.find_element(By.ID, "stop").click()
                time.sleep(1.0)
            finally:
                driver.quit()
    finally:
        if old_home is not None:
            os.environ["HOME"] = old_home
    print({"decoded": decoded, "status": status, "server": server})
    print(stats)
    assert decoded >= 50, (status, stats)
    assert server.get("audio_input") and server.get("pose") == "webcam"
