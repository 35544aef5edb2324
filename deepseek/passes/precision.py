"""Hardware mapping: tensor-core precision for the compute-bound ops.

``map_to_tensorcore(graph, precision="bf16")`` runs every GEMM, convolution
and attention (ops with Prop.MATMUL) in bf16 or fp16: their float32 weights
become reduced-precision constants once, their float32 activations are cast
on the way in, and their results cast back to float32. Everything else
(element-wise ops, softmax, layer/group/batch norm, reductions) stays in
float32, as autocast does, so accumulations keep float32 accuracy. The casts
are element-wise ops: fusion merges them into the neighbouring kernels.
"""

from __future__ import annotations

import torch

from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.ops import Op, Prop
from deepseek.ir.types import TensorSpec

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cast(graph: Graph, v: Value, dtype: torch.dtype) -> Node:
    out = Value(graph.fresh_name(f"{v.name}_{str(dtype).removeprefix('torch.')}"),
                TensorSpec(v.spec.shape, dtype))
    return Node(Op.TO_COPY, [v], {"dtype": dtype}, [out])


def map_to_tensorcore(graph: Graph, precision: str = "bf16", target: str = "cuda") -> Graph:
    """Run the graph's matmul-class ops in ``precision`` ("bf16" | "fp16"); see the module doc.

    ``target`` names the hardware; the rewrite is the same on "cpu" (PyTorch
    runs bf16 GEMMs on any CPU, fast only with AVX512-BF16/AMX).
    """
    dtype = PRECISION_DTYPES[precision]
    low_consts: dict[str, Value] = {}
    nodes: list[Node] = []
    for node in graph.nodes:
        if node.fallback is not None or not node.opdef.has(Prop.MATMUL) or \
                not any(o.spec.dtype == torch.float32 for o in node.outputs):
            nodes.append(node)
            continue
        inputs = []
        for x in node.inputs:
            if isinstance(x, Value) and x.spec.dtype == torch.float32:
                if graph.is_constant(x):
                    if x.name not in low_consts:
                        low_consts[x.name] = graph.add_constant(f"{x.name}_{precision}",
                                                                graph.constants[x.name].to(dtype))
                    x = low_consts[x.name]
                else:
                    cast = _cast(graph, x, dtype)
                    nodes.append(cast)
                    x = cast.outputs[0]
            inputs.append(x)
        low = [Value(graph.fresh_name(f"{o.name}_{precision}"), TensorSpec(o.spec.shape, dtype)
                     if o.spec.dtype == torch.float32 else o.spec) for o in node.outputs]
        nodes.append(Node(node.op, inputs, dict(node.attrs), low, node.source))
        for old, new in zip(node.outputs, low):
            if new.spec.dtype == dtype and 0 not in old.spec.shape:
                back = _cast(graph, new, torch.float32)
                back.outputs = [old]  # the float32 value keeps its name and its readers
                nodes.append(back)
    graph.nodes = nodes
    graph.remove_unused_constants()
    return graph
