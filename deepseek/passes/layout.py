"""Layout rewrites for the tensor cores: convolutions the GPU's kernels serve badly as they
are, recast as equivalent ones they serve well."""

from __future__ import annotations

import torch

from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.ops import Op
from deepseek.ir.types import TensorSpec

_STEM_MAX_CHANNELS = 4  # a network's stem: RGB(A) images


def space_to_depth_stem(graph: Graph) -> Graph:
    """A stride-2 convolution of a few input channels (an image network's 7x7 stem)
    becomes a stride-1 convolution of 4x the channels on the input's 2x2 blocks.

    ``conv(x, W, stride 2, padding p)`` over C <= 4 channels and an odd k x k kernel is
    ``conv(s2d(pad(x, p)), W', stride 1, padding 0)``: ``pad`` adds the padding (and a
    row/column where the padded size is odd), ``s2d`` moves each 2x2 block of pixels
    into channels (``pixel_unshuffle``: C -> 4C, H -> H/2), and ``W'`` is W padded to an
    even (k + 1) x (k + 1) kernel with zeros, rearranged the same way into a
    (k + 1)/2 square kernel. The products summed are the same ones (plus zero terms).
    ResNet-50's stem (3 channels, 7x7) becomes 12 channels, 4x4: implicit-GEMM kernels
    read 12 channels as whole vectors where 3 starve them (cuDNN's stem alone was 22%
    of ResNet-50's bf16 time at batch 256 on an H100). Float convolutions only: the
    int8 stem recast so (zero points as padding) ran no faster on an H100 (2.6 ms
    either way, 2026-12-08).
    """
    nodes: list[Node] = []
    for node in graph.nodes:
        nodes += _stem_rewrite(graph, node) or [node]
    graph.nodes = nodes
    graph.remove_unused_constants()
    return graph


def _stem_rewrite(graph: Graph, node: Node) -> list[Node] | None:
    if node.op is not Op.CONVOLUTION:
        return None
    x, w = node.inputs[0], node.inputs[1]
    a = node.attrs
    if a.get("transposed") or a.get("groups", 1) != 1 or not isinstance(x, Value) \
            or not graph.is_constant(w) or x.spec.rank != 4 \
            or list(a["stride"]) != [2, 2] or list(a["dilation"]) != [1, 1]:
        return None
    shape, weight = x.spec.shape, graph.constants[w.name]
    n, c, h, wd = shape
    o, _, kh, kw = weight.shape
    ph, pw = a["padding"]
    if not all(isinstance(d, int) for d in shape) or c > _STEM_MAX_CHANNELS or kh != kw \
            or kh % 2 == 0 or kh < 3:
        return None
    eh, ew = (h + 2 * ph) % 2, (wd + 2 * pw) % 2  # an extra row/column makes the size even
    hp, wp = (h + 2 * ph + eh) // 2, (wd + 2 * pw + ew) // 2
    k2 = (kh + 1) // 2
    out = node.outputs[0]
    if (hp - k2 + 1, wp - k2 + 1) != tuple(out.spec.shape[2:]):
        return None
    base, src = out.name, node.source

    def value(suffix: str, dims) -> Value:
        return Value(graph.fresh_name(f"{base}_{suffix}"), TensorSpec(tuple(dims), x.spec.dtype))

    padded = value("s2d_pad", (n, c, 2 * hp, 2 * wp))
    blocks = value("s2d_blocks", (n, c, hp, 2, wp, 2))
    moved = value("s2d_moved", (n, c, 2, 2, hp, wp))
    s2d = value("s2d", (n, 4 * c, hp, wp))
    steps = [
        Node(Op.CONSTANT_PAD_ND, [x], {"pad": [pw, pw + ew, ph, ph + eh], "value": 0},
             [padded], src),
        Node(Op.VIEW, [padded], {"size": list(blocks.spec.shape)}, [blocks], src),
        Node(Op.PERMUTE, [blocks], {"dims": [0, 1, 3, 5, 2, 4]}, [moved], src),
        Node(Op.RESHAPE, [moved], {"shape": list(s2d.spec.shape)}, [s2d], src)]
    w2 = torch.nn.functional.pad(weight, (0, 1, 0, 1))  # (O, C, 2 k2, 2 k2), zeros added
    w2 = w2.reshape(o, c, k2, 2, k2, 2).permute(0, 1, 3, 5, 2, 4).reshape(o, 4 * c, k2, k2)
    inputs = [s2d, graph.add_constant(f"{w.name}_s2d", w2.contiguous()), *node.inputs[2:]]
    attrs = dict(a, stride=[1, 1], padding=[0, 0])
    return steps + [Node(node.op, inputs, attrs, [out], src)]
