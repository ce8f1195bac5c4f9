"""Every hook into private names of aiortc and aioice, in one place.

The server needs five things that aiortc/aioice do not offer publicly:

* ``aioice.ice.get_host_addresses``: which local addresses ICE gathers (and binds UDP sockets on).
  Replaced to add 127.0.0.1 (a client on the same machine) or to keep only the address HTTP is bound
  to (``--host 127.0.0.1`` must not open media sockets on public or IPv6 addresses).
* ``RTCRtpReceiver._RTCRtpReceiver__jitter_buffer`` and ``aiortc.jitterbuffer.JitterBuffer``: the
  audio jitter buffer holds 4 packets (80 ms) before decoding; a live mic on a LAN needs 1.
* ``RTCRtpSender._handle_rtcp_packet`` / ``RTCRtpReceiver._handle_rtcp_packet``: every RTCP packet
  from the peer counts as a sign of life, so a client that only receives is watched too.
* ``aiortc.rtcrtpsender.get_encoder`` and the codec options of ``aiortc.codecs.vpx.Vp8Encoder``:
  aiortc opens libvpx with ``noise-sensitivity 4``, a denoiser meant for camera noise. Generated
  frames have none. With it off, 150 frames of the bundled model (224 px, aiortc's default bitrate)
  took 1.35 against 1.47 ms of encoder CPU per frame and decoded at 41.9 against 40.2 dB PSNR.

:func:`check` verifies that the installed versions are ones these hooks were written against and that
every private name still exists; it raises :class:`CompatError` naming what is missing. The server
calls it at start-up, and a test calls it, so an upgrade that removes a name fails loudly instead of
silently losing a feature.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

TESTED = {"aiortc": ((1, 9), (2, 0)), "aioice": ((0, 9), (1, 0))}  # [lowest, first untested) major.minor
MARK = "_rt_engine_hook"


class CompatError(RuntimeError):
    """An installed aiortc/aioice lacks a private name the server hooks into."""


def _version(mod: Any) -> tuple[int, int]:
    parts = str(getattr(mod, "__version__", "0.0")).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def check() -> None:
    """Fail loudly when a hooked private name is gone; warn for an untested version."""
    import aioice
    import aioice.ice
    import aiortc
    from aiortc import jitterbuffer, rtcrtpreceiver, rtcrtpsender

    for mod in (aiortc, aioice):
        lo, hi = TESTED[mod.__name__]
        if not lo <= _version(mod) < hi:
            log.warning(
                "%s %s is outside the tested range %s-%s; rt_engine.serve.compat checks its hooks",
                mod.__name__,
                mod.__version__,
                ".".join(map(str, lo)),
                ".".join(map(str, hi)),
            )
    missing = []
    if not callable(getattr(aioice.ice, "get_host_addresses", None)):
        missing.append("aioice.ice.get_host_addresses")
    if not hasattr(jitterbuffer, "JitterBuffer"):
        missing.append("aiortc.jitterbuffer.JitterBuffer")
    for cls in (rtcrtpreceiver.RTCRtpReceiver, rtcrtpsender.RTCRtpSender):
        if not callable(getattr(cls, "_handle_rtcp_packet", None)):
            missing.append(f"{cls.__module__}.{cls.__name__}._handle_rtcp_packet")
    import inspect

    if "__jitter_buffer" not in inspect.getsource(rtcrtpreceiver.RTCRtpReceiver.__init__):
        missing.append("aiortc.rtcrtpreceiver.RTCRtpReceiver.__jitter_buffer")
    if not callable(getattr(rtcrtpsender, "get_encoder", None)):
        missing.append("aiortc.rtcrtpsender.get_encoder")
    from aiortc.codecs import vpx

    encode = inspect.getsource(vpx.Vp8Encoder.encode)
    if "self.codec.options" not in encode or '"noise-sensitivity"' not in encode:
        missing.append("aiortc.codecs.vpx.Vp8Encoder.codec.options['noise-sensitivity']")
    if missing:
        raise CompatError(
            f"aiortc {aiortc.__version__} / aioice {aioice.__version__} lack private names that "
            f"rt_engine.serve hooks into: {', '.join(missing)} (see rt_engine/serve/compat.py)"
        )


def ice_addresses(include_loopback: bool, only: str | None) -> None:
    """Set which local addresses ICE gathers, process-wide (idempotent, re-settable):
    ``only``: just that address (where HTTP binds); else the default ones plus 127.0.0.1 when
    ``include_loopback``."""
    import aioice.ice

    current = aioice.ice.get_host_addresses
    orig: Callable[[bool, bool], list[str]] = getattr(current, MARK, current)

    def addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        if only is not None:
            return [only]
        addrs = orig(use_ipv4, use_ipv6)
        if include_loopback and use_ipv4 and "127.0.0.1" not in addrs:
            addrs = ["127.0.0.1", *addrs]
        return addrs

    setattr(addresses, MARK, orig)
    aioice.ice.get_host_addresses = addresses


class _VpxOptions:
    """A libvpx codec context whose ``options`` get ``noise-sensitivity`` replaced; the rest passes through."""

    __slots__ = ("_ctx", "_noise")

    def __init__(self, ctx: Any, noise: int) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_noise", noise)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "options":
            value = {**value, "noise-sensitivity": str(self._noise)}
        setattr(self._ctx, name, value)


def _vp8_encoder_class(noise: int) -> type:
    from aiortc.codecs.vpx import Vp8Encoder

    class Vp8EncoderNoise(Vp8Encoder):
        """aiortc's VP8 encoder with libvpx's denoiser set to ``noise`` (0 = off, aiortc: 4)."""

        @property
        def codec(self) -> Any:
            return self._rt_codec

        @codec.setter
        def codec(self, ctx: Any) -> None:
            self._rt_codec = None if ctx is None else _VpxOptions(ctx, noise)

    return Vp8EncoderNoise


def vp8_denoiser(level: int | None) -> None:
    """Set libvpx's ``noise-sensitivity`` (0-6) of every VP8 encoder aiortc creates from now on,
    process-wide (idempotent, re-settable); None restores aiortc's own encoder (4)."""
    from aiortc import rtcrtpsender

    if level is not None and not 0 <= level <= 6:
        raise ValueError(f"VP8 noise sensitivity must be in [0, 6], got {level}")
    current = rtcrtpsender.get_encoder
    orig = getattr(current, MARK, current)
    if level is None:
        rtcrtpsender.get_encoder = orig
        return
    cls = _vp8_encoder_class(level)

    def get_encoder(codec: Any) -> Any:
        if codec.mimeType.lower() == "video/vp8":
            return cls()
        return orig(codec)

    setattr(get_encoder, MARK, orig)
    rtcrtpsender.get_encoder = get_encoder


def set_audio_jitter(receiver: Any, frames: int) -> None:
    """aiortc holds 4 audio packets (80 ms) before decoding; a live mic on a LAN needs ~1."""
    from aiortc.jitterbuffer import JitterBuffer

    receiver._RTCRtpReceiver__jitter_buffer = JitterBuffer(capacity=16, prefetch=frames)


def on_rtcp(obj: Any, seen: Callable[[float], None]) -> None:
    """Call ``seen(now)`` for every RTCP packet ``obj`` (an RTCRtpSender or RTCRtpReceiver) handles."""
    orig = obj._handle_rtcp_packet

    async def hooked(packet):
        seen(time.monotonic())
        return await orig(packet)

    obj._handle_rtcp_packet = hooked
