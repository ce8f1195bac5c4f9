"""Echo avatar with Pipecat: the face repeats what you say. No API key, no STT, LLM or TTS.

    pip install 'rt_engine[pipecat]' && pip install --no-deps pipecat-ai==1.14.0 \
        pipecat-ai-small-webrtc-prebuilt==2.5.0
    python examples/pipecat_echo_avatar.py [--port 7860] [--checkpoint M] [--identity face.jpg]
    # open http://127.0.0.1:7860/ and press Connect
    # offline (the prebuilt page loads a script from daily.co): http://127.0.0.1:7860/local

The page is Pipecat's prebuilt SmallWebRTC client; the pipeline is

    transport.input() -> Echo (your microphone as TTS audio) -> RtEngineVideoService -> transport.output()

so the avatar speaks your words back in your voice, lips in sync, a moment later. The server is a
small aiohttp app doing what Pipecat's development runner does for the page: ``POST /start`` gives
a session id, ``POST /sessions/{id}/api/offer`` answers the WebRTC offer and starts a pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid
from pathlib import Path

from aiohttp import web

from rt_engine.errors import RtEngineError
from rt_engine.integrations import load_engine, require

log = logging.getLogger("pipecat_echo_avatar")


def make_echo():
    from pipecat.frames.frames import Frame, InputAudioRawFrame, TTSAudioRawFrame
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

    class Echo(FrameProcessor):
        """The user's microphone becomes the bot's speech (in place of a TTS)."""

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, InputAudioRawFrame):
                await self.push_frame(
                    TTSAudioRawFrame(audio=frame.audio, sample_rate=frame.sample_rate, num_channels=frame.num_channels)
                )
            else:
                await self.push_frame(frame, direction)

    return Echo()


async def run_bot(connection, engine, identity: str | None) -> None:
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
    from pipecat.workers.runner import WorkerRunner

    from rt_engine.integrations.pipecat import RtEngineVideoService

    size = engine.runner.cfg.size
    transport = SmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            video_out_enabled=True,
            video_out_is_live=False,  # images come sync_with_audio; the transport repeats the latest at 25 fps
            video_out_width=size,
            video_out_height=size,
            video_out_framerate=25,
        ),
    )
    avatar = RtEngineVideoService(engine, identity=identity, pose="idle")
    worker = PipelineWorker(
        Pipeline([transport.input(), make_echo(), avatar, transport.output()]),
        idle_timeout_secs=None,
        enable_rtvi=False,
    )

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def create_app(engine, identity: str | None = None, own_engine: bool = True) -> web.Application:
    """The page and the session handshake; ``own_engine``: close the engine on shutdown."""
    from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection

    dist = Path(__import__("pipecat_ai_small_webrtc_prebuilt").__file__).parent / "client" / "dist"
    app = web.Application()
    sessions: set[str] = set()
    connections: dict[str, SmallWebRTCConnection] = {}
    tasks: set[asyncio.Task] = set()

    async def index(request: web.Request) -> web.StreamResponse:
        if request.path == "/":
            raise web.HTTPFound("/client/")
        return web.FileResponse(dist / "index.html")

    async def start(request: web.Request) -> web.Response:
        sid = str(uuid.uuid4())
        sessions.add(sid)
        return web.json_response({"sessionId": sid})

    async def offer(request: web.Request) -> web.Response:
        if request.match_info["sid"] not in sessions:
            return web.json_response({"error": "unknown session; POST /start first"}, status=404)
        body = await request.json()
        if request.method == "PATCH":  # trickled ICE candidates
            conn = connections.get(body.get("pc_id", ""))
            if conn is not None:
                from aiortc.sdp import candidate_from_sdp

                for c in body.get("candidates", []):
                    cand = None  # an empty candidate: end of candidates
                    if c.get("candidate"):
                        cand = candidate_from_sdp(c["candidate"])
                        cand.sdpMid, cand.sdpMLineIndex = c.get("sdp_mid"), c.get("sdp_mline_index")
                    await conn.add_ice_candidate(cand)
            return web.json_response({"status": "success"})
        conn = SmallWebRTCConnection(ice_servers=[])
        await conn.initialize(sdp=body["sdp"], type=body["type"])
        answer = conn.get_answer()
        connections[answer["pc_id"]] = conn
        task = asyncio.ensure_future(run_bot(conn, engine, identity))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(lambda _t, pc=answer["pc_id"]: connections.pop(pc, None))
        return web.json_response(answer)

    async def on_shutdown(app: web.Application) -> None:
        pending = list(tasks)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if own_engine:
            engine.close()

    app.router.add_get("/", index)
    app.router.add_get("/local", lambda _r: web.FileResponse(Path(__file__).parent / "static" / "echo.html"))
    app.router.add_get("/client/", index)
    app.router.add_static("/client/", dist)
    app.router.add_post("/start", start)
    app.router.add_route("POST", "/sessions/{sid}/api/offer", offer)
    app.router.add_route("PATCH", "/sessions/{sid}/api/offer", offer)
    app.on_shutdown.append(on_shutdown)
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--checkpoint", default=None, help="model (.safetensors); default: bundled")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--identity", default=None, help="face image; default: bundled")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        require("pipecat", "pipecat")
        import importlib.util

        if importlib.util.find_spec("pipecat_ai_small_webrtc_prebuilt") is None:
            raise ImportError(
                "error: the page is missing: pip install --no-deps pipecat-ai-small-webrtc-prebuilt==2.5.0"
            )
        engine = load_engine(args.checkpoint, args.backend)
    except (ImportError, RtEngineError) as e:
        msg = str(e)
        print(msg if msg.startswith("error:") else f"error: {msg}", file=sys.stderr)
        return 2
    log.info("model %s; open http://%s:%d/", engine.runner.describe(), args.host, args.port)
    web.run_app(create_app(engine, args.identity), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
