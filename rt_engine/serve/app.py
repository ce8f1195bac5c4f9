"""aiohttp + aiortc server: the page, uploads, WebRTC session negotiation, stats and metrics.

Routes::

    GET  /                 the page (static/index.html + static/app.js, no build step)
    POST /upload?kind=K    multipart field 'file' (K: identity | audio | pose) -> {"upload": id}
    POST /offer            {"sdp", "type": "offer", "options": {...}} -> {"sdp", "type", "session"}
    GET  /stats/{session}  live stats of one session (JSON)
    POST /close/{session}  end a session
    GET  /health           liveness + capacity (JSON)
    GET  /metrics          Prometheus text

Options of /offer: ``audio`` 'mic' | 'file', ``pose`` 'idle' | 'still' | 'webcam' | 'file',
``identity_upload`` / ``audio_upload`` / ``pose_upload`` (ids from /upload; none: the bundled
identity and speech), ``stamp`` (paint frame indices, for measurements).

All state lives in the app object (typed aiohttp ``AppKey`` s): ``app[ENGINE]`` (model + scheduler),
``app[CFG]`` (:class:`ServerConfig`) and ``app[STATE]`` (:class:`ServerState`: sessions, uploads).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import math
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from rt_engine.errors import ConfigError, InputError, NoFaceError, RtEngineError
from rt_engine.serve import compat
from rt_engine.serve.cputime import CpuSplit
from rt_engine.stream.clock import LOOKAHEAD_S
from rt_engine.stream.scheduler import Metrics
from rt_engine.stream.session import Engine, Session, SessionOptions

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
UPLOAD_ID = re.compile(r"[0-9a-f]{16}")  # upload ids: uuid4 hex, also the start of the stored file's name
UPLOAD_KINDS = {  # kind -> (max bytes, accepted file suffixes)
    "identity": (8 << 20, (".jpg", ".jpeg", ".png", ".bmp", ".webp")),
    "audio": (25 << 20, (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".webm", ".opus", ".aac", ".mp4")),
    "pose": (60 << 20, (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".jpg", ".jpeg", ".png")),
}
VIDEO_CODECS = ("vp8", "h264")
OFFER_MAX_BYTES = 64 << 10  # an SDP offer with options is a few KiB
FINGERPRINT_BYTES = {"sha-1": 20, "sha-224": 28, "sha-256": 32, "sha-384": 48, "sha-512": 64}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    max_sessions: int = 4
    peer_timeout_s: float = 10.0  # close a session whose inbound media stopped this long ago
    loopback_ice: bool | None = None  # offer 127.0.0.1 ICE candidates (default: when bound to loopback)
    ice_any_address: bool = False  # ICE may bind every local address, not only where HTTP binds
    max_pending: int = 4  # offers answered but not yet connected (they hold no session slot)
    admit_by_capacity: bool = True  # admit only while the measured model time serves one more session fully
    connect_timeout_s: float = 5.0  # an answered offer must connect within this, or it is closed
    audio_jitter_frames: int = 1  # server-side audio jitter buffer (aiortc default: 4 = +60 ms)
    vp8_noise_sensitivity: int = 0  # libvpx's camera denoiser, 0-6 (aiortc: 4); generated frames have no noise
    max_uploads: int = 64
    # where uploads are kept; None: a private temporary folder, removed on cleanup. Media workers
    # (--workers N) share one folder made by the parent, so an offer finds an upload another took
    upload_dir: str | None = None

    def validate(self) -> ServerConfig:
        if self.host not in LOOPBACK_HOSTS and not self.token:
            raise ConfigError(
                f"listening on {self.host} (not loopback) requires --token: every /offer must then carry it"
            )
        if not 1 <= self.max_sessions <= 64:
            raise ConfigError(f"max_sessions must be in [1, 64], got {self.max_sessions}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if not 0 <= self.audio_jitter_frames <= 8:
            raise ConfigError(f"audio_jitter_frames must be in [0, 8], got {self.audio_jitter_frames}")
        if not 0 <= self.vp8_noise_sensitivity <= 6:
            raise ConfigError(f"vp8_noise_sensitivity must be in [0, 6], got {self.vp8_noise_sensitivity}")
        if not 1 <= self.max_pending <= 64:
            raise ConfigError(f"max_pending must be in [1, 64], got {self.max_pending}")
        if not 0.5 <= self.connect_timeout_s <= 60:
            raise ConfigError(f"connect_timeout_s must be in [0.5, 60] s, got {self.connect_timeout_s}")
        return self

    @property
    def use_loopback_ice(self) -> bool:
        return self.host in LOOPBACK_HOSTS if self.loopback_ice is None else self.loopback_ice

    @property
    def ice_only_address(self) -> str | None:
        """The one local address ICE binds (where HTTP binds), or None for all of them."""
        if self.ice_any_address or self.host in ("", "0.0.0.0", "::"):
            return None
        return "127.0.0.1" if self.host == "localhost" else self.host


def enable_loopback_candidates() -> None:
    """Make aioice offer 127.0.0.1 as a host candidate (it leaves it out by default), so a client on
    the same machine connects over loopback. Process-wide; keeps a choice the server already made."""
    import aioice.ice

    if not hasattr(aioice.ice.get_host_addresses, compat.MARK):
        compat.ice_addresses(include_loopback=True, only=None)


def error(status: int, message: str) -> web.Response:
    log.info("HTTP %d: %s", status, message)
    return web.json_response({"error": message}, status=status)


@dataclass
class Peer:
    pc: object  # RTCPeerConnection
    session: Session
    created: float = field(default_factory=time.monotonic)
    tasks: list = field(default_factory=list)
    connected: bool = False  # holds a session slot from the moment ICE/DTLS connect


@dataclass
class ServerState:
    upload_dir: str
    sessions: dict[str, Peer] = field(default_factory=dict)  # session id -> peer (connected or connecting)
    uploads: dict[str, tuple[str, str]] = field(default_factory=dict)  # upload id -> (kind, path)
    pending: int = 0  # offers being set up (they hold a session slot)
    cpu: CpuSplit = field(default_factory=CpuSplit)  # the process CPU split, model vs the rest (/metrics)


ENGINE = web.AppKey("engine", Engine)
CFG = web.AppKey("cfg", ServerConfig)
STATE = web.AppKey("state", ServerState)
OWN_ENGINE = web.AppKey("own_engine", bool)
WARM_TASK = web.AppKey("warm_task", asyncio.Future)
FREEZE_TASK = web.AppKey("freeze_task", asyncio.Future)  # set by the CLI (process-wide gc.freeze)
# media workers (--workers N): session id -> base URL of the worker that owns it (None: this one)
ROUTE = web.AppKey("route", object)


# ---------------------------------------------------------------------------------- helpers
def _check_token(request: web.Request, body: dict | None = None) -> web.Response | None:
    token = request.app[CFG].token
    if not token:
        return None
    got = request.headers.get("Authorization", "")
    got = got[7:] if got.startswith("Bearer ") else (body or {}).get("token")  # never the URL (logs, history)
    if not isinstance(got, str) or not hmac.compare_digest(got.encode(), token.encode()):
        request.app[ENGINE].metrics.inc("requests_rejected_total", reason="token")
        return error(401, "missing or wrong token: send 'Authorization: Bearer <token>' (the server's --token)")
    return None


def _parse_offer(sdp: str) -> tuple[dict[str, tuple[str, list[str]]], str | None]:
    """-> ({kind: (direction, codec names)}, problem). Uses aiortc's own SDP parser."""
    from aiortc import sdp as aiortc_sdp

    if not isinstance(sdp, str) or not sdp.lstrip().startswith("v=0"):
        return {}, "malformed SDP offer: it must start with 'v=0'"
    try:
        desc = aiortc_sdp.SessionDescription.parse(sdp)
    except Exception as e:  # aiortc raises ValueError/AssertionError/... on bad SDP
        return {}, f"malformed SDP offer ({type(e).__name__}: {e})"
    for dtls in [getattr(desc, "dtls", None), *(m.dtls for m in desc.media)]:
        for fp in getattr(dtls, "fingerprints", None) or []:
            if (problem := _fingerprint_problem(fp.algorithm, fp.value)) is not None:
                return {}, problem
    media: dict[str, tuple[str, list[str]]] = {}
    for m in desc.media:
        if m.kind in ("audio", "video") and m.kind not in media:
            media[m.kind] = (m.direction or "sendrecv", [c.name.lower() for c in m.rtp.codecs])
    return media, None


