"""WebRTC server of the streaming engine: ``python -m rt_engine.serve``.

:mod:`.app` (aiohttp routes, session negotiation), :mod:`.tracks` (paced outgoing tracks),
``static/`` (the page). The aiortc test client lives in ``benchmarks/client.py``.
"""

from rt_engine.serve.app import ServerConfig, create_app, enable_loopback_candidates

__all__ = ["ServerConfig", "create_app", "enable_loopback_candidates"]
