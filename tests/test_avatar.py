"""The in-process avatar stream (rt_engine.stream.avatar): speech in at any rate, frames out on the
audio-master clock, barge-in, idle frames in silence. Real sessions on the tiny model, no transport."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from rt_engine.config import FIRST_FRAME
from rt_engine.stream.avatar import AvatarStream
from tests.avatar_checks import FRAME_AUDIO, Shown, check_barge_in, is_closed, speech

pytestmark = pytest.mark.timeout(120)


def test_speech_then_barge_in_closes_the_mouth_without_a_timestamp_jump(avatar_engine):
    async def run():
        av = await AvatarStream.open(avatar_engine, pose="still")
        pcm = speech(24000, 3.0)
        for k in range(0, pcm.size, 480):  # TTS-like: 20 ms chunks, all at once
            av.push_audio(pcm[k : k + 480], 24000)
        av.end_segment()
        frames, shown, received, cleared_at, cut, t_clear = [], [], 0, None, None, None
        async for f in av:
            frames.append(f)
            shown.append(Shown(f.image, received, f.index, after_clear=cleared_at is not None))
            received += f.audio.size
            if cleared_at is None and f.index >= FIRST_FRAME + 30:
                cut, cleared_at, t_clear, i_clear = av.clear(), received, time.monotonic(), f.index
                left = av.queued_s
            if len(frames) >= 31 + 25:
                break
        rate = (frames[-1].index - i_clear) / (time.monotonic() - t_clear)
        d = av.describe()
        await av.close()
        return frames, shown, cleared_at, cut, left, rate, d, i_clear

    frames, shown, cleared_at, cut, left, rate, d, i_clear = asyncio.run(run())
    audio = np.concatenate([f.audio for f in frames])
    after = [f for f in frames if f.index > i_clear]
    check_barge_in(shown, audio, cleared_at, held_after=sum(not f.fresh for f in after))
    assert not [f.index for f in after if f.fresh and f.index >= cut and not is_closed(f.image)]
    assert left == 0.0 and d["barge_ins"] == 1
    assert cut <= after[0].index + 1  # the mouth is closed from the 2nd frame after clear() on
    # one clock: audio contiguous, frame i carries samples [1920 i, 1920 (i+1)), no jump anywhere
    assert frames[0].index == FIRST_FRAME and frames[0].audio_start == FIRST_FRAME * FRAME_AUDIO
    for a, b in zip(frames, frames[1:], strict=False):
        assert b.audio_start == a.audio_start + a.audio.size
        assert b.audio_start + b.audio.size == (b.index + 1) * FRAME_AUDIO
    skips = sum(b.index - a.index - 1 for a, b in zip(frames, frames[1:], strict=False))
    assert skips == d["frames_skipped"]
    assert not any(f.segment_ends for f in frames)  # the utterance was cut, it never ended
    assert 22 <= rate <= 28, rate  # silence after the clear streams on at 25 fps


def test_idle_in_silence_and_utterance_end(avatar_engine):
    """(The random tiny model's pose encoder maps the idle key poses to nearly one code, so idle
    motion itself is not visible here; it is the serve path's CodesPose, shared.)"""

    async def run():
        av = await AvatarStream.open(avatar_engine, pose="idle")
        frames = []
        async for f in av:
            frames.append(f)
            if len(frames) == 10:
                av.push_audio(speech(16000, 0.5), 16000)  # plays from the next free 20 ms slot
                av.end_segment()
                pushed_at = f.audio_start + f.audio.size
            if any(g.segment_ends for g in frames) or len(frames) > 60:
                break
        kind = av.describe()["pose"]
        await av.close()
        return frames, pushed_at, kind

    frames, pushed_at, kind = asyncio.run(run())
    silent = frames[:10]
    assert kind == "idle" and all(np.abs(f.audio).max() == 0 for f in silent)
    ends = [f for f in frames if f.segment_ends]
    assert len(ends) == 1 and ends[0].segment_ends == 1
    end = ends[0].audio_start + ends[0].audio.size
    speech_end = np.flatnonzero(np.abs(np.concatenate([f.audio for f in frames])) > 0).max()
    speech_end += frames[0].audio_start
    assert end - 2 * FRAME_AUDIO <= speech_end < end  # reported with the frame of its last sample (+-1 frame)
    delay = avatar_engine.clock_cfg.delay_s  # speech pushed now plays after the output delay
    assert speech_end - pushed_at <= (0.5 + delay + 0.06) * 48000, (speech_end - pushed_at) / 48000


def test_push_audio_rejects_bad_input(avatar_engine):
    from rt_engine.errors import ConfigError, InputError
    from rt_engine.stream.session import SessionOptions

    async def run():
        av = await AvatarStream.open(avatar_engine, pose="still")
        try:
            with pytest.raises(InputError, match="sample rate"):
                av.push_audio(np.zeros(100, np.float32), 100)
            with pytest.raises(InputError, match="float or int16"):
                av.push_audio(np.zeros(100, np.int64), 16000)
            with pytest.raises(ConfigError, match="pose='webcam'"):
                av.set_pose_frame(np.zeros((8, 8, 3), np.uint8))
        finally:
            await av.close()
        s = await avatar_engine.create_session(SessionOptions(audio="file", pose="still"))
        with pytest.raises(ConfigError, match="audio='push'"):
            s.push_speech(np.zeros(10, np.float32), 16000)
        av2 = await AvatarStream.open(avatar_engine, pose="still")
        with pytest.raises(ConfigError, match="push_speech"):
            av2.session.accept_audio(np.zeros(10, np.float32), 16000)
        await av2.close()
        with pytest.raises(ValueError, match="audio='push'"):
            AvatarStream(s)
        await s.close()

    asyncio.run(run())
