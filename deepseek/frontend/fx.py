"""Translate an ATen-level torch.fx graph into a Deepseek Graph.

Both frontends end here: torch.export (after decomposition to core ATen) and
TorchDynamo (through aot_autograd). Symbolic integers (``sym_size``, SymInt
arithmetic) do not become nodes: they turn into :class:`Sym` expressions in
attributes and shapes, evaluated once per concrete input shape.
"""

from __future__ import annotations

import logging
import operator
import re
from typing import Any, Callable

import torch
import torch.fx as fx

from deepseek.errors import UnsupportedOpError
from deepseek.ir.graph import Graph
from deepseek.ir.ops import lookup_overload
from deepseek.ir.types import ABSENT, Sym, TensorSpec

log = logging.getLogger(__name__)

# Nodes that only check things torch.export already proved for the example.
_SKIP_TARGETS = {
    "aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default",
    "aten._assert_tensor_metadata.default", "aten.sym_constrain_range.default",
    "aten._assert_async.msg",
}
_DROP_ATTR_TYPES = (torch.device, torch.layout)


class SymbolNamer:
    """Maps torch's internal symbols (s0, s77...) to the user's dim names."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def name(self, internal: str, wanted: str | None = None) -> str:
        if internal not in self.names:
            self.names[internal] = wanted or f"dim{len(self.names)}"
        return self.names[internal]

    def dim(self, d) -> int | Sym:
        if isinstance(d, int):
            return d
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            if expr.is_number:
                return int(expr)
            text = str(expr)
            # rename whole-word internal symbols; unknown ones get fresh names
            return Sym(re.sub(r"\b[a-z]+\d+\b", lambda m: self.name(m.group(0)), text))
        raise UnsupportedOpError(f"unsupported symbolic value {d!r} ({type(d).__name__})")

    def spec(self, t: torch.Tensor) -> TensorSpec:
        return TensorSpec(tuple(self.dim(d) for d in t.shape), t.dtype)


def source_of(node: fx.Node) -> str:
    """'file.py:12 in forward (layer1.0.conv1)' for error messages and profiles."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', trace)
    where = f"{frames[-1][0].rsplit('/', 1)[-1]}:{frames[-1][1]} in {frames[-1][2]}" if frames else ""
    stack = node.meta.get("nn_module_stack") or {}
    module = list(stack.values())[-1][0] if stack else ""
    module = module.removeprefix("L['self'].").removeprefix("L['self']")
    return f"{where} ({module})" if module else where


def _user_frame(node: fx.Node) -> str:
    """Where a node came from, with the line of code: 'model.py:12 in forward (fc): y = f(x)'."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    code = lines[-1] if lines else ""
    where = source_of(node)
    return f"{where}: {code}" if where else code or "unknown source"


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target._schema.name.split('::')[1]}.{target._overloadname}" \
            if target.namespace == "aten" else str(target)
    return getattr(target, "__name__", str(target))


def convert_fx(
    gm_graph: fx.Graph,
    placeholder: Callable[[fx.Node, Graph, SymbolNamer], Any],
    namer: SymbolNamer,
    strict: bool = False,
) -> tuple[Graph, list[Any]]:
    """Convert ``gm_graph``; ``placeholder(node, graph, namer)`` maps each input node.

    Returns the Graph (outputs not yet set) and the flat list of what the FX
    output node returns, mapped to Values / Python constants.
    """
    graph = Graph()
    env: dict[fx.Node, Any] = {}

    def arg(x):
        if isinstance(x, fx.Node):
            return env[x]
        if isinstance(x, (list, tuple)):
            return [arg(v) for v in x]
        return x

    def attr(x):
        x = arg(x)
        if isinstance(x, _DROP_ATTR_TYPES):
            return None
        return x

    unsupported: list[str] = []
    fx_outputs: list[Any] = []
    for node in gm_graph.nodes:
        if node.op == "placeholder":
            env[node] = placeholder(node, graph, namer)
        elif node.op == "output":
            fx_outputs = [arg(x) for x in node.args[0]]
        elif node.op == "get_attr":
            raise UnsupportedOpError(f"get_attr node {node.target!r} is not supported; "
                                     "capture through torch.export, which lifts attributes")
        elif node.op == "call_function":
            val = node.meta.get("val")
            name = _target_name(node.target)
            if name in _SKIP_TARGETS:
                continue
            if isinstance(val, (torch.SymFloat, torch.SymBool)):
                raise UnsupportedOpError(f"symbolic float/bool {name} at {_user_frame(node)} "
                                         "is not supported; make it static")
            if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
                env[node] = namer.dim(val)
                continue
            if node.target is operator.getitem:
                env[node] = env[node.args[0]][node.args[1]]
                continue
            env[node] = _convert_call(node, name, graph, namer, attr, strict, unsupported)
        else:
            raise UnsupportedOpError(f"fx node kind {node.op!r} ({node.target}) is not supported")
    if unsupported:
        raise UnsupportedOpError("unsupported operators (pass strict=False to run them through "
                                 "PyTorch's reference kernels):\n  " + "\n  ".join(unsupported))
    return graph, fx_outputs


def _convert_call(node, name, graph, namer, attr, strict, unsupported):
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        unsupported.append(f"{name} at {_user_frame(node)}")
        return None
    d = lookup_overload(target)
    fallback = None
    if d is None:
        if strict or target.namespace != "aten":
            unsupported.append(f"{name} at {_user_frame(node)}")
            return None
        from deepseek.ir.graph import fallback_opdef

        fallback = name
        d = fallback_opdef(name)
        log.warning("op %s has no Deepseek kernel; it runs through PyTorch (fallback)", name)
    schema_args = target._schema.arguments
    inputs, attrs = [], {}
    for i, a in enumerate(schema_args):
        if i < len(node.args):
            raw = node.args[i]
        elif a.name in node.kwargs:
            raw = node.kwargs[a.name]
        else:
            raw = a.default_value if a.has_default_value() else None
            if next(x.kind for x in d.args if x.name == a.name) != "optional":
                continue  # attribute defaults stay implicit
        kind = next(x.kind for x in d.args if x.name == a.name)
        value = attr(raw)
        if kind in ("list", "optional_list"):
            inputs.extend(value)
        elif kind != "attr":
            inputs.append(value)
        elif value is not None or not a.has_default_value():
            attrs[a.name] = value
    val = node.meta.get("val")
    vals = list(val) if isinstance(val, (list, tuple)) else [val]
    specs = [ABSENT if v is None else namer.spec(v) for v in vals]
    out = graph.add_node(d.op, inputs, attrs, specs, name=node.name, source=source_of(node),
                         fallback=fallback)
    if d.n_outputs == 1:
        return out.outputs[0]
    return list(out.outputs)

