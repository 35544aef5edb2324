"""Control flow, resolved at import: If on a known condition; Loop and Scan unrolled.

The IR is a straight-line graph, so control flow must be decided when the
model is imported: ``If`` needs a condition known then (a constant or a
shape test), ``Loop`` a known trip count (and a termination condition that
is known after each iteration), ``Scan`` a static sequence length. Their
bodies are imported once per iteration. Up to ``MAX_ITERATIONS`` iterations.
"""

from __future__ import annotations

import torch

from deepseek.frontend.onnx_import import SymArray, onnx_op
from deepseek.ir.ops import Op

MAX_ITERATIONS = 4096


def _known_bool(n, v, what: str) -> bool:
    if isinstance(v, SymArray):
        return bool(v.values.reshape(-1)[0])
    if n.imp.graph.is_constant(v):
        t = n.imp.graph.constants[v.name]
        if t.numel() != 1:
            raise n.bad(f"{what} must have one element")
        return bool(t.reshape(-1)[0])
    raise n.fail(f"{what} is computed at run time; Deepseek needs it known when the model is "
                 "imported (the IR has no run-time control flow)")


@onnx_op("If")
def if_op(n):
    k = n.known(0)
    if k is None:
        n.imp.needs_value(n.node.input[0])
        raise n.fail("If with a condition computed at run time is not supported (the IR has no "
                     "run-time control flow)")
    cond = bool((k.values if isinstance(k, SymArray) else k).reshape(-1)[0])
    branch = n.attr("then_branch" if cond else "else_branch")
    return n.imp.import_subgraph(branch, [], n.opset, n.source)


@onnx_op("Loop")
def loop(n):
    imp = n.imp
    body = n.attr("body")
    trips = None
    if n.has(0):
        trips = n.scalar(0)
    use_cond = n.has(1)
    cond = bool(n.scalar(1)) if use_cond else True
    carried = [imp.env[n.node.input[i]] if isinstance(imp.env.get(n.node.input[i]), SymArray)
               else n.x(i) for i in range(2, n.n_inputs)]
    n_carried = len(carried)
    if trips is None and not use_cond:
        raise n.fail("a Loop without trip count and condition never ends")
    scans: list[list] = []
    i = 0
    while cond and (trips is None or i < trips):
        if i >= MAX_ITERATIONS:
            raise n.fail(f"more than {MAX_ITERATIONS} iterations are not unrolled")
        bindings = [n.const(torch.tensor(i, dtype=torch.int64)),
                    n.const(torch.tensor(cond, dtype=torch.bool))] + carried
        outs = imp.import_subgraph(body, bindings, n.opset, f"{n.source} iteration {i}")
        if use_cond:
            cond = _known_bool(n, outs[0], "the loop condition")
        carried = outs[1:1 + n_carried]
        scans.append(outs[1 + n_carried:])
        i += 1
    n_scan = len(body.output) - 1 - n_carried
    results = list(carried)
    for k in range(n_scan):
        if not scans:
            raise n.fail("a Loop that runs zero times has scan outputs of unknown shape")
        parts = [n.emit(Op.UNSQUEEZE, [imp.value_of(s[k])], {"dim": 0}) for s in scans]
        results.append(n.emit(Op.CAT, parts, {"dim": 0}) if len(parts) > 1 else parts[0])
    return results


@onnx_op("Scan")
def scan(n):
    imp = n.imp
    if n.opset < 9:
        raise n.fail("Scan before opset 9 (with a batch dim) is not supported")
    body = n.attr("body")
    m = n.attr("num_scan_inputs")
    n_state = n.n_inputs - m
    states = [n.x(i) for i in range(n_state)]
    xs = [n.x(i) for i in range(n_state, n.n_inputs)]
    in_axes = n.attr("scan_input_axes") or [0] * m
    in_dirs = n.attr("scan_input_directions") or [0] * m
    k_out = len(body.output) - n_state
    out_axes = n.attr("scan_output_axes") or [0] * k_out
    out_dirs = n.attr("scan_output_directions") or [0] * k_out
    lengths = {n.shape(x)[n.axis(a, n.rank(x))] for x, a in zip(xs, in_axes)}
    if len(lengths) != 1 or not isinstance(next(iter(lengths)), int):
        raise n.fail("Scan needs scan inputs of one static length")
    T = lengths.pop()
    if T > MAX_ITERATIONS:
        raise n.fail(f"more than {MAX_ITERATIONS} iterations are not unrolled")
    per_step: list[list] = []
    for t in range(T):
        slices = [n.emit(Op.SELECT_INT, [x], {"dim": n.axis(a, n.rank(x)),
                                              "index": T - 1 - t if d else t})
                  for x, a, d in zip(xs, in_axes, in_dirs)]
        outs = imp.import_subgraph(body, states + slices, n.opset, f"{n.source} step {t}")
        states = [imp.value_of(v) for v in outs[:n_state]]
        per_step.append([imp.value_of(v) for v in outs[n_state:]])
    results = list(states)
    for k in range(k_out):
        if not per_step:
            raise n.fail("a Scan over zero steps has outputs of unknown shape")
        seq = [s[k] for s in per_step]
        if out_dirs[k]:
            seq = seq[::-1]
        axis = n.axis(out_axes[k], n.rank(seq[0]) + 1)
        parts = [n.emit(Op.UNSQUEEZE, [v], {"dim": axis}) for v in seq]
        results.append(n.emit(Op.CAT, parts, {"dim": axis}) if len(parts) > 1 else parts[0])
    return results
