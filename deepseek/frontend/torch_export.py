"""Capture an nn.Module into the IR through torch.export (non-strict) and core ATen."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Mapping

import torch
from torch.export import Dim, export
from torch.utils._pytree import tree_map
from torch.export.graph_signature import InputKind, OutputKind

from deepseek.errors import CaptureError
from deepseek.frontend import capture_cache
from deepseek.frontend.fx import SymbolNamer, convert_fx
from deepseek.ir.graph import Graph, Value
from deepseek.ir.verify import verify
from deepseek.runtime.structure import flatten_inputs, flatten_with_structure, spec_to_json

log = logging.getLogger(__name__)

DynamicDims = Mapping[int, Mapping[int, str]]


def _dynamic_shapes(example_inputs: tuple, dynamic_dims: DynamicDims | None):
    if not dynamic_dims:
        return None
    dims: dict[str, Any] = {}
    spec = []
    for i, x in enumerate(example_inputs):
        want = dynamic_dims.get(i)
        if want is None:  # same nesting as the input, nothing dynamic
            spec.append(tree_map(lambda _: None, x) if isinstance(x, (tuple, list, dict)) else None)
            continue
        if not isinstance(x, torch.Tensor):
            raise CaptureError(f"dynamic_dims names input {i}, which is a {type(x).__name__}, "
                               "not a tensor")
        bad = [d for d in want if not 0 <= d < x.dim()]
        if bad:
            raise CaptureError(f"dynamic_dims: input {i} has rank {x.dim()}, no dim {bad[0]}")
        # CUDA kernels bound grid dims at 65535: without that bound export refuses CUDA models
        bound = {"max": 65535} if any(isinstance(t, torch.Tensor) and t.is_cuda
                                      for t in example_inputs) else {}
        spec.append({d: dims.setdefault(name, Dim(name, **bound)) for d, name in want.items()})
    extra = set(dynamic_dims) - set(range(len(example_inputs)))
    if extra:
        raise CaptureError(f"dynamic_dims names inputs {sorted(extra)}, but the model gets "
                           f"{len(example_inputs)} inputs")
    return tuple(spec)


def _decomposition_table() -> dict:
    """Core ATen decompositions, minus the ops that have a better fused kernel whole."""
    table = torch.export.default_decompositions()
    for op in _KEEP_WHOLE:
        table.pop(op, None)
    return table


# Attention stays one op: backends run it as a fused (flash/memory-efficient) kernel.
_KEEP_WHOLE = (torch.ops.aten.scaled_dot_product_attention.default,)


def capture(model: torch.nn.Module, example_inputs: tuple | list | torch.Tensor,
            dynamic_dims: DynamicDims | None = None, strict: bool = False,
            example_kwargs: dict | None = None) -> Graph:
    """Capture ``model`` into a Deepseek Graph.

    ``dynamic_dims`` marks symbolic dims: ``{0: {0: "batch"}}`` makes dim 0 of
    input 0 a symbol named "batch" (give an example size of 2 or more: torch
    specializes sizes 0 and 1). An op outside the IR raises UnsupportedOpError
    when ``strict``; otherwise it runs through PyTorch and is listed in
    ``engine.report()['fallback_nodes']``.

    Example::

        graph = ds.capture(model, (torch.randn(8, 3, 224, 224),), dynamic_dims={0: {0: "batch"}})
        print(graph)
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    args, params = _positional(model, tuple(example_inputs), dict(example_kwargs or {}))
    extra = [strict, {str(i): {str(d): n for d, n in dims.items()}
                      for i, dims in (dynamic_dims or {}).items()},
             repr(flatten_with_structure(args)[1])]
    was_training = model.training
    model.eval()
    cache_key = graph = None
    try:
        model_key = capture_cache.model_key(model, flatten_inputs(args, {}), extra)
        graph = capture_cache.load_for_model(model_key, model) if model_key else None
        if graph is None:
            ep = export(model, args, {}, dynamic_shapes=_dynamic_shapes(args, dynamic_dims),
                        strict=False)
            cache_key = capture_cache.key(ep, extra) if capture_cache.enabled() else None
            graph = capture_cache.load(cache_key, ep.state_dict) if cache_key else None
            if graph is None:
                decomposed = ep.run_decompositions(_decomposition_table())
    except Exception as e:
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: "
                           f"{type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    if graph is None:  # a cached graph was verified like this when it was stored
        graph = _from_exported(decomposed, args, {}, dynamic_dims or {}, strict)
        verify(graph)
        if cache_key:
            capture_cache.store(cache_key, graph, ep)
    if model_key and cache_key:
        capture_cache.link(model_key, cache_key)
    graph.in_structure["params"] = params
    graph.in_structure["spec"] = flatten_with_structure(args)[1]
    return graph


