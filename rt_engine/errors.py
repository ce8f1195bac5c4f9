"""User-facing errors. Command-line tools print ``str(err)`` as one line and exit non-zero."""


class RtEngineError(Exception):
    """Base class of every error caused by bad input, config or files (not by a bug)."""


class ConfigError(RtEngineError):
    """A config value is invalid."""


class InputError(RtEngineError):
    """An input file (image, audio, video) is missing, unreadable or unusable."""


class CheckpointError(RtEngineError):
    """A checkpoint is missing, unreadable or does not match the model config."""


class NoFaceError(InputError):
    """No face was found in an image or video."""
