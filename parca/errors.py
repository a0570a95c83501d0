"""One error family for everything a user can get wrong.

The CLI turns a ``ParcaError`` into a one-line message and a non-zero exit; anything else
is a bug and keeps its traceback.
"""


class ParcaError(Exception):
    """A user-facing error: the message names the file / tensor / field, what was expected, and the fix."""


class ConfigError(ParcaError):
    """config.json (or an adapter config) is missing, malformed, or describes an unsupported model."""


class CheckpointError(ParcaError):
    """A weight file is missing, corrupt, or holds a tensor of the wrong name or shape."""


class ContextError(ParcaError):
    """A prompt or request does not fit the model's context or the cache."""


class MemoryBudgetError(ParcaError):
    """The weights and cache would not fit in the memory available."""


class QueueFullError(ParcaError):
    """The engine's queue is full: the request is refused (HTTP 429), retry later."""
