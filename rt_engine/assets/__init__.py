"""Files that ship inside the package, and the one place their paths are written.

The bundled model (``default.safetensors``, its model card ``default_model.md``), the demo photo
and speech the page and ``make render-demo`` use by default.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DEFAULT_MODEL = ASSETS / "default.safetensors"  # fp16 single-file model (rt_engine.models.checkpoint)
MODEL_CARD = ASSETS / "default_model.md"
DEFAULT_IDENTITY = ASSETS / "identity.jpg"  # aligned 224x224 demo photo
DEFAULT_SPEECH = ASSETS / "speech.flac"  # demo speech clip