def _fingerprint_problem(algorithm: str, value: str) -> str | None:
    """A DTLS fingerprint must be a known hash with as many hex bytes as the hash has."""
    n = FINGERPRINT_BYTES.get(str(algorithm).lower())
    if n is None:
        return f"bad DTLS fingerprint: unknown hash {algorithm!r}"
    parts = str(value).split(":")
    if len(parts) != n or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        return f"bad DTLS fingerprint: {algorithm} needs {n} hex bytes separated by ':'"
    return None


async def _read_json(request: web.Request, limit: int) -> dict | web.Response:
    """The body as a JSON object, read up to ``limit`` bytes (413 beyond, 400 if not an object)."""
    if request.content_length is not None and request.content_length > limit:
        return error(413, f"body too large: {request.content_length} bytes (limit {limit >> 10} KiB)")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        return error(413, f"body too large (limit {limit >> 10} KiB)")
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return error(400, 'body must be JSON: {"sdp": ..., "type": "offer", "options": {...}}')
    return body


async def _read_upload(request: web.Request, kind: str) -> tuple[str, bytes] | web.Response:
    limit, exts = UPLOAD_KINDS[kind]
    if request.content_length is not None and request.content_length > limit + 4096:
        return error(413, f"{kind} upload too large: {request.content_length} bytes (limit {limit >> 20} MiB)")
    if not request.content_type.startswith("multipart/"):
        return error(415, "upload must be multipart/form-data with a 'file' field")
    reader = await request.multipart()
    async for part in reader:
        if part.name != "file":
            continue
        name = Path(part.filename or f"{kind}.bin").name
        if Path(name).suffix.lower() not in exts:
            return error(
                415, f"unsupported {kind} file type '{Path(name).suffix or name}'; accepted: {', '.join(exts)}"
            )
        data = bytearray()
        while chunk := await part.read_chunk(1 << 16):
            data += chunk
            if len(data) > limit:
                return error(413, f"{kind} upload too large: over {limit >> 20} MiB")
        return name, bytes(data)
    return error(400, "upload has no 'file' field")


