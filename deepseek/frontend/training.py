"""Capture a whole training step, forward and backward together, into one Graph.

aot_autograd traces the model, the loss and autograd's backward into a single
joint ATen graph (functionalized, decomposed to core ATen), which is then
converted like any other FX graph (:mod:`deepseek.frontend.fx`). Forward
activations read by the backward are plain values of that graph, so the
memory passes (``activate_recompute``) and the planner see the whole
lifetime of every activation.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from deepseek.errors import CaptureError
from deepseek.frontend.fx import SymbolNamer, convert_fx
from deepseek.ir.graph import Graph, Value
from deepseek.ir.ops import Op

log = logging.getLogger(__name__)


class _LossOf(torch.nn.Module):
    """``model`` and ``loss_fn`` as one module returning the loss (aot_autograd's form)."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, n_inputs: int):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.n_inputs = n_inputs

    def forward(self, *batch):
        out = self.model(*batch[:self.n_inputs])
        return (self.loss_fn(out, *batch[self.n_inputs:]),)


def _decompositions() -> dict:
    """Core ATen, plus training batch norm as element-wise math and reductions (so the
    recompute pass sees the cheap normalization steps it can redo in the backward)."""
    from torch._decomp import core_aten_decompositions, decomposition_table

    table = dict(core_aten_decompositions())
    op = torch.ops.aten._native_batch_norm_legit_functional.default
    table[op] = decomposition_table[op]
    return table


def _lift_attributes(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Turn get_attr nodes (constants aot_autograd keeps on the module) into placeholders."""
    lifted = {}
    first = next(iter(gm.graph.nodes))
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        tensor = getattr(gm, node.target)
        with gm.graph.inserting_before(first):
            new = gm.graph.placeholder(f"lifted_{node.target}")
        lifted[new.name] = tensor.detach()
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    return lifted


def capture_train_step(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
                       loss_fn: Callable, example_targets: Sequence[torch.Tensor] = (),
                       strict: bool = False, update_buffers: bool = False) -> Graph:
    """Capture ``loss_fn(model(*inputs), *targets)`` and its gradients as one Graph.

    The Graph's inputs are the trainable parameters (``requires_grad``, in
    ``model.named_parameters()`` order, named by their dotted names in
    ``graph.input_names``), then ``example_inputs``, then ``example_targets``.
    Its outputs are the loss, then one gradient per trainable parameter, in
    the same order. Buffers and frozen parameters are constants. A step in
    train mode updates buffers (batch norm's running mean, variance and
    batch count): with ``update_buffers``, each buffer the step updates is
    an input after the targets and its new value an output after the
    gradients (both in the order of ``graph.input_names[-k:]``), so that a
    training loop feeds each step's outputs to the next; without, those
    updates are dropped and the buffers are constants. The model's
    train/eval mode at capture time is what is traced; dropout must be off
    (p=0 or eval mode) for the step to be deterministic.
    An op outside the IR raises UnsupportedOpError when ``strict``; otherwise
    it runs through PyTorch.

    Example::

        graph = capture_train_step(model, (x,), torch.nn.functional.cross_entropy, (y,))
        loss, *grads = run_graph(graph, [*trainable_params, x, y])
    """
    from torch._functorch.aot_autograd import aot_export_module
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from deepseek.passes.simplify import eliminate_dead_code

    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture_train_step needs a torch.nn.Module, got {type(model).__name__}")
    batch = tuple(example_inputs) + tuple(example_targets)
    if not all(isinstance(t, torch.Tensor) for t in batch):
        raise CaptureError("example_inputs and example_targets must be tensors")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CaptureError(f"{type(model).__name__} has no parameter that requires grad: "
                           "there is no gradient to compute")
    step = _LossOf(model, loss_fn, len(example_inputs))
    try:
        # attention as matmul + softmax: its backward then is plain ops too (the fused
        # CPU kernel's decomposed forward does not match its fallback backward)
        with sdpa_kernel(SDPBackend.MATH):
            gm, sig = aot_export_module(step, batch, trace_joint=True, output_loss_index=0,
                                        decompositions=_decompositions())
    except Exception as e:
        raise CaptureError(f"aot_autograd could not capture the training step of "
                           f"{type(model).__name__}: {type(e).__name__}: {e}") from e
    named = {**dict(step.named_parameters(remove_duplicate=False)),
             **dict(step.named_buffers(remove_duplicate=False))}
    owner = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}  # placeholder -> name
    user = list(sig.user_inputs)
    trainable_ids = [id(p) for p in params]
    param_input: dict[int, Value] = {}  # id(parameter) -> input (tied weights share one)
    batch_inputs: list[Value] = []
    # buffers the step writes (output name -> buffer name), inputs when update_buffers
    mutated = dict(sig.buffers_to_mutate) if update_buffers else {}
    buffer_input: dict[str, Value] = {}
    lifted = _lift_attributes(gm)

    def placeholder(node, graph: Graph, namer: SymbolNamer):
        if node.name in lifted:  # a tensor the model made while tracing (torch.tensor(...))
            return graph.add_constant(node.name, lifted[node.name])
        if node.name in user:
            k = user.index(node.name)
            kind = "input" if k < len(example_inputs) else "target"
            batch_inputs.append(graph.add_input(kind, namer.spec(node.meta["val"])))
            return batch_inputs[-1]
        name = owner[node.name]
        tensor = named[name]
        short = name.removeprefix("model.").replace(".", "_")
        if name in mutated.values():  # a buffer the step updates: fed by the loop
            buffer_input[name] = graph.add_input(short, namer.spec(node.meta["val"]))
            return buffer_input[name]
        if id(tensor) not in trainable_ids:  # a buffer or a frozen parameter
            return graph.add_constant(short, tensor.detach())
        if id(tensor) not in param_input:
            param_input[id(tensor)] = graph.add_input(short, namer.spec(node.meta["val"]))
        return param_input[id(tensor)]

    graph, fx_outputs = convert_fx(gm.graph, placeholder, SymbolNamer(), strict)
    missing = [n for n, p in zip(names, params) if id(p) not in param_input]
    if missing:
        raise CaptureError(f"parameters {missing} did not reach the traced graph")
    updated = [b for b in dict.fromkeys(mutated.values()) if b in buffer_input]
    graph.inputs = [param_input[id(p)] for p in params] + batch_inputs + \
        [buffer_input[b] for b in updated]
    graph.input_names = names + [f"input{i}" for i in range(len(example_inputs))] + \
        [f"target{i}" for i in range(len(example_targets))] + \
        [b.removeprefix("model.") for b in updated]

    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    value_of = dict(zip((getattr(x, "name", None) for x in out_node.args[0]), fx_outputs))
    grads: dict[int, list[Value]] = {}
    for out_name, param_name in sig.backward_signature.gradients_to_parameters.items():
        g = value_of[out_name]
        if isinstance(g, Value) and id(named[param_name]) in trainable_ids:
            grads.setdefault(id(named[param_name]), []).append(g)
    outputs = [value_of[sig.user_outputs[0]]]
    for name, p in zip(names, params):
        parts = grads.get(id(p), [])
        if not parts:  # a parameter the loss does not depend on
            outputs.append(graph.add_constant(f"grad_{name}", torch.zeros_like(p.detach())))
            continue
        total = parts[0]
        for g in parts[1:]:  # one tensor under two names: its gradients add up
            total = graph.add_node(Op.ADD_TENSOR, [total, g], {}, [total.spec],
                                   name=f"grad_{name}").outputs[0]
        outputs.append(total)
    new_value = {b: value_of[out] for out, b in mutated.items()}
    outputs += [new_value[b] for b in updated]
    graph.outputs = outputs
    eliminate_dead_code(graph)  # without update_buffers: the buffers' updates
    log.info("captured a training step of %s: %d nodes, %d parameters", type(model).__name__,
             len(graph.nodes), len(params))
    return graph


__all__ = ["capture_train_step"]
