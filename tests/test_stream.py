"""Streaming engine without WebRTC: streaming mel, media clock, gain, buffers, scheduler, pacing."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rt_engine.config import FIRST_FRAME, SAMPLE_RATE, NoiseMode
from rt_engine.errors import InputError
from rt_engine.inputs import audio as audio_in
from rt_engine.stream import sources
from rt_engine.stream.clock import (
    FRAME_S,
    LOOKAHEAD_S,
    OUT_RATE,
    SAMPLES_PER_FRAME,
    ClockConfig,
    MediaClock,
    first_frame_needing,
    frame_pts,
)
from rt_engine.stream.scheduler import FrameJob, Metrics, Scheduler, SchedulerConfig
from rt_engine.stream.session import SessionOptions, read_stamp, stamp_index


def _speechlike(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SAMPLE_RATE
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.2 * env * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(n)).astype(np.float32)


# ------------------------------------------------------------------------------ streaming mel
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_mel_equals_offline_for_random_chunks(seed):
    rng = np.random.default_rng(seed)
    x = _speechlike(int(SAMPLE_RATE * 1.37) + seed * 17, seed)
    gain = audio_in.rms_gain(x)
    offline = audio_in.log_mel(audio_in.normalize(x))  # [T,80]
    frames = audio_in.target_frames(offline.shape[0])
    sm = audio_in.StreamingMel(gain=gain)
    got_idx, got_win, rows = [], [], []
    pos = 0
    while pos < x.size:
        n = int(rng.choice([0, 1, 7, 160, 333, 641, 1280, 4000]))
        sm.accept(x[pos : pos + n])
        pos += n
        rows.append(sm.get_rows())
        i, w = sm.get_windows()
        got_idx.append(i)
        got_win.append(w)
    sm.finish()
    rows.append(sm.get_rows())
    i, w = sm.get_windows()
    got_idx.append(i)
    got_win.append(w)
    mel = np.concatenate(rows)
    np.testing.assert_array_equal(mel, offline)  # bit-identical
    np.testing.assert_array_equal(np.concatenate(got_idx), frames)
    np.testing.assert_array_equal(np.concatenate(got_win), audio_in.mel_windows(offline, frames))


def test_live_audio_input_holds_bounded_mel_history():
    """A long session takes windows only; mel rows must not pile up (they did: ~2-4 MB per minute)."""
    ai = sources.AudioInput(MediaClock(), gain=1.0)
    x = _speechlike(SAMPLE_RATE * 2, 7)
    taken = 0
    for k in range(60 * 50):  # one minute of 20 ms chunks
        s = (k * 320) % (x.size - 320)
        ai.push_file_chunk(x[s : s + 320], np.repeat(x[s : s + 320], 3))
        taken += len(ai.windows()[0])
    assert taken >= 60 * 25 - 5
    assert ai.mel.rows_held <= audio_in.MEL_WINDOW + 8  # one window of history, not a minute of rows
    with pytest.raises(RuntimeError, match="outputs='windows'"):
        ai.mel.get_rows()
    rows_only = audio_in.StreamingMel(outputs="rows")
    rows_only.accept(x)
    assert rows_only.rows_held == rows_only.rows_ready() == len(rows_only.get_rows())
    assert rows_only.rows_held == 0
    with pytest.raises(ValueError, match="outputs"):
        audio_in.StreamingMel(outputs="all")


def test_file_source_through_audio_input_equals_offline(tmp_path):
    import soundfile as sf

    x = _speechlike(SAMPLE_RATE * 2, 5)
    p = tmp_path / "a.wav"
    sf.write(p, x, SAMPLE_RATE, subtype="FLOAT")
    fa = sources.FileAudio(p, loop=False)
    ai = sources.AudioInput(MediaClock(), gain=fa.gain)
    idx, wins = [], []
    for k in range(0, fa.wav16.size, 320):
        ai.push_file_chunk(*fa.chunk(k, 320))
        i, w = ai.windows()
        idx.append(i)
        wins.append(w)
    ai.mel.finish()
    i, w = ai.windows()
    idx.append(i)
    wins.append(w)
    _, mel = audio_in.audio_features(p)
    frames = audio_in.target_frames(mel.shape[0])
    np.testing.assert_array_equal(np.concatenate(idx), frames)
    np.testing.assert_array_equal(np.concatenate(wins), audio_in.mel_windows(mel, frames))
    out, missing = ai.out.read(0, fa.wav48.size)
    assert missing == 0
    np.testing.assert_array_equal(out, fa.wav48)  # the outgoing audio is the input, untouched


def test_lookahead_is_120ms_and_windows_complete_exactly_then():
    assert LOOKAHEAD_S == pytest.approx(0.120)
    sm = audio_in.StreamingMel()
    x = _speechlike(SAMPLE_RATE, 3)
    for i in range(FIRST_FRAME, 12):
        need = audio_in.samples_needed(i)
        assert need == SAMPLES_PER_FRAME * i + 1920
        assert first_frame_needing(need) == i + 1 and first_frame_needing(need - 1) == i
        sm2 = audio_in.StreamingMel()
        sm2.accept(x[: need - 1])
        ready_before = sm2.windows_ready()
        sm2.accept(x[need - 1 : need])
        assert FIRST_FRAME + ready_before == i and FIRST_FRAME + sm2.windows_ready() == i + 1
    del sm


# ------------------------------------------------------------------------------ clock
def test_media_clock_follows_jitter_and_drift_without_drifting():
    clk = MediaClock(ClockConfig())
    rng = np.random.default_rng(0)
    true_t0 = 1000.0
    drift = 1.0002  # the sender's clock runs 200 ppm slow: media arrives ever later
    worst = 0.0
    for k in range(1, 60 * 50):  # one simulated minute of 20 ms chunks
        media_end = k * 0.02
        arrival = true_t0 + media_end * drift + 0.005 + abs(rng.normal(0, 0.01))
        clk.observe(media_end, arrival)
        if k > 100:
            # anchor relative to the true arrival schedule: within the jitter spread
            err = clk.t0 - (true_t0 + media_end * (drift - 1))
            worst = max(worst, abs(err))
    assert worst < 0.04, worst
    # the frame schedule is exactly 25 fps on the anchor, and pts follow the frame index
    assert clk.frame_due(100) - clk.frame_due(99) == pytest.approx(FRAME_S)
    assert clk.frame_at(clk.frame_due(77) + 1e-6) == 77
    assert frame_pts(25) == 90000


def test_agc_converges_to_official_level_and_ignores_silence():
    for level in (0.01, 0.5):
        agc = sources.Agc()
        x = _speechlike(SAMPLE_RATE * 10, 1)
        x = x / np.sqrt(np.mean(x**2)) * level
        outs = [agc.process(x[k : k + 320]) for k in range(0, x.size, 320)]
        tail = np.concatenate(outs[-100:])
        assert np.sqrt(np.mean(tail**2)) == pytest.approx(audio_in.TARGET_RMS, rel=0.1)
        g = agc.gain
        for _ in range(100):
            agc.process(np.zeros(320, np.float32))
        assert agc.gain == g


def test_audio_buffer_gaps_overlaps_and_trim():
    b = sources.AudioBuffer(keep_s=0.1)
    b.write(0, np.ones(100, np.float32))
    b.write(200, 2 * np.ones(50, np.float32))  # gap 100..200 is silence
    x, missing = b.read(50, 200)
    assert missing == 0 and x[:50].sum() == 50 and x[50:150].sum() == 0 and x[150:].sum() == 100
    x, missing = b.read(240, 20)
    assert missing == 10
    b.read(OUT_RATE, 10)  # trims everything older than keep_s
    x, missing = b.read(0, 10)
    assert missing == 10


def _check_resampled_tone(ai) -> None:
    assert abs(ai.samples48 - OUT_RATE) < 2000
    out, _ = ai.out.read(4800, 24000)
    spec = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spec) * OUT_RATE / out.size - 440) < 5  # pitch kept: resampled, not reinterpreted
    idx, _ = ai.windows()
    assert len(idx) > 15 and idx[0] == FIRST_FRAME


def _tone(rate: int) -> np.ndarray:
    t = np.arange(rate) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_live_audio_any_rate_and_layout_is_resampled():
    """Plain PCM (stereo int16 at 44.1 kHz, mono float at 24 kHz) in 20 ms chunks, no media library."""
    for rate, stereo in ((44100, True), (24000, False)):
        ai = sources.AudioInput(MediaClock())
        tone = _tone(rate)
        n = rate // 50
        now = time.monotonic()
        for k in range(0, rate, n):
            x = (np.repeat(tone[k : k + n, None], 2, axis=1) * 32767).astype(np.int16) if stereo else tone[k : k + n]
            ai.push(x, rate, now + k / rate)  # [N,2] int16 or [N] float
        _check_resampled_tone(ai)
    with pytest.raises(InputError, match="float or int16"):
        ai.push(np.zeros(10, np.int32), 48000, None)


def test_audio_gap_keeps_its_place_on_the_clock():
    ai = sources.AudioInput(MediaClock(), gain=1.0)
    ai.push(np.full(4800, 0.1, np.float32), OUT_RATE, None, start48=0)
    ai.push(np.full(4800, 0.1, np.float32), OUT_RATE, None, start48=9600)  # 100 ms lost in between
    assert ai.samples48 == 14400
    out, missing = ai.out.read(0, 14400)
    assert missing == 0 and out[4800:9600].max() == 0 and out[9600:].min() > 0


def test_session_runs_without_any_transport_library(tiny_checkpoint):
    """stream/ knows no transport: a session driven by plain PCM (accept_audio) and pose frames
    (set_pose_frame) delivers frames, and neither aiortc nor aiohttp is ever imported."""
    code = f"""
