"""Engine: a compiled model, called like the model, with report/save/load."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from deepseek.backends.hal import Backend
from deepseek.backends.partition import Partition, partition
from deepseek.errors import InputError
from deepseek.ir.graph import Graph
from deepseek.ir.interpreter import bind_inputs
from deepseek.runtime.structure import (bind_by_name, flatten_inputs, flatten_with_structure,
                                        unflatten)


def _describe(structure: dict) -> str:
    """A short text of a structure tree: (leaf, {'x': leaf, 'y': leaf})."""
    kind = structure.get("kind")
    if kind in ("leaf", "none"):
        return "tensor" if kind == "leaf" else "None"
    items = [_describe(c) for c in structure.get("items", [])]
    keys = structure.get("keys") or structure.get("fields")
    if keys:
        return "{" + ", ".join(f"{k!r}: {v}" for k, v in zip(keys, items)) + "}"
    return "(" + ", ".join(items) + ")"


@dataclass
class Report:
    """What compilation did: passes, partitions, fallbacks, memory and traffic."""

    passes: list[dict] = field(default_factory=list)
    partitions: list[dict] = field(default_factory=list)
    fallback_nodes: list[dict] = field(default_factory=list)
    bytes_moved: dict[str, int] = field(default_factory=dict)
    peak_memory_bytes: dict[str, int] = field(default_factory=dict)
    arena_bytes: int | None = None
    memory: dict[str, dict] = field(default_factory=dict)  # planner figures per graph version
    nodes: dict[str, int] = field(default_factory=dict)
    backend: str = ""
    opt_level: int = 2
    precision: str = "fp32"
    notes: list[str] = field(default_factory=list)  # where the compile differs from the request

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}  opt_level: {self.opt_level}  "
                 f"nodes: {self.nodes.get('unoptimized')} -> {self.nodes.get('optimized')}"]
        for p in self.passes:
            lines.append(f"  pass {p['name']:<26} {p['nodes_before']:>5} -> {p['nodes_after']:<5} "
                         f"{p['seconds'] * 1e3:8.2f} ms")
        for p in self.partitions:
            lines.append(f"  partition {p['backend']:<12} {p['nodes']:>5} nodes on {p['device']}")
        for k in ("bytes_moved", "peak_memory_bytes"):
            d = getattr(self, k)
            if d:
                change = 1 - d["optimized"] / d["unoptimized"] if d["unoptimized"] else 0.0
                lines.append(f"  {k}: {d['unoptimized'] / 1e6:.2f} MB -> {d['optimized'] / 1e6:.2f} MB"
                             f" ({change:.0%} less)")
        if self.arena_bytes is not None and self.memory:
            total = self.memory["optimized"]["total_bytes"]
            lines.append(f"  arena_bytes: {self.arena_bytes / 1e6:.2f} MB for {total / 1e6:.2f} MB of "
                         "intermediate tensors")
        if self.fallback_nodes:
            lines.append(f"  {len(self.fallback_nodes)} node(s) run through PyTorch (fallback):")
            lines += [f"    %{f['name']} {f['op']} at {f['source']}" for f in self.fallback_nodes]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class Engine:
    """A model compiled for a backend; ``engine(*inputs)`` returns what the model returns."""

    def __init__(self, graph: Graph, backend: Backend, report: Report, precision: str = "fp32"):
        self.graph = graph
        self.backend = backend
        self.precision = precision
        self._report = report
        report.precision = precision
        self._parts: list[Partition] = partition(graph, backend)
        for p in self._parts:
            p.executable = p.backend.compile(p.graph, precision)
            if report.opt_level >= 3 and getattr(p.executable, "tuner", None) is not None:
                p.executable.tuner.measure = True  # opt_level 3: measure kernel choices
        self._report.partitions = [p.to_dict() for p in self._parts]
        self._report.fallback_nodes = [{"name": n.name, "op": n.kind, "source": n.source}
                                       for n in graph.fallback_nodes()]
        ins = graph.in_structure or {}
        self._n_leaves = ins.get("n_leaves", len(graph.inputs))
        self._tensor_leaves = ins.get("tensor_leaves", list(range(len(graph.inputs))))
        self._leaf_constants = {int(k): v for k, v in ins.get("constants", {}).items()}
        self._flat_call = (self._tensor_leaves == list(range(len(graph.inputs)))
                           and self._n_leaves == len(graph.inputs))
        self._checked: set[tuple] = set()
        self._n_inputs = len(graph.inputs)
        self._direct = len(self._parts) == 1 and self._parts[0].graph.outputs == graph.outputs \
            and self._parts[0].graph.inputs == graph.inputs
        self._direct_device = torch.device(self._parts[0].device) \
            if self._direct and self._parts[0].device != "cpu" else None

    # --- calling ------------------------------------------------------------
    def __call__(self, *args, **kwargs) -> Any:
        # the per-call path costs about a microsecond: models of a few tiny kernels (the
        # MNIST CNN at batch 1, about 100 us) feel every attribute lookup here
        if self._flat_call and not kwargs and len(args) == self._n_inputs:
            tensors = args
        else:
            tensors = self._tensors_from(args, kwargs)
        # inputs of a (shape, dtype) signature already validated are not checked again;
        # anything else goes through bind_inputs, which raises InputError naming the input
        if len(tensors) == 1:
            t = tensors[0]
            key = (t.shape, t.dtype) if isinstance(t, torch.Tensor) else None
        else:
            key = tuple([(t.shape, t.dtype) if isinstance(t, torch.Tensor) else None
                         for t in tensors])
        if key not in self._checked:
            bind_inputs(self.graph, tensors)
            self._checked.add(key)
        flat = self.run_flat(tensors)
        structure = self.graph.out_structure
        if structure is None:
            return flat[0] if len(flat) == 1 else tuple(flat)
        if structure.get("kind") == "leaf":
            return flat[0]
        return unflatten(structure, flat)

    def _tensors_from(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        ins = self.graph.in_structure or {}
        params = ins.get("params")
        if params:
            try:
                args = bind_by_name(params, args, kwargs)
            except TypeError as e:
                raise InputError(f"the engine takes ({', '.join(params)}) like the model: {e}") from None
            kwargs = {}
        leaves, spec = flatten_with_structure(args) if not kwargs else (None, None)
        if "spec" in ins and spec is not None and spec != ins["spec"]:
            raise InputError(f"the engine takes the model's inputs ({', '.join(self.graph.input_names)})"
                             f" nested as at compile time: expected {_describe(ins['spec'])}, got "
                             f"{_describe(spec)}")
        if leaves is None:
            leaves = flatten_inputs(args, kwargs)
        if len(leaves) != self._n_leaves:
            names = ", ".join(self.graph.input_names)
            raise InputError(f"the engine takes the model's inputs ({names}): {self._n_leaves} "
                             f"leaves, got {len(leaves)}")
        for i, want in self._leaf_constants.items():
            if leaves[i] != want:
                raise InputError(f"input leaf {i} was {want!r} when the model was compiled and is "
                                 f"{leaves[i]!r} now; recompile for the new value")
        return [leaves[i] for i in self._tensor_leaves]

    def run_flat(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on the flat list of input tensors (validated by the caller)."""
        parts = self._parts
        if self._direct:
            p, device = parts[0], self._direct_device
            if device is not None:  # moved where not on the device yet (a no-op .to costs ~2 us)
                tensors = [t if t.device == device else t.to(device) for t in tensors]
            return p.backend.execute(p.executable, tensors)
        values = dict(zip(map(id, self.graph.inputs), tensors))
        for p in parts:
            ins = [values[id(v)].to(p.device) for v in p.graph.inputs]  # explicit transfer
            for v, t in zip(p.graph.outputs, p.backend.execute(p.executable, ins)):
                values[id(v)] = t
        consts = self.graph.constants
        return [values[id(v)] if id(v) in values else consts[v.name] for v in self.graph.outputs]

    # --- inspection and persistence ------------------------------------------
    def report(self) -> Report:
        return self._report

    def save(self, path: str) -> None:
        """Write the engine as a .dsk artifact (graph.json + weights.safetensors in a zip)."""
        from deepseek.runtime.artifact import save_artifact

        save_artifact(path, self.graph, self._report)

    def export_onnx(self, path: str, opset: int | None = None) -> None:
        """Write the engine's graph as an ONNX model (checked by onnx.checker)."""
        from deepseek.frontend.onnx_export import export_onnx

        export_onnx(self.graph, path, opset=opset)

    def __repr__(self) -> str:
        return (f"Engine(backend={self.backend.name!r}, nodes={len(self.graph.nodes)}, "
                f"inputs={[str(v.spec) for v in self.graph.inputs]})")
