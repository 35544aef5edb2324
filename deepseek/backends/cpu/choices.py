"""The CPU backend's measured kernel choices, kept on disk for the next compile.

Building a plan measures every choice between kernels (``codegen._fastest``: a few
tens of milliseconds each, 3-8 s for ResNet-50 or BERT-base on 2 cores), and the same
graph on the same machine asks the same questions again: a warm ``ds.compile`` and
every ``ds.load`` rebuild their plans. Choices are stored per machine (this CPU's
model and flags, the thread count, the torch and Deepseek versions, which native
libraries are built, a hash of this backend's code) in
``$DEEPSEEK_CACHE_DIR/cpu_choices/<machine>.json``, keyed by the graph (a hash of its
encoding, values numbered in order), the symbol bindings, the node and the
decision's place among that node's decisions, and the candidates' names. A stored choice that is
not among the candidates is measured again. A choice is measured once: one made
while the machine was unusually loaded stays until the cache file is deleted.
``DEEPSEEK_CPU_CHOICE_CACHE=0`` turns the cache off (every choice measured, nothing
written).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
from typing import Iterator

import torch

from deepseek.runtime.cache import cache_root

log = logging.getLogger(__name__)
_local = threading.local()


class _Table:
    def __init__(self, path: str, graph_key: str):
        self.path = path
        self.graph_key = graph_key
        self.node = "-"
        self.count = 0
        self.new: dict[str, str] = {}
        try:
            with open(path) as f:
                self.table = json.load(f)
            if not isinstance(self.table, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            self.table = {}
        except (OSError, ValueError) as e:
            log.warning("CPU choice cache %s unreadable (%s); measuring afresh", path, e)
            self.table = {}

    def key(self, names: list[str]) -> str:
        self.count += 1
        return f"{self.graph_key}/{self.node}/{self.count}/{','.join(names)}"

    def save(self) -> None:
        if not self.new:
            return
        try:
            with open(self.path) as f:  # another process may have added its own
                table = json.load(f)
        except (OSError, ValueError):
            table = {}
        table = {**(table if isinstance(table, dict) else {}), **self.new}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(table, f)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("could not write the CPU choice cache %s: %s", self.path, e)


@functools.lru_cache(maxsize=None)
def _code() -> str:
    """A hash of this backend's code (what a candidate's name stands for), once a process."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = hashlib.sha256()
    for name in sorted(os.listdir(here)):
        if name.endswith((".py", ".c")):
            with open(os.path.join(here, name), "rb") as f:
                code.update(f.read())
    return code.hexdigest()


def _machine() -> str:
    from deepseek import __version__
    from deepseek.backends.cpu import native, onednn

    onednn.available()  # registers why oneDNN is missing, if it is
    parts = [native._cpu_key(), str(torch.get_num_threads()), torch.__version__, __version__,
             ",".join(sorted(native.unavailable)), _code()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


@contextlib.contextmanager
def recording(graph_doc: dict, env) -> Iterator[None]:
    """Within: ``choose`` answers from (and adds to) the table of this graph and ``env``."""
    if os.environ.get("DEEPSEEK_CPU_CHOICE_CACHE", "1") == "0":
        yield
        return
    digest = hashlib.sha256(json.dumps([_canonical(graph_doc), sorted(map(str, env.items()))],
                                       sort_keys=True, default=str).encode()).hexdigest()
    path = os.path.join(cache_root(), "cpu_choices", _machine() + ".json")
    outer = getattr(_local, "table", None)
    _local.table = _Table(path, digest[:32])
    try:
        yield
        _local.table.save()
    finally:
        _local.table = outer


def _canonical(doc: dict) -> dict:
    """``doc`` with each value's name replaced by its place in the graph: the names that
    passes make depend on how the graph came to be (captured afresh, read from the
    capture cache or a saved engine), the questions a plan asks do not."""
    names = [e["name"] for e in doc["inputs"] + doc["constants"]]
    names += [o["name"] for n in doc["nodes"] for o in n["outputs"]]
    index = {name: f"%{i}" for i, name in enumerate(names)}

    def rename(x):
        if isinstance(x, dict):
            return {k: index.get(v, v) if k in ("name", "v") and isinstance(v, str)
                    else rename(v) for k, v in x.items()}
        if isinstance(x, list):
            return [rename(v) for v in x]
        return x

    out = rename({k: v for k, v in doc.items() if k != "outputs"})
    out["outputs"] = [index.get(v, v) for v in doc["outputs"]]
    return out


def at_node(index: int) -> None:
    """Decisions from here on are node ``index``'s (numbered from 1 in order)."""
    table = getattr(_local, "table", None)
    if table is not None:
        table.node, table.count = str(index), 0


def choose(names: list[str], measure) -> str:
    """The stored choice among ``names`` for the next decision, else ``measure()``'s
    (then stored)."""
    table = getattr(_local, "table", None)
    if table is None:
        return measure()
    key = table.key(names)
    stored = table.table.get(key)
    if stored in names:
        return stored
    best = measure()
    table.table[key] = table.new[key] = best
    return best
