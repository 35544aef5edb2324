"""``torch.compile(model, backend="deepseek")``: the dynamic/static hybrid.

TorchDynamo runs the Python; each graph it captures (between graph breaks)
comes here, is lowered to core ATen by aot_autograd and compiled by
Deepseek; graph breaks (data-dependent Python control flow, unsupported
Python) stay eager.

In inference (grad disabled, or no parameter requiring grad) parameters and
buffers are frozen into the graph as constants, so conv-BN folding and
constant folding apply; as with Inductor's freezing, later in-place changes
to the weights are not seen: call ``torch._dynamo.reset()`` after changing them.
"""

from __future__ import annotations

import logging

import torch

from deepseek.backends.hal import get_backend
from deepseek.frontend.fx import SymbolNamer, convert_fx
from deepseek.ir.graph import Graph, Value
from deepseek.ir.interpreter import bind_inputs
from deepseek.ir.types import bind

log = logging.getLogger(__name__)


def _compile_fx(gm: torch.fx.GraphModule, frozen: list[torch.Tensor | None], backend: str,
                opt_level: int, strict: bool):
    from deepseek.api import _build_engine

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensor_positions: list[int] = []

    def placeholder(node, graph: Graph, namer: SymbolNamer):
        i = placeholders.index(node)
        if i < len(frozen) and frozen[i] is not None:
            return graph.add_constant(f"param{i}", frozen[i])
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            tensor_positions.append(i)
            graph.input_names.append(node.name)
            return graph.add_input(node.name, namer.spec(val))
        return namer.dim(val)  # a SymInt input: also a tensor dim, bound from shapes

    graph, outputs = convert_fx(gm.graph, placeholder, SymbolNamer(), strict)
    # aot_autograd also returns sizes (SymInts, computed per call from the input shapes)
    # and Nones (gradients of inputs that need none)
    sizes = {i: v for i, v in enumerate(outputs) if not isinstance(v, Value)}
    graph.outputs = [v for v in outputs if isinstance(v, Value)]
    engine = _build_engine(graph, backend, opt_level, (), None)
    log.info("deepseek compiled a dynamo graph of %d nodes:\n%s", len(graph.nodes), engine.report())

    def run(*args):
        tensors = [args[i] for i in tensor_positions]
        results = engine.run_flat(tensors)
        if not sizes:
            return results
        env = bind_inputs(engine.graph, tensors)
        tensor_results = iter(results)
        return [bind(sizes[i], env) if i in sizes else next(tensor_results)
                for i in range(len(outputs))]

    run.engine = engine
    return run


def deepseek_backend(gm: torch.fx.GraphModule, example_inputs, backend: str = "auto",
                     opt_level: int = 2, strict: bool = False):
    """The TorchDynamo backend, registered as "deepseek" through the
    ``torch_dynamo_backends`` entry point (no import of deepseek needed)."""
    from torch._decomp import core_aten_decompositions
    from torch._functorch.aot_autograd import aot_module_simplified

    # aot_autograd passes parameters then buffers (by name) ahead of the user inputs
    named = {**dict(gm.named_parameters(remove_duplicate=False)),
             **dict(gm.named_buffers(remove_duplicate=False))}
    params = list(named.values())
    freeze = not torch.is_grad_enabled() or not any(p.requires_grad for p in params)
    get_backend(backend)  # fail early on an unknown backend

    def fw_compiler(fx_gm, _inputs):
        frozen = [p.detach() for p in params] if freeze else []
        return _compile_fx(fx_gm, frozen, backend, opt_level, strict)

    return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler,
                                 decompositions=core_aten_decompositions())

