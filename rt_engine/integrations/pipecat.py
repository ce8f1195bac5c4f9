"""Pipecat video service: the talking face of a Pipecat voice agent.

Place it after the TTS and before ``transport.output()``::

    pipeline = Pipeline([transport.input(), stt, llm, tts,
                         RtEngineVideoService(engine), transport.output()])

It takes ``TTSAudioRawFrame`` s (any rate) and emits, at 25 fps, an ``OutputImageRawFrame`` and the
speech that plays with it (``SpeechOutputAudioRawFrame``, 48 kHz mono, delayed by the video path).
The TTS audio itself is not passed on (the user would hear it twice); silence between utterances
streams idle frames and silent audio, so the video never freezes. Each image is sent
``sync_with_audio``: the output transport shows it once the audio before it has played. An
``InterruptionFrame`` is a barge-in (:meth:`AvatarStream.clear`: the mouth closes within 2 frames);
``TTSStoppedFrame`` ends an utterance; ``EndFrame`` lets the queued speech play out, then stops the
stream before the EndFrame goes on (nothing follows it); ``CancelFrame`` stops at once.
"""

from __future__ import annotations

import asyncio
import logging

from rt_engine.integrations import require

require("pipecat", "pipecat")

import numpy as np  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402

from rt_engine.stream.avatar import AvatarFrame, AvatarStream  # noqa: E402
from rt_engine.stream.session import Engine  # noqa: E402

log = logging.getLogger(__name__)


class RtEngineVideoService(FrameProcessor):
    """TTS audio in; lip-synced images and the matching speech out (see the module doc).

    ``engine``: shared by all services of a process (one model worker batches them all);
    ``identity``: face image path (None: the bundled face); ``pose``: idle | still | file
    (``pose_file``); ``drain_timeout_s``: how long an EndFrame waits for queued speech to play.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        identity: str | None = None,
        pose: str = "idle",
        pose_file: str | None = None,
        sync_with_audio: bool = True,
        drain_timeout_s: float = 30.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._engine = engine
        self._identity, self._pose, self._pose_file = identity, pose, pose_file
        self._sync = sync_with_audio
        self._drain_timeout_s = drain_timeout_s
        self._avatar: AvatarStream | None = None
        self._out_task: asyncio.Task | None = None

    @property
    def avatar(self) -> AvatarStream | None:
        return self._avatar

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)  # downstream starts first
            await self._start()
        elif isinstance(frame, TTSAudioRawFrame):
            if self._avatar is not None:
                pcm = np.frombuffer(frame.audio, dtype="<i2").reshape(-1, max(1, frame.num_channels))  # [N,C]
                self._avatar.push_audio(pcm, frame.sample_rate)
            # not pushed on: the delayed copy leaves with the frames
        elif isinstance(frame, TTSStoppedFrame):
            if self._avatar is not None:
                self._avatar.end_segment()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            if self._avatar is not None:
                self._avatar.clear()
            await self.push_frame(frame, direction)
        elif isinstance(frame, EndFrame):
            await self._stop(drain=True)
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop(drain=False)
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._stop(drain=False)

    # --- stream
    async def _start(self) -> None:
        if self._avatar is not None:
            return
        self._avatar = await AvatarStream.open(
            self._engine, identity=self._identity, pose=self._pose, pose_file=self._pose_file
        )
        self._out_task = self.create_task(self._emit(self._avatar))

    async def _emit(self, avatar: AvatarStream) -> None:
        async for f in avatar:
            await self.push_frame(self.image_frame(f))
            await self.push_frame(
                SpeechOutputAudioRawFrame(audio=f.audio_s16(), sample_rate=avatar.sample_rate, num_channels=1)
            )

    def image_frame(self, f: AvatarFrame) -> OutputImageRawFrame:
        h, w = f.image.shape[:2]
        out = OutputImageRawFrame(image=f.image.tobytes(), size=(w, h), format="RGB")
        out.sync_with_audio = self._sync
        out.metadata["rt_engine"] = {"index": f.index, "fresh": f.fresh, "audio_start": f.audio_start}
        return out

    async def _stop(self, drain: bool) -> None:
        avatar, task = self._avatar, self._out_task
        if avatar is None:
            return
        if drain:  # let the queued speech, and the video path delay after it, play out
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._drain_timeout_s
            while avatar.queued_s > 0 and loop.time() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(avatar.session.clock.delay if avatar.queued_s == 0 else 0.0)
        self._avatar, self._out_task = None, None
        if task is not None:
            await self.cancel_task(task)
        await avatar.close()
