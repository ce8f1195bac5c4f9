"""LiveKit Agents avatar: a ``VideoGenerator`` on the avatar stream, and an avatar worker.

The agent (STT, LLM, TTS) sends its speech to the avatar participant over a LiveKit data stream
(``DataStreamAudioOutput``); the avatar worker's ``AvatarRunner`` receives it
(``DataStreamAudioReceiver``), pushes it into :class:`RtEngineVideoGenerator` and publishes what the
generator yields (video frames and the speech that goes with them, in sync) as the avatar's tracks.

Scale-out is LiveKit's: every machine runs ``python -m rt_engine.integrations.livekit start`` (or the
example ``examples/livekit_avatar_worker.py``), registers with the LiveKit server, and the server
dispatches each avatar job to a worker whose load is under its threshold. The load a worker reports
is its model's busy share (:class:`LoadMeter`): the fraction of the last seconds the
scheduler spent computing frames, which reaches 1 when the machine makes frames as fast as it can.
Jobs run as threads of the worker process, so all sessions of a machine share one engine, one
model and one batching scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from rt_engine.integrations import require

require("livekit.agents", "livekit")

import numpy as np  # noqa: E402
from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator  # noqa: E402

from rt_engine.cli import cli_main  # noqa: E402
from rt_engine.errors import ConfigError  # noqa: E402
from rt_engine.stream.avatar import AvatarStream  # noqa: E402
from rt_engine.stream.session import Engine  # noqa: E402

log = logging.getLogger(__name__)

AGENT_NAME = "rt-engine-avatar"


class RtEngineVideoGenerator(VideoGenerator):
    """``push_audio`` (``rtc.AudioFrame`` at any rate, or ``AudioSegmentEnd``), ``clear_buffer``
    (barge-in) and an endless stream of ``rtc.VideoFrame`` (RGB24, 25 fps) each followed by the
    ``rtc.AudioFrame`` (48 kHz mono) that plays with it; ``AudioSegmentEnd`` once an utterance has
    played. Each audio frame's ``userdata`` holds the frame ``index`` and ``fresh``."""

    def __init__(self, avatar: AvatarStream):
        self.avatar = avatar

    @classmethod
    async def create(
        cls, engine: Engine, identity: str | None = None, pose: str = "idle", pose_file: str | None = None
    ) -> RtEngineVideoGenerator:
        return cls(await AvatarStream.open(engine, identity=identity, pose=pose, pose_file=pose_file))

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self.avatar.end_segment()
            return
        pcm = np.frombuffer(frame.data, dtype=np.int16).reshape(-1, frame.num_channels)  # [N,C]
        self.avatar.push_audio(pcm, frame.sample_rate)

    def clear_buffer(self) -> None:
        self.avatar.clear()

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._stream()

    async def _stream(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        rate = self.avatar.sample_rate
        async for f in self.avatar:
            h, w = f.image.shape[:2]
            yield rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24, f.image.tobytes())
            yield rtc.AudioFrame(f.audio_s16(), rate, 1, f.audio.size, userdata={"index": f.index, "fresh": f.fresh})
            for _ in range(f.segment_ends):
                yield AudioSegmentEnd()

    async def aclose(self) -> None:
        await self.avatar.close()


class LoadMeter:
    """The share of the last ``window_s`` seconds the engine's model was busy (averaged over its lanes),
    in [0, 1]."""

    def __init__(self, engine: Engine, window_s: float = 5.0):
        self.engine = engine
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()  # (monotonic time, scheduler busy seconds)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        now, busy = time.monotonic(), self.engine.scheduler.busy_s
        with self._lock:
            self._samples.append((now, busy))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
                self._samples.popleft()
            t0, b0 = self._samples[0]
        return 0.0 if now - t0 < 1e-3 else float(min(1.0, max(0.0, (busy - b0) / (now - t0))))


