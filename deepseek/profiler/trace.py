"""Capture: the start and end of every node of every engine call, on one clock.

``Profile`` attaches to an Engine for the duration of a ``with`` block. Each
partition is timed the finest way its backend allows:

* an executable with ``instrumented(hook)`` (the CPU backend's) is swapped
  for its instrumented twin, whose generated code calls ``hook(i)`` just
  before node i and ``hook(len(nodes))`` after the last: per-node stamps at
  the cost of one Python call per node, with the very kernels the engine runs;
* the reference partition (fallback nodes) is run node by node by a timed
  copy of the reference interpreter;
* any other backend is timed as one block per partition.

With ``kernels=True`` (the default when a partition lives on a GPU) a
``torch.profiler`` session also runs and each node is a named range in it,
so the kernels it launched (CUDA kernels via CUPTI, or ATen ops on the
CPU) are mapped back to the node (see :mod:`deepseek.profiler.kernels`).

The engine is restored on exit; nothing is left patched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.interpreter import bind_inputs, run_node

log = logging.getLogger(__name__)

NODES = "nodes"  # a partition timed node by node
BLOCK = "block"  # a partition timed as one


@dataclass
class Probe:
    """How one partition of the engine is timed during a profile."""

    index: int
    backend: str
    device: str
    nodes: list[Node]
    mode: str  # NODES or BLOCK
    stamps: list[int] = field(default_factory=list)  # perf_counter_ns, filled by the hook
    fused: set[int] = field(default_factory=set)  # node indices run inside a producer's kernel
    fused_hosts: dict[int, int] = field(default_factory=dict)  # of those, run by a later node
    algorithms: dict[int, str] = field(default_factory=dict)  # node index -> fast algorithm run
    executable: Any = None  # the instrumented twin (CPU), read for fused_nodes afterwards


@dataclass
class Call:
    """One engine call: wall-clock span, shape bindings and each partition's stamps."""

    index: int
    start_ns: int
    end_ns: int
    env: dict[str, int]
    warmup: bool
    stamps: list[list[int]]  # per partition (Probe.index order)


class _TimedInterpreter:
    """The reference backend's interpreter with a hook before each node (and at the end)."""

    name = "reference"

    def __init__(self, hook: Callable[[int], object]):
        self.hook = hook
        self._last: dict[int, dict] = {}

    def execute(self, graph: Graph, inputs: Sequence[torch.Tensor], outputs=None):
        hook = self.hook
        last = self._last.get(id(graph))
        if last is None:
            last = self._last[id(graph)] = graph.last_use()
        with torch.no_grad():
            env = bind_inputs(graph, inputs)
            values = dict(zip(graph.inputs, inputs))
            values.update({v: graph.constants[n] for n, v in graph.const_values.items()})
            keep = set(graph.inputs) | set(graph.const_values.values())
            for i, node in enumerate(graph.nodes):
                hook(i)
                args = [values[x] if isinstance(x, Value) else x for x in node.inputs]
                for o, t in zip(node.outputs, run_node(node, args, env)):
                    values[o] = t
                for v in node.input_values():
                    if last.get(v) == i and v not in keep:
                        del values[v]
            hook(len(graph.nodes))
        results = [values[v] for v in graph.outputs]
        if outputs is not None:
            for dst, src in zip(outputs, results):
                dst.copy_(src)
            return list(outputs)
        return results


class _TimedBlock:
    """Any other backend: one span per partition call (synchronized on a GPU)."""

    def __init__(self, backend, device: str, hook: Callable[[int], object]):
        self.backend, self.device, self.hook = backend, device, hook
        self.name = backend.name

    def execute(self, executable, inputs, outputs=None):
        self.hook(0)
        result = self.backend.execute(executable, inputs, outputs)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        self.hook(1)
        return result


def _stamp_hook(stamps: list[int]) -> Callable[[int], None]:
    append, clock = stamps.append, time.perf_counter_ns

    def hook(i: int) -> None:
        append(clock())

    return hook


