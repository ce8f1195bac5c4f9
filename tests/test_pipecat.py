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
