"""Audio front end: containers, rates, channels, edge cases, streaming lookahead."""

import logging
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile as sf

from rt_engine.errors import InputError
from rt_engine.inputs import audio as A

SR = 16000


def _speechlike(seconds=2.0, sr=SR, seed=0):
    """A voiced-like test signal: harmonics with a syllable-rate envelope."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.5 * t)
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / sr) / k for k in range(1, 12))
    env = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    return (0.2 * x * env + 0.003 * np.random.default_rng(seed).standard_normal(t.size)).astype(np.float32)


def _write_av(path, x, sr, codec, video=False):
    with av.open(str(path), "w") as c:
        if video:
            vs = c.add_stream("libx264", rate=25)
            vs.width = vs.height = 64
            vs.pix_fmt = "yuv420p"
        a = c.add_stream(codec, rate=sr)
        a.layout = "mono"
        for s in range(0, len(x), 1024):
            f = av.AudioFrame.from_ndarray(x[None, s : s + 1024].copy(), format="fltp", layout="mono")
            f.sample_rate, f.pts, f.time_base = sr, s, Fraction(1, sr)
            for p in a.encode(f):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
        if video:
            for i in range(int(len(x) / sr * 25)):
                vf = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
                vf.pts, vf.time_base = i, Fraction(1, 25)
                for p in vs.encode(vf):
                    c.mux(p)
            for p in vs.encode():
                c.mux(p)


@pytest.fixture(scope="module")
def ref():
    x = _speechlike()
    return x, A.log_mel(A.normalize(x))


def _mel_close(mel, ref_mel, min_corr=0.98, max_rows_diff=3, bands=80):
    n = min(len(mel), len(ref_mel))
    assert abs(len(mel) - len(ref_mel)) <= max_rows_diff
    c = np.corrcoef(mel[:n, :bands].ravel(), ref_mel[:n, :bands].ravel())[0, 1]
    assert c >= min_corr, c


def test_wav_and_flac_are_exact(ref, tmp_path):
    x, mel = ref
    q = np.round(x * 32767).astype(np.int16)
    sf.write(tmp_path / "a.wav", q, SR, subtype="PCM_16")
    sf.write(tmp_path / "a.flac", q, SR)
    wav = A.load_audio(tmp_path / "a.wav")
    assert np.array_equal(wav, q.astype(np.float32) / 32768)
    assert np.array_equal(A.load_audio(tmp_path / "a.flac"), wav)
    # a WAV file with a misleading extension (as the upstream demo's .mp3) is read by content
    (tmp_path / "a.mp3").write_bytes((tmp_path / "a.wav").read_bytes())
    assert np.array_equal(A.load_audio(tmp_path / "a.mp3"), wav)


@pytest.mark.parametrize("sr,channels", [(8000, 1), (44100, 2), (48000, 1), (48000, 2)])
def test_other_rates_and_stereo_are_resampled(ref, tmp_path, sr, channels):
    x, mel = ref
    import soxr

    y = soxr.resample(x, SR, sr, quality="HQ").astype(np.float32)
    if channels == 2:
        y = np.stack([y, 0.5 * y], axis=1)
    sf.write(tmp_path / "b.wav", y, sr, subtype="FLOAT")
    wav = A.load_audio(tmp_path / "b.wav")
    assert abs(len(wav) - len(x)) <= 2
    _, m = A.audio_features(tmp_path / "b.wav")
    if sr == 8000:  # nothing above 4 kHz survives: compare the mel bands centred below 3.8 kHz
        centres = A._mel_to_hz(np.linspace(A._hz_to_mel(A.FMIN), A._hz_to_mel(A.FMAX), A.N_MELS + 2))[1:-1]
        _mel_close(m, mel, 0.99, bands=int((centres < 3800).sum()))
    else:
        _mel_close(m, mel, 0.99)


@pytest.mark.parametrize(
    "name,codec,video", [("c.m4a", "aac", False), ("c.mp4", "aac", True), ("c.mp3", "libmp3lame", False)]
)
def test_compressed_containers(ref, tmp_path, name, codec, video):
    x, mel = ref
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder to make the test file")
    _write_av(tmp_path / name, x, 44100 if codec == "libmp3lame" else SR, codec, video)
    if codec == "libmp3lame":  # the encoder ran at 44.1 kHz on 16 kHz samples: only check decoding works
        assert A.load_audio(tmp_path / name).size > 0
        return
    _, m = A.audio_features(tmp_path / name)
    _mel_close(m, mel, 0.95, max_rows_diff=16)  # AAC pads up to one 1024-sample frame at the end


def test_short_silent_missing_and_garbage(tmp_path, caplog):
    sf.write(tmp_path / "short.wav", np.zeros(int(0.19 * SR), np.float32) + 0.1, SR)
    with pytest.raises(InputError, match="at least 0.2 s"):
        A.audio_features(tmp_path / "short.wav")
    sf.write(tmp_path / "silent.wav", np.zeros(SR, np.float32), SR)
    with caplog.at_level(logging.WARNING):
        _, mel = A.audio_features(tmp_path / "silent.wav")
    assert "silent" in caplog.text and np.all(mel == 0)
    with pytest.raises(InputError, match="not found"):
        A.load_audio(tmp_path / "none.wav")
    (tmp_path / "junk.wav").write_bytes(b"this is not audio" * 10)
    with pytest.raises(InputError, match="junk.wav"):
        A.load_audio(tmp_path / "junk.wav")


# Streaming == offline for random chunkings: tests/test_stream.py::test_streaming_mel_equals_offline_for_random_chunks


def test_streaming_lookahead_is_120ms():
    """Frame i's window is complete once audio up to 40 i + 120 ms has arrived, not earlier."""
    x = _speechlike(1.0)
    s = A.StreamingMel(1.0)
    for i in (2, 3, 10):
        need = A.samples_needed(i)
        assert need == 640 * i + 1920
    s.accept(x[: A.samples_needed(2) - 1])
    assert s.windows_ready() == 0
    s.accept(x[A.samples_needed(2) - 1 : A.samples_needed(2)])
    assert s.windows_ready() == 1
