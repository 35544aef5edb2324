"""Fusion passes: rewrites that merge several ops into one."""

from __future__ import annotations

import torch

from deepseek.ir.graph import Graph, Node
from deepseek.ir.ops import Op


def fuse_conv_bn(graph: Graph) -> Graph:
    """Fold an inference batch norm into the convolution that feeds it.

    ``bn(conv(x, W, b))`` with constant W, b and BN statistics becomes
    ``conv(x, W * s, (b - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``
    per output channel (computed in float64). Only when the convolution's
    output has no other reader and the BN's mean/rstd outputs are unused.
    """
    producers = graph.producers()
    users = graph.users()
    outputs = {id(v) for v in graph.outputs}
    removed: set[int] = set()
    for bn in graph.nodes:
        if bn.op is not Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING:
            continue
        x, gamma, beta, mean, var = bn.inputs
        conv = producers.get(x)
        if (conv is None or conv.op is not Op.CONVOLUTION or conv.attrs.get("transposed")
                or len(users.get(x, [])) != 1 or id(x) in outputs
                or any(users.get(o) or id(o) in outputs for o in bn.outputs[1:])):
            continue
        w, b = conv.inputs[1], conv.inputs[2]
        if not all(graph.is_constant(v) for v in (w, gamma, beta, mean, var)):
            continue
        if b is not None and not graph.is_constant(b):
            continue
        _fold(graph, conv, bn, w, b, gamma, beta, mean, var)
        graph.replace_all_uses(bn.outputs[0], conv.outputs[0])
        removed.add(id(bn))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]
    graph.remove_unused_constants()
    return graph


def _fold(graph: Graph, conv: Node, bn: Node, w, b, gamma, beta, mean, var) -> None:
    c = graph.constants
    eps = float(bn.attrs["eps"])
    W = c[w.name]
    scale = c[gamma.name].double() / torch.sqrt(c[var.name].double() + eps)
    bias = c[b.name].double() if b is not None else torch.zeros_like(scale)
    new_w = (W.double() * scale.reshape(-1, *([1] * (W.dim() - 1)))).to(W.dtype)
    new_b = ((bias - c[mean.name].double()) * scale + c[beta.name].double()).to(W.dtype)
    conv.inputs[1] = graph.add_constant(f"{w.name}_bn", new_w.contiguous())
    conv.inputs[2] = graph.add_constant(f"{conv.name}_bias_bn", new_b.contiguous())
