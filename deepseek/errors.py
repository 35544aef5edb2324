"""One exception hierarchy. Messages say what went wrong, where, and what to do."""


class DeepseekError(Exception):
    """Base class of every error Deepseek raises on purpose."""


class IRError(DeepseekError):
    """A graph is malformed (dangling value, wrong arity, type mismatch, cycle...)."""


class CaptureError(DeepseekError):
    """A model could not be captured into the IR."""


class UnsupportedOpError(CaptureError):
    """An operator has no Deepseek mapping (and strict mode forbids the fallback)."""


class BackendError(DeepseekError):
    """A backend is unknown, unavailable or failed to compile/execute a graph."""


class InputError(DeepseekError):
    """An Engine was called with inputs that do not match what it was compiled for."""


class ArtifactError(DeepseekError):
    """A .dsk file is truncated, corrupt, foreign or of an unsupported version."""


class MemoryBudgetError(DeepseekError):
    """A memory budget cannot be met (the message gives the least the pass reaches)."""


class DeepseekWarning(UserWarning):
    """Something compiled, but not as asked (e.g. a precision this machine runs slowly)."""