async def run_avatar_job(
    ctx, engine: Engine, identity: str | None = None, pose: str = "idle", pose_file: str | None = None
) -> None:
    """One avatar in ``ctx.room`` (a livekit.agents JobContext) until the room closes."""
    from livekit.agents.voice.avatar import AvatarOptions, AvatarRunner, DataStreamAudioReceiver

    await ctx.connect()
    gen = await RtEngineVideoGenerator.create(engine, identity=identity, pose=pose, pose_file=pose_file)
    size = gen.avatar.size
    runner = AvatarRunner(
        ctx.room,
        audio_recv=DataStreamAudioReceiver(ctx.room),
        video_gen=gen,
        options=AvatarOptions(
            video_width=size,
            video_height=size,
            video_fps=gen.avatar.fps,
            audio_sample_rate=gen.avatar.sample_rate,
            audio_channels=1,
        ),
    )
    try:
        await runner.start()
        await runner.wait_for_complete()
    finally:
        await runner.aclose()
        await gen.aclose()


def make_server(
    engine_factory: Callable[[], Engine],
    identity: str | None = None,
    pose: str = "idle",
    pose_file: str | None = None,
    agent_name: str = AGENT_NAME,
    load_threshold: float = 0.8,
):
    """An ``AgentServer`` that runs avatar jobs as threads sharing one engine (made on first use) and
    reports the engine's busy share as its load; above ``load_threshold`` LiveKit sends jobs elsewhere."""
    from livekit.agents import AgentServer, JobExecutorType

    lock = threading.Lock()
    box: list = []  # [engine, meter] once made

    def engine_and_meter() -> tuple[Engine, LoadMeter]:
        with lock:
            if not box:
                engine = engine_factory()
                box.extend([engine, LoadMeter(engine)])
            return box[0], box[1]

    def load() -> float:
        return engine_and_meter()[1]() if box else 0.0

    server = AgentServer(job_executor_type=JobExecutorType.THREAD, load_fnc=load, load_threshold=load_threshold)

    @server.rtc_session(agent_name=agent_name)
    async def entry(ctx) -> None:
        engine = (await asyncio.to_thread(engine_and_meter))[0]
        await run_avatar_job(ctx, engine, identity=identity, pose=pose, pose_file=pose_file)

    return server


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m rt_engine.integrations.livekit",
        description="rt_engine avatar worker for LiveKit Agents. Connection settings "
        "come from LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET.",
    )
    ap.add_argument("--checkpoint", default=None, help="model (.safetensors); default: bundled")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--identity", default=None, help="face image; default: bundled")
    ap.add_argument("--pose", default="idle", choices=["idle", "still", "file"])
    ap.add_argument("--pose-file", default=None)
    ap.add_argument("--agent-name", default=AGENT_NAME, help="the name agents dispatch avatar jobs to")
    ap.add_argument("--load-threshold", type=float, default=0.8, help="busy share above which no new jobs come")
    return ap


@cli_main
def main(argv: list[str] | None = None) -> int:
    """``python -m rt_engine.integrations.livekit [our options] start|dev|...``: our options, then
    LiveKit's own CLI (commands ``start``, ``dev``, ...; see ``-- --help``)."""
    import sys

    from livekit.agents import cli

    from rt_engine.integrations import load_engine

    argv = list(sys.argv[1:] if argv is None else argv)
    args, theirs = build_parser().parse_known_args(argv)
    theirs = [a for a in theirs if a != "--"]
    if not 0.0 < args.load_threshold <= 1.0:
        raise ConfigError(f"--load-threshold must be in (0, 1], got {args.load_threshold}")
    server = make_server(
        lambda: load_engine(args.checkpoint, args.backend),
        identity=args.identity,
        pose=args.pose,
        pose_file=args.pose_file,
        agent_name=args.agent_name,
        load_threshold=args.load_threshold,
    )
    sys.argv = [sys.argv[0], *theirs]
    cli.run_app(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