def _positional(model, args: tuple, kwargs: dict) -> tuple[tuple, list[str]]:
    """The example call as positional arguments, and the names of those parameters.

    Engines accept keyword arguments by these names, like the model does.
    """
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        sig = None
    kinds = {p.kind for p in sig.parameters.values()} if sig else set()
    if sig is None or inspect.Parameter.VAR_POSITIONAL in kinds or \
            inspect.Parameter.VAR_KEYWORD in kinds or inspect.Parameter.KEYWORD_ONLY in kinds:
        if kwargs:
            raise CaptureError("keyword example inputs need a forward() with named positional "
                               "parameters; pass the inputs positionally")
        return args, []
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise CaptureError(f"example inputs do not fit {type(model).__name__}.forward: {e}") from None
    return tuple(bound.arguments.values()), list(bound.arguments)




def _from_exported(ep, example_inputs, kwargs, dynamic_dims, strict) -> Graph:
    sig = ep.graph_signature
    kinds = {s.arg.name: s for s in sig.input_specs}
    params = {**ep.state_dict, **ep.constants}
    namer = SymbolNamer()
    user_nodes = [n for n in ep.graph.nodes if n.op == "placeholder"
                  and kinds[n.name].kind == InputKind.USER_INPUT]
    leaves = flatten_inputs(example_inputs, kwargs)
    # The user's names for dynamic dims: positional input i is the i-th leaf
    # only when the inputs are flat tensors; name symbols from the top level.
    top_leaf = {}
    pos = 0
    for i, x in enumerate(example_inputs):
        top_leaf[pos] = i
        pos += len(flatten_inputs((x,), {}))
    tensor_leaves = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    for leaf_index, node in zip(tensor_leaves, (n for n in user_nodes
                                                if isinstance(n.meta.get("val"), torch.Tensor))):
        wanted = dynamic_dims.get(top_leaf.get(leaf_index, -1), {})
        for d, size in enumerate(node.meta["val"].shape):
            if isinstance(size, torch.SymInt) and size.node.expr.is_symbol:
                namer.name(str(size.node.expr), wanted.get(d))

    def placeholder(node, graph: Graph, namer: SymbolNamer):
        spec = kinds[node.name]
        if spec.kind == InputKind.USER_INPUT:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                graph.input_names.append(node.name)
                return graph.add_input(node.name, namer.spec(val))
            return val  # a Python constant the export specialized on
        if spec.target not in params:
            raise CaptureError(f"exported program lacks the tensor for {spec.target!r}")
        return graph.add_constant(spec.target.replace(".", "_"), params[spec.target])

    graph, fx_outputs = convert_fx(ep.graph, placeholder, namer, strict)
    out_kinds = [s.kind for s in sig.output_specs]
    user_outputs = [v for v, k in zip(fx_outputs, out_kinds) if k == OutputKind.USER_OUTPUT]
    _set_outputs(graph, user_outputs)
    graph.in_structure = {
        "n_leaves": len(leaves),
        "tensor_leaves": tensor_leaves,
        "constants": {str(i): x for i, x in enumerate(leaves)
                      if not isinstance(x, torch.Tensor) and isinstance(x, (int, float, bool, str))},
    }
    graph.out_structure = spec_to_json(ep.call_spec.out_spec)
    return graph


def _set_outputs(graph: Graph, user_outputs: list) -> None:
    """Graph outputs must be Values; a constant output becomes a constant Value."""
    for i, v in enumerate(user_outputs):
        if isinstance(v, Value):
            graph.outputs.append(v)
        elif isinstance(v, (int, float, bool)):
            graph.outputs.append(graph.add_constant(f"output_{i}", torch.tensor(v)))
        else:
            raise CaptureError(f"model output {i} is a {type(v).__name__}; outputs must be tensors "
                               "(or numbers)")
