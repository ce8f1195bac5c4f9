"""In-process avatar stream: push speech, iterate lip-synced frames. No transport.

The one API that ``serve``-like hosts, the Pipecat service and the LiveKit video generator use. It is
a :class:`~rt_engine.stream.session.Session` with ``audio='push'``: the same media clock, scheduler
and pacing as a WebRTC session, fed from a speech queue instead of a microphone::

    avatar = await AvatarStream.open(engine, pose="idle")
    avatar.push_audio(pcm, 24000)      # any rate, any chunk size, faster than real time is fine
    avatar.end_segment()               # the utterance is complete (optional)
    async for f in avatar:             # 25 per second, paced on the wall clock
        show(f.image)                  # [H,W,3] u8, frame f.index, media time f.pts_s
        play(f.audio)                  # [N] float32 48 kHz mono, media time f.audio_pts_s
    avatar.clear()                     # barge-in: queued speech dropped, mouth closed within 2 frames

Timing: everything is on the audio-master media clock (:mod:`rt_engine.stream.clock`). Frame ``i``
shows media time ``i/25``; its audio is 48 kHz samples ``[1920 i, 1920 (i+1))``, so image and sound
of one :class:`AvatarFrame` belong together and consecutive frames' audio is contiguous (when the
sender had to skip frames, the next frame carries the skipped frames' audio too). With no speech
queued the stream goes on with idle frames and silence at 25 fps.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from rt_engine.config import FPS
from rt_engine.stream.clock import OUT_RATE
from rt_engine.stream.session import OUT_PER_FRAME, Engine, Session, SessionOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AvatarFrame:
    """One video frame and the audio that plays with it."""

    index: int  # video frame index i: media time i / 25 s
    image: np.ndarray  # [H,W,3] u8 RGB
    audio: np.ndarray  # [N] float32 mono at 48 kHz (N = 1920 unless frames were skipped)
    audio_start: int  # 48 kHz media sample of audio[0]
    fresh: bool  # generated for this index (False: the previous image held, compute was late)
    segment_ends: int = 0  # utterances (end_segment) whose last sample plays in this frame's audio

    @property
    def pts_s(self) -> float:
        return self.index / FPS

    @property
    def audio_pts_s(self) -> float:
        return self.audio_start / OUT_RATE

    def audio_s16(self) -> bytes:
        """The audio as 16-bit little-endian PCM bytes (mono, 48 kHz)."""
        return (np.clip(self.audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


class AvatarStream:
    """Speech in, frames out; see the module doc. Use on one asyncio loop."""

    sample_rate = OUT_RATE
    fps = FPS

    def __init__(self, session: Session):
        if session.speech is None:
            raise ValueError("AvatarStream needs a session with audio='push'")
        self.session = session
        self._audio_pos: int | None = None  # next 48 kHz sample to hand out
        self.frames_out = 0

    @classmethod
    async def open(
        cls,
        engine: Engine,
        identity: str | None = None,
        pose: str = "idle",
        pose_file: str | None = None,
        webcam_fps: float = 5.0,
        stamp: bool = False,
    ) -> AvatarStream:
        """A started avatar: ``identity`` an image path (None: the bundled face); ``pose`` idle |
        still | file (``pose_file``, a video) | webcam (frames given to :meth:`set_pose_frame`)."""
        opts = SessionOptions(
            identity=identity, audio="push", pose=pose, pose_file=pose_file, webcam_fps=webcam_fps, stamp=stamp
        )
        session = await engine.create_session(opts)
        session.start()
        return cls(session)

    # --- input
    def push_audio(self, samples: np.ndarray, sample_rate: int) -> None:
        """Queue speech: [N] or [N,C], float in [-1,1] or int16, any rate."""
        self.session.push_speech(samples, sample_rate)

    def end_segment(self) -> None:
        """The speech pushed so far is one utterance; the frame whose audio holds its last sample
        reports it in ``segment_ends``."""
        self.session.end_speech()

    def clear(self) -> int:
        """Barge-in: drop all queued speech now. The next frame may still be one already made; from
        the one after (returned) on, the mouth is closed and the audio silent. Idle motion and the
        timestamps go on without a jump."""
        return self.session.barge_in()

    def set_pose_frame(self, image: np.ndarray) -> None:
        """pose='webcam': a video frame [H,W,3] u8 RGB to take the head pose from (latest wins)."""
        self.session.set_pose_frame(image)

    @property
    def queued_s(self) -> float:
        """Seconds of speech pushed and not yet played."""
        assert self.session.speech is not None
        return self.session.speech.queued_s

    @property
    def size(self) -> int:
        """Output image side in pixels."""
        return self.session.engine.runner.cfg.size

    # --- output
    async def next_frame(self) -> AvatarFrame:
        """The next frame, at its send time on the media clock. ConnectionError once closed."""
        i, img, fresh = await self.session.next_video_frame()
        end = (i + 1) * OUT_PER_FRAME
        start = i * OUT_PER_FRAME if self._audio_pos is None else self._audio_pos
        x, _ = self.session.audio.out.read(start, end - start)
        self._audio_pos = end
        self.frames_out += 1
        return AvatarFrame(i, img, x, start, fresh, self.session.take_segment_ends(end))

    async def frames(self) -> AsyncIterator[AvatarFrame]:
        """Frames until :meth:`close`."""
        while not self.session.closed:
            try:
                yield await self.next_frame()
            except ConnectionError:
                return

    def __aiter__(self) -> AsyncIterator[AvatarFrame]:
        return self.frames()

    async def close(self) -> None:
        await self.session.close()

    def describe(self) -> dict:
        return self.session.describe()