def _validate_upload(kind: str, path: Path, engine: Engine) -> None:
    """Raises InputError (unreadable / wrong type) or NoFaceError."""
    if kind == "identity":
        from rt_engine.inputs.image import decode_image_bytes

        img = decode_image_bytes(path.read_bytes(), path.name)
        engine.faces.crop(img, path.name)
    elif kind == "audio":
        from rt_engine.inputs.audio import load_audio

        wav = load_audio(path)
        if wav.size < 3200:
            raise InputError(f"{path.name}: audio shorter than 0.2 s")
    else:
        from rt_engine.inputs.pose import read_frames

        frames = read_frames(path, max_frames=5)
        if engine.faces.crop_or_none(frames[0], path.name) is None:
            raise NoFaceError(f"no face found in the first frame of {path.name}")


# ---------------------------------------------------------------------------------- handlers
async def index(request: web.Request) -> web.Response:
    return web.FileResponse(STATIC / "index.html")


async def health(request: web.Request) -> web.Response:
    app = request.app
    eng: Engine = app[ENGINE]
    warm = app.get(WARM_TASK)
    return web.json_response(
        {
            "status": "ok" if eng.scheduler.alive else "model worker stopped",
            "warm": warm is None or warm.done(),  # false while start-up still prepares the default identity/model
            "sessions": _connected(app),
            "sessions_connecting": len(app[STATE].sessions) - _connected(app),
            "max_sessions": app[CFG].max_sessions,
            "capacity_sessions": capacity_sessions(app),  # at the full fresh rate, by the measured model time
            "model_fps": {b: round(eng.scheduler.cost.fps(b), 1) for b in eng.scheduler.cost.table()},
            "one_session_fresh_fps": round(eng.plan(1).fresh_fps, 1),  # below 25: a slow model's sub-rate
            "batch_cap": eng.scheduler.cost.batch_cap(),  # largest batch the scheduler forms (capacity.py)
            "model_lanes": eng.scheduler.cost.lanes,  # batches the model runs at once (scheduler.py)
            "model_slowdown_per_session": round(eng.scheduler.cost.slowdown(1) - 1.0, 3),
            "model_cpu_per_busy_s": round(eng.scheduler.model_cpu_per_busy_s, 3),
            "model": eng.runner.describe(),
            "output_size": eng.runner.cfg.size,
            "algorithmic_latency_ms": round(1e3 * eng.clock_cfg.delay_s, 1),
            **({"model_process": eng.scheduler.remote_stats()} if hasattr(eng.scheduler, "remote_stats") else {}),
        },
        status=200 if eng.scheduler.alive else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    eng: Engine = app[ENGINE]
    m = eng.metrics
    m.set("sessions_active", _connected(app))
    m.set("sessions_connecting", len(app[STATE].sessions) - _connected(app))
    m.set("sessions_max", app[CFG].max_sessions)
    m.set("sessions_capacity", capacity_sessions(app))
    plan = eng.plan()
    m.set("plan_fresh_fraction", plan.fraction)
    m.set("plan_output_delay_seconds", plan.margin_s + LOOKAHEAD_S)
    m.set("model_frames_per_second", plan.model_fps if math.isfinite(plan.model_fps) else 0.0)
    rates = [p.session.describe() for p in app[STATE].sessions.values() if p.connected]
    m.set("session_fps_min", min((d["fps"] for d in rates), default=0.0))
    m.set("session_fresh_fps_min", min((d["fresh_fps"] for d in rates), default=0.0))
    m.set("scheduler_pending_frames", eng.scheduler.pending())
    m.set("model_busy_seconds", eng.scheduler.busy_s)
    if getattr(eng.scheduler, "thread_ids", None):  # the model runs in this process
        for part, sec in app[STATE].cpu.read(eng.scheduler.thread_ids).items():  # model vs the rest (serve/cputime.py)
            m.set("cpu_seconds", sec, part=part)
    model_side = eng.scheduler.model_metrics  # kept by a model process (--workers N): added in
    return web.Response(
        text=(m if model_side is None else m.merged(model_side)).render(),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Prometheus-Format": "0.0.4"},
    )


async def _forward(request: web.Request, sid: str) -> web.Response | None:
    """A request for a session of another media worker, forwarded to it (None: no other owner)."""
    route = request.app.get(ROUTE)
    url = route(sid) if route is not None else None
    if url is None:
        return None
    import aiohttp

    headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
    async with aiohttp.ClientSession() as http:
        async with http.request(request.method, url + request.path, headers=headers) as r:
            return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)


