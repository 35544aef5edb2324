"""Captured graphs kept on disk, keyed by the exported program they come from.

``ds.capture`` traces the model with ``torch.export`` (0.6-0.9 s for ResNet-50 on a
2-core CPU), then ``run_decompositions`` traces the exported program again down to
core ATen (1.8-2.0 s) and the result is converted to the IR. That second trace and the
conversion depend only on the exported program and the library versions, so their
result is cached under a hash of the exported program: its code, its signature, the
shape and dtype of every input, parameter and buffer, the values of its other tensor
constants and of small parameters and buffers (anything a trace might read as a
number), each node's source location and module path, the input and output
structure, ``strict``, the dynamic dims' names, and the torch, Python and Deepseek
versions. A model whose code changes traces to another program, so it misses.

Two keys lead to an entry. The exported program's needs the ``torch.export`` trace (and
the import of torch._dynamo), most of a warm start. So each entry is also linked from a
hash of the model itself, taken without tracing (``fingerprint.py`` says what it
covers): a capture of the same model, inputs and source files finds the entry through
that link and does not trace at all. A model the fingerprint cannot hash is traced and
found by the second key; ``DEEPSEEK_CAPTURE_CACHE=traced`` uses only the second key.

Parameters and buffers are never stored: a cached graph takes them from the model
being captured, by name. Tensors the decompositions made are stored with the graph as
safetensors (nothing is ever unpickled). Entries live in ``$DEEPSEEK_CACHE_DIR/capture``;
``DEEPSEEK_CAPTURE_CACHE=0`` turns the cache off. A damaged entry or link is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from typing import Mapping

import torch
from safetensors.torch import load as st_load, save as st_save

from deepseek.frontend.fingerprint import Unkeyable, fingerprint
from deepseek.ir.graph import Graph
from deepseek.runtime.cache import cache_root

log = logging.getLogger(__name__)

_SMALL = 64  # parameters and buffers of at most this many elements are keyed by value


def enabled() -> bool:
    return os.environ.get("DEEPSEEK_CAPTURE_CACHE", "1") != "0"


def model_key(model: torch.nn.Module, inputs: list, extra: object) -> str | None:
    """The first key: a hash of the model itself (``fingerprint.py``), found without
    tracing; None where the cache is off, ``DEEPSEEK_CAPTURE_CACHE=traced`` asks for the
    exported program's key only, or the model holds something it cannot hash."""
    if not enabled() or os.environ.get("DEEPSEEK_CAPTURE_CACHE") == "traced":
        return None
    try:
        return fingerprint(model, inputs, extra)
    except Unkeyable as e:
        log.debug("capture of %s traced every time: %s", type(model).__name__, e)
    except Exception as e:  # noqa: BLE001 (an object whose hashing fails: trace it)
        log.warning("could not fingerprint %s (%s: %s); tracing it", type(model).__name__,
                    type(e).__name__, e)
    return None


def load_for_model(model_key: str, model: torch.nn.Module) -> Graph | None:
    """The graph a capture of the same model stored (``link``), its parameters and
    buffers taken from ``model``; None on a miss."""
    try:
        with open(_path("m-" + model_key) + ".json") as f:
            key = json.load(f)["key"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("capture cache link %s unreadable (%s); capturing afresh", model_key, e)
        return None
    return load(str(key), model.state_dict(keep_vars=True))


def link(model_key: str, key: str) -> None:
    """Point ``model_key`` at the entry stored under ``key`` (if it was stored)."""
    if not os.path.exists(_path(key) + ".json"):
        return
    base = _path("m-" + model_key)
    try:
        _write(base + ".json", json.dumps({"key": key}).encode())
    except OSError as e:
        log.warning("could not write the capture cache link %s: %s", base, e)


def _path(key: str) -> str:
    return os.path.join(cache_root(), "capture", key)


def _write(path: str, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed over it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def key(ep, extra: object) -> str:
    """The hash of the exported program ``ep`` (see the module's docstring) and
    ``extra`` (JSON-able: the capture's other arguments)."""
    from deepseek import __version__

    h = hashlib.sha256()

    def add(x) -> None:
        h.update(json.dumps(x, sort_keys=True, default=str).encode())
        h.update(b"\0")

    def add_tensor(t: torch.Tensor, by_value: bool) -> None:
        add([list(t.shape), str(t.dtype)])
        if by_value:
            h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())

    add([torch.__version__, sys.version, __version__, extra])
    add(ep.graph_module.code)
    add([str(s) for s in ep.graph_signature.input_specs])
    add([str(s) for s in ep.graph_signature.output_specs])
    add([str(ep.call_spec.in_spec), str(ep.call_spec.out_spec)])
    for n in ep.graph.nodes:
        val = n.meta.get("val")
        add([n.name, n.meta.get("stack_trace"), str(n.meta.get("nn_module_stack")),
             [str(val.shape), str(val.dtype)] if isinstance(val, torch.Tensor) else str(val)])
    for name in sorted(ep.state_dict):
        t = ep.state_dict[name]
        add(name)
        add_tensor(t, t.numel() <= _SMALL)
    for name in sorted(ep.constants):
        t = ep.constants[name]
        add(name)
        if isinstance(t, torch.Tensor):
            add_tensor(t, True)
        else:
            add(type(t).__qualname__)  # a script object: never cached (see store)
    return h.hexdigest()


def load(key: str, state: Mapping[str, torch.Tensor]) -> Graph | None:
    """The graph cached under ``key``, its parameters and buffers taken from ``state``
    (the exported program's or the model's state dict, by name); None on a miss (or an
    entry that does not read back)."""
    from deepseek.runtime.artifact import graph_from_json

    base = _path(key)
    try:
        with open(base + ".json") as f:
            doc = json.load(f)
        with open(base + ".safetensors", "rb") as f:
            tensors = st_load(f.read())
        for name, target in doc["from_model"].items():
            tensors[name] = state[target]
        graph, _ = graph_from_json(doc["graph"], tensors)
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged or stale entry: capture afresh
        log.warning("capture cache entry %s unreadable (%s: %s); capturing afresh", key,
                    type(e).__name__, e)
        return None
    return graph


def store(key: str, graph: Graph, ep) -> None:
    """Cache ``graph`` (captured from ``ep``) under ``key``; failures only log."""
    from deepseek.runtime.artifact import graph_to_json

    if any(not isinstance(t, torch.Tensor) for t in ep.constants.values()):
        return  # script objects (custom classes) cannot be stored
    owners = {t.data_ptr(): name for name, t in ep.state_dict.items() if t.numel()}
    from_model, stored = {}, {}
    for name, t in graph.constants.items():
        target = owners.get(t.data_ptr()) if t.numel() else None
        if target is not None and ep.state_dict[target].shape == t.shape \
                and ep.state_dict[target].dtype == t.dtype:
            from_model[name] = target
        elif t.numel() <= _SMALL or any(  # keyed by value: safe to store
                c.shape == t.shape and c.dtype == t.dtype and torch.equal(c, t)
                for c in ep.constants.values()):
            stored[name] = t.detach().contiguous().cpu()
        else:  # a tensor of unknown origin might follow the weights: never freeze it
            log.debug("capture not cached: constant %s is neither a parameter nor keyed", name)
            return
    base = _path(key)
    try:
        _write(base + ".safetensors", st_save(stored))
        # the graph last: an entry counts once its JSON is there
        _write(base + ".json", json.dumps({"graph": graph_to_json(graph),
                                           "from_model": from_model}).encode())
    except OSError as e:
        log.warning("could not write the capture cache entry %s: %s", base, e)
