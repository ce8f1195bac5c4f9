"""The LiveKit Agents video generator driven with real livekit.rtc.AudioFrame objects, offline (no
server, no room): rate, A/V on one clock, barge-in, utterance ends; the worker's load report."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="livekit-agents not installed (pip install 'rt_engine[livekit]')")

from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd  # noqa: E402

from rt_engine.integrations.livekit import LoadMeter, RtEngineVideoGenerator, make_server  # noqa: E402
from tests.avatar_checks import Shown, check_barge_in, check_rate_and_sync, speech  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _frames(pcm: np.ndarray, rate: int, ms: int = 100) -> list[rtc.AudioFrame]:
    n = rate * ms // 1000  # DataStreamAudioReceiver hands out 100 ms frames by default
    return [rtc.AudioFrame(pcm[k : k + n].tobytes(), rate, 1, pcm[k : k + n].size) for k in range(0, pcm.size, n)]


def test_video_generator_with_rtc_audio_frames(avatar_engine):
    async def run():
        gen = await RtEngineVideoGenerator.create(avatar_engine, pose="still")
        for f in _frames(speech(48000, 3.0), 48000):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        shown, audio, received, cleared_at, ends_before, ends_after = [], [], 0, None, 0, 0
        pushed2 = False
        async for item in gen:
            if isinstance(item, rtc.VideoFrame):
                assert item.type == rtc.VideoBufferType.RGB24
                img = np.frombuffer(item.data, np.uint8).reshape(item.height, item.width, 3)
                shown.append(Shown(img.copy(), received, after_clear=cleared_at is not None))
            elif isinstance(item, rtc.AudioFrame):
                assert item.sample_rate == 48000 and item.num_channels == 1
                shown[-1].index, shown[-1].fresh = item.userdata["index"], item.userdata["fresh"]
                audio.append(np.frombuffer(item.data, np.int16).astype(np.float32) / 32768)
                received += item.samples_per_channel
            else:
                assert isinstance(item, AudioSegmentEnd)
                ends_before += cleared_at is None
                ends_after += cleared_at is not None
            if cleared_at is None and len(shown) == 30:
                gen.clear_buffer()
                cleared_at = received
                # a new short utterance after the barge-in, at another rate: it plays, then ends
            if len(shown) == 30 + 25 and not pushed2:
                pushed2 = True
                for f in _frames(speech(16000, 0.4), 16000):
                    await gen.push_audio(f)
                await gen.push_audio(AudioSegmentEnd())
            if len(shown) >= 30 + 25 + 25 and isinstance(item, rtc.AudioFrame):
                break
        await gen.aclose()
        return shown, np.concatenate(audio), received, cleared_at, ends_before, ends_after

    shown, audio, received, cleared_at, ends_before, ends_after = asyncio.run(run())
    check_rate_and_sync(shown, received)
    upto = 30 + 25  # the barge-in part; the last 25 frames carry the second utterance
    held = sum(not s.fresh for s in shown[30:upto])
    check_barge_in(shown[:upto], audio[: shown[upto].audio_before], cleared_at, held_after=held)
    assert ends_before == 0 and ends_after == 1  # the cut utterance never ends; the second one does
    assert np.abs(audio[shown[upto].audio_before :]).max() > 0.05  # the second utterance played


def test_load_meter_reports_the_model_busy_share():
    class FakeScheduler:
        busy_s = 0.0

    class FakeEngine:
        scheduler = FakeScheduler()

    eng = FakeEngine()
    meter = LoadMeter(eng, window_s=0.5)
    assert meter() == 0.0
    t0 = time.monotonic()
    time.sleep(0.2)
    eng.scheduler.busy_s = 0.5 * (time.monotonic() - t0)  # busy half of the time
    assert meter() == pytest.approx(0.5, abs=0.05)
    time.sleep(0.6)  # idle for longer than the window: the share falls
    assert meter() < 0.2


def test_worker_server_reports_load_and_registers_the_avatar_job(avatar_engine):
    made = []
    server = make_server(lambda: made.append(1) or avatar_engine, pose="still", load_threshold=0.75)
    assert server.load_fnc() == 0.0 and not made  # no engine before the first job
    assert server._load_threshold == 0.75