import asyncio, sys, time
import numpy as np
from rt_engine.backends.torch_backend import TorchRunner
from rt_engine.models.checkpoint import load_checkpoint
from rt_engine.stream import ClockConfig, Engine, SessionOptions
from rt_engine.stream.sources import WebcamPose

async def main():
    eng = Engine(TorchRunner(load_checkpoint({str(tiny_checkpoint)!r})), clock_cfg=ClockConfig(margin_s=0.3),
                 threads=1)  # a generous margin: this checks the inputs, not the timing
    s = await eng.create_session(SessionOptions(audio="mic", pose="webcam", webcam_fps=30))
    assert isinstance(s.pose, WebcamPose)
    t = np.arange(24000 * 2) / 24000
    x = (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    t0 = time.monotonic()
    got = []
    async def feed():
        for k in range(0, x.size, 480):
            s.accept_audio(x[k:k + 480], 24000)
            await asyncio.sleep(max(0.0, t0 + (k + 480) / 24000 - time.monotonic()))
    async def take():
        for _ in range(20):
            i, img, fresh = await s.next_video_frame()
            got.append((i, img.shape, fresh))
    await asyncio.gather(feed(), take())
    s.set_pose_frame(np.full((96, 96, 3), 128, np.uint8))  # no face in it: counted as a miss
    t1 = time.monotonic()
    while s.pose.misses == 0 and time.monotonic() - t1 < 60:  # the first crop loads the face models
        await asyncio.sleep(0.1)
    misses = s.pose.misses
    await s.close()
    eng.close()
    assert got[0][0] >= 2 and sum(f for _, _, f in got) >= 5, got  # a busy machine holds some
    assert misses >= 1, misses
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("aiortc", "aioice", "aiohttp"))
    assert not bad, bad
    print("OK", len(got))

