"""Shared checks of an avatar stream (the in-process API, Pipecat, LiveKit): what a frame sequence
must satisfy, whatever carried it. Each check gets plain records, so that every integration test
first converts what its framework delivered and then runs the same assertions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rt_engine.assets import DEFAULT_SPEECH
from rt_engine.config import NoiseMode
from rt_engine.inputs import audio as audio_in
from rt_engine.inputs.image import to_uint8
from rt_engine.stream.clock import OUT_RATE

FRAME_AUDIO = OUT_RATE // 25  # 1920 samples of 48 kHz audio per video frame


@dataclass
class Shown:
    """One image as a sink received it, with the audio that had been received before it."""

    image: np.ndarray  # [H,W,3] u8
    audio_before: int  # 48 kHz samples received before this image
    index: int | None = None  # frame index when the carrier keeps it
    after_clear: bool = False  # received after clear()/interruption was issued
    fresh: bool = True  # generated for its own index (False: a held repeat, compute was late)


def speech(rate: int, seconds: float) -> np.ndarray:
    """The bundled speech clip at ``rate`` Hz, int16 [N] (TTS-like PCM)."""
    x = audio_in.load_audio(DEFAULT_SPEECH, rate)[: int(seconds * rate)]
    return (np.clip(x / max(1e-6, np.abs(x).max()) * 0.8, -1, 1) * 32767).astype(np.int16)


class MouthProbe:
    """Runner wrapper for tests: paints into the top-left 8x8 pixels of each frame whether its mouth
    code is the code of silence (black: mouth closed) or not (white: speaking), and the first pose
    number into the 8x8 block beside it. A random tiny model
    barely shows its mouth, so this makes "the mouth is closed" visible to a sink at the far end of a
    pipeline. Everything else is the wrapped runner's."""

    def __init__(self, inner):
        self.inner = inner
        self.cfg = inner.cfg
        self._m0: torch.Tensor | None = None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def generate(self, id0, id1, mouth, pose, noise=NoiseMode.STORED):  # -> [B,3,H,W]
        out = self.inner.generate(id0, id1, mouth, pose, noise).clone()
        if self._m0 is None:
            self._m0 = self.inner.encode_audio(torch.from_numpy(audio_in.silence_window().copy())[None])  # [1,D]
        rel = (mouth - self._m0).norm(dim=1) / self._m0.norm()  # [B]
        out[:, :, :8, :8] = torch.where(rel > 1e-3, 1.0, -1.0)[:, None, None, None]
        out[:, :, :8, 8:16] = torch.tanh(20 * pose[:, :1, None, None].float())  # the head pose, visibly
        return out

    def generate_uint8(self, id0, id1, mouth, pose, noise=NoiseMode.STORED) -> np.ndarray:  # -> [B,H,W,3]
        return to_uint8(self.generate(id0, id1, mouth, pose, noise))


def is_closed(img: np.ndarray) -> bool:
    """Read :class:`MouthProbe`'s mark from a [H,W,3] u8 frame."""
    return float(img[1:7, 1:7].mean()) < 128


def check_rate_and_sync(shown: list[Shown], audio_total: int) -> None:
    """25 images per second of audio, and every image within one frame of its audio. Checked apart
    before and after a clear: an interruption may drop frames queued downstream (Pipecat flushes
    the queues of the processors after the one that saw it), so the count restarts there."""
    assert len(shown) >= 10
    parts = [[s for s in shown if not s.after_clear], [s for s in shown if s.after_clear]]
    for k, part in enumerate(p for p in parts if p):
        end = audio_total if k == len(parts) - 1 or not parts[1] else parts[1][0].audio_before
        _check_part(part, end)


def _check_part(shown: list[Shown], audio_end: int) -> None:
    n_expected = (audio_end - shown[0].audio_before) / FRAME_AUDIO
    idx = [s.index for s in shown]
    # frames the sender skipped because it was late (a busy machine) leave their audio to the next image
    known = [i for i in idx if i is not None]
    skipped = sum(b - a - 1 for a, b in zip(known, known[1:], strict=False)) if len(known) == len(idx) else 0
    assert abs(len(shown) + skipped - n_expected) <= 2, (len(shown), skipped, n_expected)
    assert skipped <= max(3, 0.15 * len(shown)), skipped
    first, i0 = shown[0].audio_before, shown[0].index
    for k, s in enumerate(shown):
        # an image should appear when the audio of its frame starts (frame index when the carrier
        # keeps it: a frame the sender skipped leaves its audio to the next image)
        n = k if s.index is None or i0 is None else s.index - i0
        lag = (s.audio_before - first) / FRAME_AUDIO - n
        assert abs(lag) <= 1.0, (k, lag)


def check_barge_in(shown: list[Shown], audio: np.ndarray, cleared_at: int, held_after: int = 0) -> None:
    """Speech moved the mouth before the clear; within 2 images of it the mouth is closed and stays
    closed; the audio after it is silent. ``audio``: all received 48 kHz samples; ``cleared_at``: how
    many had been received when clear was issued; ``held_after``: images after the clear that repeat
    the previous one because compute was late (a starved machine; each may repeat an open mouth)."""
    before = [s for s in shown if not s.after_clear]
    after = [s for s in shown if s.after_clear]
    assert len(before) >= 10 and len(after) >= 10, (len(before), len(after))
    assert sum(not is_closed(s.image) for s in before) >= 5, "speech never moved the mouth"
    open_after = [k for k, s in enumerate(after) if not is_closed(s.image)]
    assert not open_after or max(open_after) < 2 + held_after, (open_after, held_after)
    assert all(is_closed(s.image) for s in after[-8:])
    tail = audio[cleared_at + 2 * FRAME_AUDIO :]
    assert tail.size >= 5 * FRAME_AUDIO and np.abs(tail).max() < 1e-3, "speech went on after the clear"
    assert np.abs(audio[:cleared_at]).max() > 0.05, "no speech before the clear"