class Profile:
    """Per-node timeline of an Engine while the ``with`` block runs.

    Example::

        with ds.profile(engine) as prof:
            for _ in range(20):
                engine(x)
        report = prof.report()       # ProfileReport: ops by time, hotspots, suggestions
        print(report)                # or report.print() for the rich table
        report.save("profile/")      # trace.json, report.json, report.html

    ``warmup``: the first calls of each input shape that are left out
    (plan generation, caches). ``kernels``: also capture kernels through
    torch.profiler (default: when a partition runs on a GPU). ``peaks``: the
    device's DevicePeaks (measured once per process when not given).
    ``hotspot_share``: the share of time (percent) that makes an op a hotspot.
    """

    def __init__(self, engine, *, warmup: int = 1, kernels: bool | None = None, peaks=None,
                 hotspot_share: float = 5.0, name: str | None = None):
        self.engine = engine
        self.warmup = warmup
        self.peaks = peaks
        self.hotspot_share = hotspot_share
        self.name = name or (f"engine ({engine.backend.name}, {len(engine.graph.nodes)} nodes, "
                             f"inputs {', '.join(str(v.spec) for v in engine.graph.inputs)})")
        self.device = engine.backend.capabilities().device
        gpu = any(p.device.startswith("cuda") for p in engine._parts)
        self.kernels = gpu if kernels is None else kernels
        self.calls: list[Call] = []
        self.probes: list[Probe] = []
        self.kernel_trace: dict | None = None  # torch.profiler's Chrome trace (kernels=True)
        self._saved: list[tuple] = []
        self._seen: dict[tuple, int] = {}
        self._envs: dict[tuple, dict] = {}
        self._call_index = [0]
        self._torch_profiler = None
        self._active = False
        self._t0 = 0
        self.unrecorded = 0

    # --- attaching ------------------------------------------------------------
    def __enter__(self) -> Profile:
        if self._active:
            raise RuntimeError("this profile is already active")
        if "run_flat" in vars(self.engine):
            raise RuntimeError("another profile is already attached to this engine")
        self._active = True
        self._attach()
        if self.kernels:
            from deepseek.profiler.kernels import start_torch_profiler

            self._torch_profiler = start_torch_profiler(self.device)
        self._t0 = time.perf_counter_ns()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._torch_profiler is not None:
                from deepseek.profiler.kernels import stop_torch_profiler

                self.kernel_trace = stop_torch_profiler(self._torch_profiler)
                self._torch_profiler = None
        finally:
            self._detach()
            self._active = False

    def _hook(self, probe: Probe) -> Callable[[int], None]:
        if not self.kernels:
            return _stamp_hook(probe.stamps)
        from deepseek.profiler.kernels import range_hook

        labels = [n.name for n in probe.nodes] if probe.mode == NODES else \
            [f"partition {probe.index} ({probe.backend})"]
        return range_hook(probe.stamps, labels, probe.index, self._call_index)

    def _attach(self) -> None:
        from deepseek.backends.reference import ReferenceBackend

        engine = self.engine
        for k, p in enumerate(engine._parts):
            self._saved.append((p, p.executable, p.backend))
            exe = p.executable
            if hasattr(exe, "instrumented") or isinstance(p.backend, ReferenceBackend):
                probe = Probe(k, p.backend.name, p.device, list(p.graph.nodes), NODES)
            else:
                probe = Probe(k, p.backend.name, p.device, list(p.graph.nodes), BLOCK)
            hook = self._hook(probe)
            if hasattr(exe, "instrumented"):
                p.executable = probe.executable = exe.instrumented(hook)
            elif isinstance(p.backend, ReferenceBackend):
                p.backend = _TimedInterpreter(hook)
            else:
                p.backend = _TimedBlock(p.backend, p.device, hook)
                log.info("partition %d (%s) has no per-node hook: timed as one block", k,
                         p.backend.name)
            self.probes.append(probe)
        original = engine.run_flat
        probes = self.probes

        def run_flat(tensors):
            start = time.perf_counter_ns()
            try:
                out = original(tensors)
                end = time.perf_counter_ns()
                self._record(tensors, start, end, [p.stamps for p in probes])
            finally:  # a call that raised leaves no half-filled stamps behind
                for p in probes:
                    p.stamps.clear()
                self._call_index[0] += 1
            return out

        engine.run_flat = run_flat  # an instance attribute shadows the method until detached

    def _detach(self) -> None:
        vars(self.engine).pop("run_flat", None)
        self.unrecorded = sum(1 for p in self.probes if p.stamps)
        if self.unrecorded:
            log.warning("the engine ran outside engine(...)/engine.run_flat looked up inside the "
                        "profile (a bound method taken before it?): those calls are not recorded")
        for probe in self.probes:
            exe = probe.executable
            for plan in getattr(exe, "plans", {}).values():
                probe.fused.update(getattr(plan, "fused_nodes", ()))
                probe.fused_hosts.update(getattr(plan, "fused_hosts", {}))
                probe.algorithms.update(getattr(plan, "algorithms", {}))
        for p, exe, backend in self._saved:
            p.executable, p.backend = exe, backend
        self._saved.clear()

    def _record(self, tensors, start: int, end: int, stamps: list[list[int]]) -> None:
        key = tuple(tuple(t.shape) for t in tensors)
        env = self._envs.get(key)
        if env is None:
            env = self._envs[key] = bind_inputs(self.engine.graph, tensors)
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        self.calls.append(Call(self._call_index[0], start, end, env, seen <= self.warmup,
                               [list(s) for s in stamps]))

    # --- results --------------------------------------------------------------
    @property
    def measured_calls(self) -> list[Call]:
        """The calls that count (warm-up calls of each input shape left out)."""
        return [c for c in self.calls if not c.warmup]

    def report(self):
        """The aggregated ProfileReport (ops by time, hotspots, suggestions, trace)."""
        if self._active:
            raise RuntimeError("call prof.report() after the `with ds.profile(engine)` block")
        from deepseek.profiler.report import build_report

        return build_report(self)


def profile(engine, **options) -> Profile:
    """Profile ``engine`` while the ``with`` block runs; see :class:`Profile`."""
    return Profile(engine, **options)
