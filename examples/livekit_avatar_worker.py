"""The rt_engine avatar as a LiveKit Agents worker. No API key beyond your LiveKit server's own.

    pip install 'rt_engine[livekit]'
    # a local server: `livekit-server --dev` (key devkey, secret secret), or LiveKit Cloud settings
    export LIVEKIT_URL=ws://127.0.0.1:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret
    python examples/livekit_avatar_worker.py [--identity face.jpg] [--load-threshold 0.8] dev
    # production (several machines, each one worker): ... start

The worker registers as agent ``rt-engine-avatar``. Your voice agent asks for an avatar in its room
by dispatching that agent name (LiveKit's agent dispatch API), and sends its TTS audio to the avatar
participant with ``livekit.agents.voice.avatar.DataStreamAudioOutput`` (``destination_identity``:
the avatar worker's participant identity); the avatar publishes lip-synced video and the speech.

Each worker reports its load as the share of time its model thread is busy; LiveKit stops sending
jobs to a worker above ``--load-threshold`` (production mode only; ``dev`` mode ignores load).
See docs/agents.md.
"""

from __future__ import annotations

import sys

from rt_engine.integrations import require

if __name__ == "__main__":
    try:
        require("livekit.agents", "livekit")
    except ImportError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    from rt_engine.integrations.livekit import main

    sys.exit(main())