async def stats(request: web.Request) -> web.Response:
    peer = request.app[STATE].sessions.get(request.match_info["sid"])
    if peer is None:
        if (r := await _forward(request, request.match_info["sid"])) is not None:
            return r
        return error(404, f"no session {request.match_info['sid']!r}")
    d = peer.session.describe()
    d["connection"] = peer.pc.connectionState
    return web.json_response(d)


async def close_session(request: web.Request) -> web.Response:
    if (r := _check_token(request)) is not None:
        return r
    sid = request.match_info["sid"]
    if sid not in request.app[STATE].sessions:
        if (r := await _forward(request, sid)) is not None:
            return r
        return error(404, f"no session {sid!r}")
    await _close_peer(request.app, sid, "closed by client")
    return web.json_response({"closed": sid})


async def upload(request: web.Request) -> web.Response:
    if (r := _check_token(request)) is not None:
        return r
    kind = request.query.get("kind", "")
    if kind not in UPLOAD_KINDS:
        return error(400, f"upload kind must be one of {sorted(UPLOAD_KINDS)}, got {kind!r}")
    got = await _read_upload(request, kind)
    if isinstance(got, web.Response):
        request.app[ENGINE].metrics.inc("uploads_rejected_total", reason=str(got.status))
        return got
    name, data = got
    app = request.app
    uid = uuid.uuid4().hex[:16]
    path = Path(app[STATE].upload_dir) / f"{uid}.{kind}{Path(name).suffix.lower()}"
    path.write_bytes(data)
    try:
        await asyncio.get_running_loop().run_in_executor(None, _validate_upload, kind, path, app[ENGINE])
    except RtEngineError as e:
        path.unlink(missing_ok=True)
        msg = str(e).replace(str(path), name).replace(path.name, name)  # never show server paths
        if isinstance(e, NoFaceError):
            return error(422, f"{kind} upload: {msg}")
        return error(415, f"{kind} upload is not a usable {kind} file: {msg}")
    uploads: dict = app[STATE].uploads
    uploads[uid] = (kind, str(path))
    while len(uploads) > app[CFG].max_uploads:
        old = next(iter(uploads))
        Path(uploads.pop(old)[1]).unlink(missing_ok=True)
    return web.json_response({"upload": uid, "kind": kind, "bytes": len(data)})


