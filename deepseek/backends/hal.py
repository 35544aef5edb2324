"""The hardware abstraction layer: the Backend interface, its registry and plug-ins.

A backend is four calls (the article's HAL) plus ``supports`` and
``capabilities``:

* ``allocate(nbytes, memory_type) -> Buffer`` and ``deallocate(buffer)``
* ``compile(graph, target) -> Executable``: a subgraph (one partition) to
  something runnable; a single op is the one-node case
* ``execute(executable, inputs, outputs=None) -> outputs``

Third-party backends register through the ``deepseek.backends`` entry-point
group: the entry point names a zero-argument callable returning a Backend.
See ``docs/writing-a-backend.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Sequence

import torch

from deepseek.errors import BackendError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "deepseek.backends"


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers; the partitioner and ``backend="auto"`` read this."""

    device: str  # torch device string its tensors live on, e.g. "cpu", "cuda:0"
    dtypes: frozenset[torch.dtype] = frozenset({torch.float32})
    priority: int = 0  # "auto" picks the available backend with the highest priority
    memory_types: tuple[str, ...] = ("device",)
    extras: dict[str, Any] = field(default_factory=dict)
    # reduced precisions ("bf16", "fp16", "int8") with native kernels on this machine;
    # ds.compile(precision=...) keeps float32 for a float one that is not, and says when
    # a quantized model's integer kernels are not native (a warning). None: all.
    precisions: frozenset[str] | None = None


class Backend:
    """Base class of every backend. The defaults raise, naming what is missing."""

    name: str = "unnamed"

    def capabilities(self) -> Capabilities:
        raise NotImplementedError(f"backend {self.name!r} needs capabilities()")

    def is_available(self) -> bool:
        return True

    def supports(self, node) -> bool:
        """Whether this backend can run ``node`` (a deepseek.ir Node)."""
        raise NotImplementedError(f"backend {self.name!r} needs supports(node)")

    def allocate(self, nbytes: int, memory_type: str = "device") -> torch.Tensor:
        """A raw buffer of ``nbytes`` on the backend's device (a uint8 tensor)."""
        return torch.empty(nbytes, dtype=torch.uint8, device=self.capabilities().device)

    def deallocate(self, buffer: torch.Tensor) -> None:
        """Release a buffer from ``allocate`` (PyTorch frees it with its last reference)."""
        del buffer

    def compile(self, graph, target: str | None = None) -> Any:
        """Compile a Graph (all of whose nodes this backend supports) into an executable."""
        raise NotImplementedError(f"backend {self.name!r} needs compile(graph, target)")

    def execute(self, executable: Any, inputs: Sequence[torch.Tensor],
                outputs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run an executable; writes into ``outputs`` when given, returns the outputs.

        The default calls ``executable(inputs)``: backends whose executables are
        callables need not override it.
        """
        if not callable(executable):
            raise NotImplementedError(f"backend {self.name!r} needs execute(executable, inputs)")
        results = executable(inputs)
        if outputs is None:
            return results
        for dst, src in zip(outputs, results):
            dst.copy_(src)
        return list(outputs)


_FACTORIES: dict[str, Callable[[], Backend]] = {}
_INSTANCES: dict[str, Backend] = {}
_discovered = False


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Make a backend available as ``ds.compile(..., backend=name)``.

    ``factory`` is a zero-argument callable (e.g. the Backend subclass).
    """
    if not name or not isinstance(name, str):
        raise BackendError("a backend needs a non-empty string name")
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def _builtin() -> None:
    from deepseek.backends.cpu import CPUBackend
    from deepseek.backends.cuda import CUDABackend
    from deepseek.backends.reference import ReferenceBackend

    _FACTORIES.setdefault("cpu", CPUBackend)
    _FACTORIES.setdefault("cuda", CUDABackend)
    _FACTORIES.setdefault("reference", ReferenceBackend)


def discover() -> None:
    """Load the built-in backends and the plug-ins installed as entry points (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    _builtin()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _FACTORIES:
            continue
        try:
            _FACTORIES[ep.name] = ep.load()
        except Exception as e:  # a broken plug-in must not break the others
            log.warning("backend plug-in %r (%s) failed to load: %s", ep.name, ep.value, e)


def available_backends() -> list[str]:
    discover()
    return sorted(_FACTORIES)


def _instance(name: str) -> Backend:
    """The shared instance of the registered backend ``name`` (created on first use)."""
    if name not in _INSTANCES:
        backend = _FACTORIES[name]()
        if not isinstance(backend, Backend):
            raise BackendError(f"backend factory for {name!r} returned {type(backend).__name__}, "
                               "not a deepseek.backends.Backend")
        backend.name = name
        _INSTANCES[name] = backend
    return _INSTANCES[name]


def get_backend(name: str) -> Backend:
    """The (shared) instance of a registered backend; ``"auto"`` picks the best available."""
    discover()
    if name == "auto":
        best, best_priority = None, 0
        for n in list(_FACTORIES):
            try:  # an unavailable or broken plug-in must not break "auto"
                b = _instance(n)
                if not b.is_available():
                    continue
                priority = b.capabilities().priority
            except Exception as e:
                log.warning("backend %r skipped by backend='auto': %s: %s", n, type(e).__name__, e)
                continue
            if best is None or priority > best_priority:
                best, best_priority = b, priority
        if best is None:
            raise BackendError("no backend is available (backend='auto')")
        return best
    if name not in _FACTORIES:
        raise BackendError(f"unknown backend {name!r}; available: {available_backends()}. "
                           "Third-party backends register through the 'deepseek.backends' "
                           "entry point")
    backend = _instance(name)
    if not backend.is_available():
        raise BackendError(f"backend {name!r} is installed but not available on this machine")
    return backend
