"""Graph, Node and Value: the Deepseek IR.

A Graph is an ordered list of Nodes in SSA form. Each Value is produced once
(by a Node, or as a graph input or a constant) and may be used many times.
Weights live in ``graph.constants`` (name -> tensor), each with a Value.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from deepseek.ir.ops import Op, OpDef, opdef, resolve_aten, Arg, Prop
from deepseek.ir.types import TensorSpec


@dataclass(eq=False)
class Value:
    """A tensor in the graph: a name and a TensorSpec. Compared by identity."""

    name: str
    spec: TensorSpec

    def __repr__(self) -> str:
        return f"%{self.name}"


Input = Value | None | int | float | bool  # scalars may stand in Tensor slots, as in ATen


@dataclass(eq=False)
class Node:
    """One op application: ``outputs = op(*inputs, **attrs)``.

    ``fallback`` names an ATen overload that has no Deepseek op; such a node
    runs through PyTorch as-is (``op`` is then None).
    """

    op: Op | None
    inputs: list[Input]
    attrs: dict[str, Any]
    outputs: list[Value]
    source: str = ""  # "file.py:123 (module.path)" the node came from
    fallback: str | None = None
    reuse: int | None = None  # index of an input whose buffer the output may take (in-place)

    @property
    def opdef(self) -> OpDef:
        if self.fallback is not None:
            return fallback_opdef(self.fallback)
        return opdef(self.op)

    @property
    def name(self) -> str:
        return self.outputs[0].name if self.outputs else "<no output>"

    @property
    def kind(self) -> str:
        if self.fallback is not None:
            return self.fallback
        return self.op.value.removesuffix(".default")

    def input_values(self) -> list[Value]:
        return [v for v in self.inputs if isinstance(v, Value)]

    def __repr__(self) -> str:
        return f"Node({self.kind} -> {', '.join(repr(o) for o in self.outputs)})"


_FALLBACK_DEFS: dict[str, OpDef] = {}


def fallback_opdef(target: str) -> OpDef:
    """An OpDef for an ATen overload outside the op set (reference kernel only)."""
    d = _FALLBACK_DEFS.get(target)
    if d is None:
        from deepseek.ir.ops import _arg_kind, _n_outputs

        overload = resolve_aten(target)
        schema = overload._schema
        args = tuple(
            Arg(a.name, _arg_kind(a), a.kwarg_only, a.default_value if a.has_default_value() else None,
                a.has_default_value())
            for a in schema.arguments
        )
        d = OpDef(None, overload, args, Prop.NONE, _n_outputs(schema))
        _FALLBACK_DEFS[target] = d
    return d


@dataclass
class Graph:
    """An SSA graph with inputs, outputs, constants and the user-facing structure.

    ``in_structure`` / ``out_structure`` describe how the flat inputs/outputs
    nest in the model's call signature (see :mod:`deepseek.runtime.structure`).
    ``donated`` names inputs the graph may overwrite (see ``schedule_inplace_ops``).
    """

    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    const_values: dict[str, Value] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)
    in_structure: Any = None
    out_structure: Any = None
    # names of inputs whose buffers the caller gives up: the graph may write results
    # into them in place (a decoder's KV cache, updated where it lies)
    donated: frozenset[str] = frozenset()
    _names: Iterator[int] = field(default_factory=itertools.count, repr=False)
    _taken: set[str] = field(default_factory=set, repr=False)

    # --- construction -----------------------------------------------------
    def fresh_name(self, hint: str = "v") -> str:
        hint = "".join(c if c.isalnum() or c == "_" else "_" for c in hint) or "v"
        name = hint
        while name in self._taken:
            name = f"{hint}_{next(self._names)}"
        self._taken.add(name)
        return name

    def add_input(self, name: str, spec: TensorSpec) -> Value:
        v = Value(self.fresh_name(name), spec)
        self.inputs.append(v)
        return v

    def add_constant(self, name: str, tensor: torch.Tensor) -> Value:
        v = Value(self.fresh_name(name), TensorSpec.of(tensor))
        self.constants[v.name] = tensor.detach().cpu()  # graphs hold weights on the host;
        # each backend moves its partition's weights to its device
        self.const_values[v.name] = v
        return v

    def add_node(self, op: Op | None, inputs: list[Input], attrs: dict, specs: list[TensorSpec],
                 name: str = "v", source: str = "", fallback: str | None = None) -> Node:
        outputs = [Value(self.fresh_name(name if i == 0 else f"{name}_{i}"), s) for i, s in enumerate(specs)]
        node = Node(op, list(inputs), dict(attrs), outputs, source, fallback)
        self.nodes.append(node)
        return node

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every reader of ``old`` (nodes and graph outputs) read ``new``."""
        for n in self.nodes:
            n.inputs = [new if x is old else x for x in n.inputs]
        self.outputs = [new if x is old else x for x in self.outputs]

    def remove_unused_constants(self) -> None:
        used = {id(v) for n in self.nodes for v in n.input_values()} | {id(v) for v in self.outputs}
        for name, v in list(self.const_values.items()):
            if id(v) not in used:
                del self.const_values[name], self.constants[name]

    def is_constant(self, v) -> bool:
        return isinstance(v, Value) and self.const_values.get(v.name) is v

    # --- queries ------------------------------------------------------------
    def producers(self) -> dict[Value, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def users(self) -> dict[Value, list[Node]]:
        users: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.input_values():
                users.setdefault(v, []).append(n)
        return users

    def last_use(self) -> dict[Value, int]:
        """Index of the last node reading each value (outputs live past the end)."""
        last: dict[Value, int] = {}
        for i, n in enumerate(self.nodes):
            for v in n.input_values():
                last[v] = i
        for v in self.outputs:
            last[v] = len(self.nodes)
        return last

    def fallback_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.fallback is not None]

    def __str__(self) -> str:
        from deepseek.ir.printer import format_graph

        return format_graph(self)