def _shared_upload(app: web.Application, uid: object) -> tuple[str, str] | None:
    """(kind, path) of an upload that another media worker took into the shared upload folder."""
    if app[CFG].upload_dir is None or not isinstance(uid, str) or not UPLOAD_ID.fullmatch(uid):
        return None
    for path in Path(app[STATE].upload_dir).glob(f"{uid}.*"):
        kind = path.name.split(".")[1]
        if kind in UPLOAD_KINDS:
            return kind, str(path)
    return None


def _options(app: web.Application, raw: dict) -> SessionOptions:
    if not isinstance(raw, dict):
        raise ConfigError("options must be a JSON object")
    known = {"audio", "pose", "identity_upload", "audio_upload", "pose_upload", "stamp", "loop_audio", "webcam_fps"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown options {sorted(unknown)}; known: {sorted(known)}")

    def upload_path(key: str, kind: str) -> str | None:
        uid = raw.get(key)
        if not uid:
            return None
        got = app[STATE].uploads.get(uid) or _shared_upload(app, uid)
        if got is None or got[0] != kind:
            raise InputError(f"{key}: no {kind} upload {uid!r} (upload it first with POST /upload?kind={kind})")
        return got[1]

    fps = raw.get("webcam_fps", 5.0)
    if isinstance(fps, bool) or not isinstance(fps, int | float):
        raise ConfigError(f"webcam_fps must be a number, got {fps!r}")
    return SessionOptions(
        identity=upload_path("identity_upload", "identity"),
        audio=str(raw.get("audio", "mic")),
        audio_file=upload_path("audio_upload", "audio"),
        pose=str(raw.get("pose", "idle")),
        pose_file=upload_path("pose_upload", "pose"),
        stamp=bool(raw.get("stamp", False)),
        loop_audio=bool(raw.get("loop_audio", True)),
        webcam_fps=float(fps),
    ).validate()


async def offer(request: web.Request) -> web.Response:
    """POST /offer: validate the offer, check there is room, then build the peer and answer."""
    got = await _validate_offer(request)
    if isinstance(got, web.Response):
        return got
    body, media, opts = got
    if (r := _check_room(request.app)) is not None:
        return r
    return await _build_peer(request.app, body, media, opts)


async def _validate_offer(request: web.Request) -> tuple[dict, dict, SessionOptions] | web.Response:
    """Everything that can be checked before any work: -> (body, media, options) or the 4xx answer."""
    app = request.app
    eng: Engine = app[ENGINE]
    body = await _read_json(request, OFFER_MAX_BYTES)
    if isinstance(body, web.Response):
        return body
    if (r := _check_token(request, body)) is not None:
        return r
    if body.get("type") != "offer":
        return error(400, f"type must be 'offer', got {body.get('type')!r}")
    media, problem = _parse_offer(body.get("sdp"))
    if problem:
        eng.metrics.inc("requests_rejected_total", reason="sdp")
        return error(400, problem)
    if "video" not in media or media["video"][0] not in ("recvonly", "sendrecv"):
        return error(
            400, "the offer has no video receiver: add a video transceiver with direction 'recvonly' or 'sendrecv'"
        )
    if not any(c in VIDEO_CODECS for c in media["video"][1]):
        return error(400, f"unsupported video codec(s) {media['video'][1]}: the server sends VP8 or H264")
    if "audio" in media and "opus" not in media["audio"][1]:
        return error(400, f"unsupported audio codec(s) {media['audio'][1]}: the server uses Opus")
    try:
        opts = _options(app, body.get("options") or {})
    except RtEngineError as e:
        return error(400, f"bad options: {e}")
    if opts.audio == "mic" and ("audio" not in media or media["audio"][0] not in ("sendonly", "sendrecv")):
        return error(
            400, "options.audio='mic' but the offer sends no audio track (add the microphone, or use audio='file')"
        )
    if opts.pose == "webcam" and media["video"][0] != "sendrecv":
        return error(400, "options.pose='webcam' but the offer sends no video track (add the webcam)")
    return body, media, opts


def _connected(app: web.Application) -> int:
    return sum(1 for p in app[STATE].sessions.values() if p.connected)


def capacity_sessions(app: web.Application) -> int:
    """How many sessions the measured model capacity serves at the full fresh rate (<= --max-sessions)."""
    eng: Engine = app[ENGINE]
    cap = app[CFG].max_sessions
    return next((n - 1 for n in range(1, cap + 1) if not eng.admits(n)), cap)


def _check_room(app: web.Application) -> web.Response | None:
    """Admission: a slot under --max-sessions, model capacity for one more session at the full fresh
    rate (the first session is always admitted, at the model's own rate), and room among the offers
    still connecting."""
    cfg: ServerConfig = app[CFG]
    eng: Engine = app[ENGINE]
    if not eng.scheduler.alive:
        eng.metrics.inc("sessions_rejected_total", reason="model")
        return error(503, "the model worker stopped; try again later")
    # with media workers (--workers N) the sessions of all of them share the model and --max-sessions
    local = _connected(app)
    connected = eng.scheduler.sessions_total(local)
    connecting = len(app[STATE].sessions) - local + app[STATE].pending
    if connected >= cfg.max_sessions:
        eng.metrics.inc("sessions_rejected_total", reason="full")
        return error(503, f"server full: {cfg.max_sessions} of {cfg.max_sessions} sessions in use; try again later")
    # the first session is always taken: a model slower than real time streams its own rate to it as
    # fresh frames (an even sub-rate, capacity.py); only sharing the model needs the capacity
    refusal = eng.refusal(connected + 1) if cfg.admit_by_capacity and connected >= 1 else None
    if refusal is not None:
        eng.metrics.inc("sessions_rejected_total", reason="capacity")
        return error(503, f"server at model capacity: {refusal}; try again later")
    if connecting >= cfg.max_pending:
        eng.metrics.inc("sessions_rejected_total", reason="pending")
        return error(503, f"too many offers still connecting ({connecting}); try again in a few seconds")
    return None


async def _build_peer(app: web.Application, body: dict, media: dict, opts: SessionOptions) -> web.Response:
    """Create the session and the peer connection, answer the offer. The peer holds a session slot
    only once it connects (``_on_connected``); until then it counts against ``max_pending``."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from rt_engine.serve.tracks import EngineAudioTrack, EngineVideoTrack, drain, run_audio_track, run_webcam_track

    eng: Engine = app[ENGINE]
    cfg: ServerConfig = app[CFG]
    app[STATE].pending += 1
    pc = None
    ok = False
    try:
        try:
            session = await eng.create_session(opts)
        except NoFaceError as e:
            return error(422, str(e))
        except RtEngineError as e:
            return error(400, str(e))
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        peer = Peer(pc, session)
        sid = session.sid

        def seen(now: float) -> None:
            session.last_input = now

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio" and opts.audio == "mic":
                session.add_task(run_audio_track(session, track))
            elif track.kind == "video" and opts.pose == "webcam":
                session.add_task(run_webcam_track(session, track))
            else:  # unused inbound media must still be read, or aiortc queues it forever
                session.add_task(drain(track))

        @pc.on("connectionstatechange")
        async def on_state():
            log.info("session %s: connection %s", sid, pc.connectionState)
            if pc.connectionState == "connected":
                await _on_connected(app, sid)
            if pc.connectionState in ("failed", "closed"):
                await _close_peer(app, sid, f"connection {pc.connectionState}")

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="offer"))
        except Exception as e:
            await session.close()
            return error(400, f"cannot use the SDP offer ({type(e).__name__}: {e})")
        for t in pc.getTransceivers():
            if t.kind == "audio":
                compat.set_audio_jitter(t.receiver, cfg.audio_jitter_frames)
        pc.addTrack(EngineVideoTrack(session))
        if "audio" in media and media["audio"][0] in ("recvonly", "sendrecv"):
            pc.addTrack(EngineAudioTrack(session))
        for t in pc.getTransceivers():
            compat.on_rtcp(t.sender, seen)
            compat.on_rtcp(t.receiver, seen)
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:
            await session.close()
            return error(400, f"cannot answer the offer ({type(e).__name__}: {e})")
        app[STATE].sessions[sid] = peer
        ok = True
        peer.tasks.append(asyncio.ensure_future(_watchdog(app, sid)))
        eng.metrics.inc("sessions_total")
        log.info("session %s: answered (audio=%s pose=%s)", sid, opts.audio, opts.pose)
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "session": sid})
    finally:
        app[STATE].pending -= 1
        if pc is not None and not ok:
            await pc.close()


async def _on_connected(app: web.Application, sid: str) -> None:
    """A peer connected: it takes a session slot now, if one is still free."""
    peer = app[STATE].sessions.get(sid)
    if peer is None or peer.connected:
        return
    cfg: ServerConfig = app[CFG]
    if _connected(app) >= cfg.max_sessions:
        app[ENGINE].metrics.inc("sessions_rejected_total", reason="full_at_connect")
        await _close_peer(app, sid, "full: no slot left when it connected")
        return
    peer.connected = True
    peer.session.last_input = time.monotonic()


async def _watchdog(app: web.Application, sid: str) -> None:
    """Close a session whose client vanished: no inbound media or RTCP for ``peer_timeout_s``, or
    not connected within ``connect_timeout_s`` of the answer."""
    cfg: ServerConfig = app[CFG]
    while True:
        await asyncio.sleep(min(1.0, cfg.peer_timeout_s / 4, cfg.connect_timeout_s / 4))
        peer = app[STATE].sessions.get(sid)
        if peer is None:
            return
        s = peer.session
        now = time.monotonic()
        if not peer.connected and now - peer.created > cfg.connect_timeout_s:
            await _close_peer(app, sid, "never connected")
            return
        if peer.connected and now - s.last_input > cfg.peer_timeout_s:
            await _close_peer(app, sid, f"silent: nothing from the client for {cfg.peer_timeout_s:g} s")
            return


async def _close_peer(app: web.Application, sid: str, reason: str) -> None:
    peer = app[STATE].sessions.pop(sid, None)
    if peer is None:
        return
    log.info("session %s: closing (%s); %s", sid, reason, peer.session.describe())
    app[ENGINE].metrics.inc("sessions_closed_total", reason=reason.split(" ")[0])
    current = asyncio.current_task()
    for t in peer.tasks:
        if t is not current:
            t.cancel()
    await peer.session.close()
    await peer.pc.close()
    # after this coroutine and its caller let go of the peer, not now (it would still be reachable)
    asyncio.get_running_loop().call_later(0.2, collect_garbage, app[ENGINE].metrics)


def collect_garbage(metrics: Metrics) -> float:
    """Full cyclic garbage collection after a session ends; returns its duration in seconds.

    A finished session is reference cycles (aiortc peer, event handlers, tasks, session) that hold
    native memory: codec contexts, frames. They outlive the ~1 s generation-0/1 collections and then
    wait for a generation-2 collection, which Python runs only after the long-lived heap grew by a
    quarter, rarely with torch loaded. Measured before this: RSS +0.66 MB per connect/disconnect
    cycle over 150 cycles (soak.py --churn), flat with a collection per close. Together with
    freeze_startup_heap() one collection takes about 10 ms (unfrozen: 130-240 ms)."""
    t0 = time.perf_counter()
    n = gc.collect()
    dt = time.perf_counter() - t0
    metrics.observe("gc_seconds", dt)
    log.debug("gc after session close: %d objects, %.1f ms", n, 1e3 * dt)
    return dt


def freeze_startup_heap() -> int:
    """Move everything alive after start-up (torch, models, caches: ~260k objects) to the permanent
    generation, so the per-close collections only walk what sessions created. Returns the count."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# ---------------------------------------------------------------------------------- app
async def _on_shutdown(app: web.Application) -> None:
    for sid in list(app[STATE].sessions):
        await _close_peer(app, sid, "server shutdown")


async def _on_startup(app: web.Application) -> None:
    async def warm() -> None:
        try:
            await app[ENGINE].prepare_default()
        except Exception as e:  # the first default session will compute them (and report any error)
            log.warning("could not prepare the default identity ahead: %s", e)

    app[WARM_TASK] = asyncio.ensure_future(warm())


async def after_warm_up(app: web.Application) -> None:
    """Wait until start-up has prepared the default identity and the model (at once without it)."""
    task = app.get(WARM_TASK)
    if task is not None:
        await asyncio.shield(task)


async def _on_cleanup(app: web.Application) -> None:
    for key in (WARM_TASK, FREEZE_TASK):
        task = app.get(key)
        if task is not None and not task.done():
            task.cancel()
    if app[OWN_ENGINE]:
        app[ENGINE].close()
    if app[CFG].upload_dir is None:  # a shared folder belongs to the parent process
        shutil.rmtree(app[STATE].upload_dir, ignore_errors=True)


def create_app(
    engine: Engine, cfg: ServerConfig | None = None, own_engine: bool = True, warm_default: bool = False
) -> web.Application:
    """The aiohttp application. ``own_engine``: close the engine on cleanup."""
    cfg = (cfg or ServerConfig()).validate()
    compat.check()
    only = cfg.ice_only_address
    compat.ice_addresses(include_loopback=cfg.use_loopback_ice and only is None, only=only)
    compat.vp8_denoiser(cfg.vp8_noise_sensitivity)
    app = web.Application(client_max_size=max(v[0] for v in UPLOAD_KINDS.values()) + (1 << 20))
    app[CFG] = cfg
    app[ENGINE] = engine
    app[OWN_ENGINE] = own_engine
    app[STATE] = ServerState(upload_dir=cfg.upload_dir or tempfile.mkdtemp(prefix="rt_engine_uploads_"))
    m = engine.metrics
    m.describe(
        "stage_latency_seconds",
        "histogram",
        "per-stage latency: mel (window complete to job), queue, model "
        "(batch compute), media_to_send (input media time to frame send)",
    )
    m.describe("frames_dropped_total", "counter", "frames not shown fresh, by reason")
    m.describe("frames_fresh_total", "counter", "sent frames generated for their own slot (the rest hold)")
    m.describe("frames_computed_late_total", "counter", "frames computed and then too late for their slot")
    m.describe("session_fresh_fps_min", "gauge", "lowest fresh frames per second of the connected sessions")
    m.describe("sessions_capacity", "gauge", "sessions the measured model time serves at the full fresh rate")
    m.describe(
        "cpu_seconds", "gauge", "process CPU seconds so far: the model's (its thread and runtime pools) and the rest"
    )
    m.describe("gc_seconds", "histogram", "full garbage collection after each session close (frees its cycles)")
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats/{sid}", stats)
    app.router.add_post("/close/{sid}", close_session)
    app.router.add_post("/upload", upload)
    app.router.add_post("/offer", offer)
    if warm_default:  # the bundled identity and idle motion, computed before the first session
        app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app
