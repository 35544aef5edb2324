"""The reference interpreter: runs any Graph with the ops' PyTorch kernels.

It is the semantics every backend is tested against. It frees each value
after its last use and names the failing node in its errors.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from deepseek.errors import InputError, IRError
from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.ops import Op
from deepseek.ir.types import ABSENT, Sym, TensorSpec, bind


def bind_inputs(graph: Graph, tensors: Sequence[torch.Tensor]) -> dict[str, int]:
    """Check ``tensors`` against the graph's input specs; return the symbol bindings.

    Raises InputError naming the input (and its model-level name) on a wrong
    count, rank, dtype or size.
    """
    if len(tensors) != len(graph.inputs):
        raise InputError(f"expected {len(graph.inputs)} tensor inputs "
                         f"({', '.join(graph.input_names or [v.name for v in graph.inputs])}), "
                         f"got {len(tensors)}")
    env: dict[str, int] = {}
    for i, (v, t) in enumerate(zip(graph.inputs, tensors)):
        label = graph.input_names[i] if i < len(graph.input_names) else v.name
        if not isinstance(t, torch.Tensor):
            raise InputError(f"input {i} ({label!r}) must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != v.spec.dtype:
            raise InputError(f"input {i} ({label!r}) has dtype {t.dtype}, expected {v.spec.dtype}; "
                             f"convert it with .to({v.spec.dtype})")
        if t.dim() != v.spec.rank:
            raise InputError(f"input {i} ({label!r}) has shape {tuple(t.shape)}, expected rank "
                             f"{v.spec.rank} ({v.spec})")
        for d, (want, got) in enumerate(zip(v.spec.shape, t.shape)):
            if isinstance(want, Sym) and want.expr.isidentifier():
                if env.setdefault(want.expr, int(got)) != got:
                    raise InputError(f"input {i} ({label!r}) dim {d} is {got}, but symbol "
                                     f"{want.expr!r} is {env[want.expr]} in another input")
    for i, (v, t) in enumerate(zip(graph.inputs, tensors)):
        label = graph.input_names[i] if i < len(graph.input_names) else v.name
        try:
            want = v.spec.concrete(env)
        except IRError:
            raise InputError(f"input {i} ({label!r}): cannot bind shape {v.spec}") from None
        if tuple(t.shape) != want:
            raise InputError(f"input {i} ({label!r}) has shape {tuple(t.shape)}, expected {want} "
                             f"(spec {v.spec}); compile with dynamic_dims to accept other sizes")
    return env


def _as_list(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _batch_norm_specs(node: Node, env: Mapping[str, int]) -> list[TensorSpec]:
    """Batch norm's outputs: the input's shape and type, and two per-channel statistics in
    float32 for 16-bit inputs (what its meta kernel gives). Its meta kernel is a Python
    decomposition whose first call imports torch._dynamo (2-3 s of a warm start)."""
    x = node.inputs[0].spec
    if x.rank < 2:
        raise IRError(f"batch norm needs an input of rank 2 or more, got {x}")
    stat = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    channels = x.concrete(env)[1]
    for v in node.inputs[1:]:  # weight, bias, running mean and variance: one per channel
        if isinstance(v, Value) and v.spec.concrete(env) != (channels,):
            raise IRError(f"batch norm over {channels} channels got a per-channel input of "
                          f"shape {v.spec.concrete(env)}")
    return [TensorSpec(x.concrete(env), x.dtype), TensorSpec((channels,), stat),
            TensorSpec((channels,), stat)]


_SPEC_RULES = {Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING: _batch_norm_specs,
               Op.NATIVE_BATCH_NORM_LEGIT: _batch_norm_specs,
               Op.NATIVE_BATCH_NORM_LEGIT_NO_STATS: _batch_norm_specs,
               Op.NATIVE_BATCH_NORM: _batch_norm_specs}


def infer_specs(node: Node, env: Mapping[str, int]) -> list[TensorSpec]:
    """The node's output specs: by running its reference kernel on meta tensors, or for
    the few ops in ``_SPEC_RULES``, by their rule."""
    rule = _SPEC_RULES.get(node.op)
    if rule is not None:
        return rule(node, env)

    def meta(x):
        if isinstance(x, Value):
            return torch.empty(x.spec.concrete(env), dtype=x.spec.dtype, device="meta")
        return x

    attrs = {k: bind(a, env) for k, a in node.attrs.items()}
    out = node.opdef.reference([meta(x) for x in node.inputs], attrs, device="meta")
    return [ABSENT if t is None else TensorSpec.of(t) for t in _as_list(out)]


def run_node(node: Node, inputs: list, env: Mapping[str, int]) -> list[torch.Tensor]:
    attrs = {k: bind(a, env) for k, a in node.attrs.items()}
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)
    try:
        return _as_list(node.opdef.reference(inputs, attrs, device=device))
    except Exception as e:
        shapes = ", ".join(f"{tuple(x.shape)}:{x.dtype}" if isinstance(x, torch.Tensor) else repr(x)
                           for x in inputs)
        raise IRError(f"while running %{node.name} ({node.kind} on {shapes}) from "
                      f"{node.source or 'unknown source'}: {e}") from e


def run_graph(graph: Graph, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run ``graph`` on flat ``inputs`` with the reference kernels."""
    env = bind_inputs(graph, inputs)
    values: dict[Value, torch.Tensor] = dict(zip(graph.inputs, inputs))
    values.update({v: graph.constants[n] for n, v in graph.const_values.items()})
    last = graph.last_use()
    for i, node in enumerate(graph.nodes):
        args = [values[x] if isinstance(x, Value) else x for x in node.inputs]
        for o, t in zip(node.outputs, run_node(node, args, env)):
            values[o] = t
        for v in set(node.input_values()):  # a value read twice by one node is freed once
            if last.get(v) == i and v not in graph.inputs and v.name not in graph.const_values:
                del values[v]
    return [values[v] for v in graph.outputs]