asyncio.run(main())
"""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 0 and "OK 20" in r.stdout, r.stderr[-3000:]


def test_frame_stamp_round_trip_survives_noise():
    rng = np.random.default_rng(0)
    for size in (112, 224):
        for i in (0, 2, 1234, 90000, 2**20 - 1):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            stamp_index(img, i)
            noisy = np.clip(img.astype(int) + rng.integers(-40, 40, img.shape), 0, 255).astype(np.uint8)
            assert read_stamp(noisy) == i
    blank = np.full((112, 112, 3), 128, np.uint8)
    assert read_stamp(blank) is None or read_stamp(blank) == 0


def test_session_options_validate():
    from rt_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="pose must be one of"):
        SessionOptions(pose="dance").validate()
    with pytest.raises(ConfigError, match="pose_file"):
        SessionOptions(pose="file").validate()
    with pytest.raises(ConfigError, match="audio must be one of"):
        SessionOptions(audio="radio").validate()


# ------------------------------------------------------------------------------ scheduler
class _Owner:
    def __init__(self, sid, id0, id1):
        self.sid, self.id0, self.id1 = sid, id0, id1
        self.got: dict[int, np.ndarray] = {}
        self.drops: list[tuple[int, str]] = []
        self.done = threading.Event()

    def deliver(self, i, image, computed_at):
        self.got[i] = image
        self.done.set()

    def dropped(self, i, reason):
        self.drops.append((i, reason))


class _Recording:
    """Runner wrapper that records the batch size and blocks the first call until released."""

    def __init__(self, runner):
        self.inner = runner
        self.cfg = runner.cfg
        self.batches: list[int] = []
        self.gate = threading.Event()

    def encode_audio(self, mel):
        self.gate.wait(10)
        return self.inner.encode_audio(mel)

    def generate(self, id0, id1, mouth, pose, noise=NoiseMode.STORED):
        self.batches.append(mouth.shape[0])
        return self.inner.generate(id0, id1, mouth, pose, noise)


def test_scheduler_applies_the_mouth_gain(tiny_engine):
    """The stream scales mouth codes as render does (one MouthGain): the generator receives
    m0 + gain * (m - m0), m0 the runner's code of silence; bad gains are config errors."""
    from rt_engine.backends.base import MouthGain
    from rt_engine.errors import ConfigError

    for bad in (-0.5, 3.5, float("nan")):
        with pytest.raises(ConfigError, match="scheduler.mouth_gain must be in"):
            SchedulerConfig(mouth_gain=bad).validate()
    runner = tiny_engine.runner

    class Seen(_Recording):
        def __init__(self, inner):
            super().__init__(inner)
            self.mouths: list[torch.Tensor] = []

        def generate(self, id0, id1, mouth, pose, noise=NoiseMode.STORED):
            self.mouths.append(mouth.clone())
            return super().generate(id0, id1, mouth, pose, noise)

    rec = Seen(runner)
    rec.gate.set()
    sch = Scheduler(rec, SchedulerConfig(mouth_gain=1.5), Metrics()).start()
    try:
        id0, id1 = runner.encode_identity(torch.zeros(1, 3, 224, 224))
        owner = _Owner("a", id0, id1)
        wins = np.random.default_rng(3).random((2, 1, 80, 20)).astype(np.float32)
        due = time.monotonic() + 30
        sch.submit([FrameJob(owner, i, wins[i], np.zeros(12, np.float32), due) for i in range(2)])
        deadline = time.monotonic() + 30
        while len(owner.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(owner.got) == 2
        got = torch.cat(rec.mouths)  # [2,mouth_dim]
        m = runner.encode_audio(torch.from_numpy(wins))
        m0 = MouthGain(1.5).silence_code(runner)
        torch.testing.assert_close(got, m0 + 1.5 * (m - m0))
        assert (got - m).abs().max() > 1e-3  # it did change the codes
    finally:
        sch.stop()


def test_scheduler_batches_across_sessions_with_per_row_identity(tiny_engine):
    runner = tiny_engine.runner
    torch.manual_seed(1)
    imgs = torch.rand(2, 3, 224, 224) * 2 - 1
    id0, id1 = runner.encode_identity(imgs)  # [2,...]: two identities
    a = _Owner("a", id0[:1], id1[:1])
    b = _Owner("b", id0[1:], id1[1:])
    rec = _Recording(runner)
    sch = Scheduler(rec, SchedulerConfig(max_batch=8), Metrics()).start()
    try:
        rng = np.random.default_rng(0)
        wins = rng.random((4, 1, 80, 20)).astype(np.float32)
        pose = rng.standard_normal((4, 12)).astype(np.float32)
        due = time.monotonic() + 30
        sch.submit([FrameJob(a, 2, wins[0], pose[0], due)])  # blocks in the gated runner
        time.sleep(0.2)
        sch.submit(
            [
                FrameJob(a, 3, wins[1], pose[1], due),
                FrameJob(b, 2, wins[2], pose[2], due),
                FrameJob(b, 3, wins[3], pose[3], due),
            ]
        )
        rec.gate.set()
        deadline = time.monotonic() + 30
        while (len(a.got) < 2 or len(b.got) < 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rec.batches == [1, 3]  # the three pending frames of two sessions ran as one batch
        # each row used its own identity: equal to running that session alone
        for owner, k, i in ((a, 1, 3), (b, 2, 2), (b, 3, 3)):
            mouth = runner.encode_audio(torch.from_numpy(wins[k : k + 1]))
            ref = runner.generate(owner.id0, owner.id1, mouth, torch.from_numpy(pose[k : k + 1]))
            from rt_engine.inputs.image import to_uint8

            diff = np.abs(to_uint8(ref)[0].astype(int) - owner.got[i].astype(int)).max()
            assert diff <= 1, (owner.sid, i, diff)
    finally:
        sch.stop()


def test_scheduler_drops_late_jobs_and_runs_calls(tiny_engine):
    runner = tiny_engine.runner
    m = Metrics()
    sch = Scheduler(runner, SchedulerConfig(), m).start()
    try:
        id0, id1 = runner.encode_identity(torch.zeros(1, 3, 224, 224))
        o = _Owner("late", id0, id1)
        w = np.zeros((1, 80, 20), np.float32)
        p = np.zeros(12, np.float32)
        now = time.monotonic()
        sch.submit([FrameJob(o, 2, w, p, now - 1.0), FrameJob(o, 3, w, p, now + 30)])
        assert o.done.wait(30)
        assert o.drops == [(2, "late")] and list(o.got) == [3]
        assert m.counter("frames_dropped_total", reason="late_compute") == 1
        assert sch.call(lambda r: r.cfg.name).result(30) == "tiny"
    finally:
        sch.stop()
    assert not sch.alive


# ------------------------------------------------------------------------------ session pacing
def test_session_paces_video_and_audio_on_one_clock(tiny_engine):
    """File audio through a real session (no WebRTC): frames leave at t0 + i/25 + delay, pts follow i,
    audio chunk m leaves at t0 + m/48000 + delay: A/V aligned, no drift."""

    async def run():
        s = await tiny_engine.create_session(SessionOptions(audio="file", pose="still"))
        s.start()
        sent = []
        audio = []

        async def video():
            for _ in range(40):
                i, img, fresh = await s.next_video_frame()
                sent.append((i, time.monotonic(), s.clock.frame_due(i)))  # the delay may adapt: due as of now

        async def aud():
            for _ in range(80):
                m, x = await s.next_audio_chunk()
                audio.append((m, time.monotonic(), s.clock.wall_of(m / OUT_RATE)))

        await asyncio.gather(video(), aud())
        d = s.describe()
        await s.close()
        return s, sent, audio, d

    s, sent, audio, d = asyncio.run(run())
    idx = [i for i, _, _ in sent]
    assert idx[0] == FIRST_FRAME
    assert all(b > a for a, b in zip(idx, idx[1:], strict=False))  # strictly increasing slots
    assert sum(b - a - 1 for a, b in zip(idx, idx[1:], strict=False)) == d["frames_skipped"]
    # send time error against the schedule (only frames after the first: it waits for warm-up)
    err_v = [t - due for i, t, due in sent[1:]]
    assert np.median(err_v) < 0.02 and min(err_v) > -0.002
    err_a = [t - due for m, t, due in audio[5:]]
    assert np.median(err_a) < 0.02 and min(err_a) > -0.002
    assert d["frames_fresh"] >= 1 and d["frames_sent"] == 40


def test_scheduler_skips_frames_it_cannot_finish_in_time(tiny_engine):
    """Behind schedule, a frame that the measured model cost would finish after its due time is
    dropped before computing it, so the compute goes to frames that can still be shown."""
    runner = tiny_engine.runner
    m = Metrics()
    sch = Scheduler(runner, SchedulerConfig(), m)
    sch.cost.set(1, 0.5)  # as if the model needed 0.5 s per frame
    id0, id1 = runner.encode_identity(torch.zeros(1, 3, 224, 224))
    o = _Owner("slow", id0, id1)
    w = np.zeros((1, 80, 20), np.float32)
    p = np.zeros(12, np.float32)
    now = time.monotonic()
    sch.submit([FrameJob(o, 2, w, p, now + 0.2), FrameJob(o, 3, w, p, now + 30)])
    sch.start()
    try:
        assert o.done.wait(30)
        assert o.drops == [(2, "late")] and list(o.got) == [3]
        assert m.counter("frames_dropped_total", reason="late_compute") == 1
        assert 0 < sch.cost.batch_s(1, spread=False) < 0.5  # moved towards the measured cost
    finally:
        sch.stop()
