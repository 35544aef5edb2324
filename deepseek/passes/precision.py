"""Hardware mapping: run a float32 graph in bf16/fp16 (tensor-core precision).

The model keeps its float32 interface: inputs are cast on entry and outputs
cast back on exit. Float32 weights become the target dtype; every float32
dtype attribute (casts, ``full``...) follows, except ``arange`` (positions
must stay exact). Where an op would still see two float dtypes (a float32
tensor derived from ``arange`` meeting a bf16 activation), the float32 side
is cast so the op runs in the target precision. PyTorch's reduced-precision
kernels for softmax, layer/group/batch norm and matmul accumulate in float32.
"""

from __future__ import annotations

import torch

from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.interpreter import infer_specs
from deepseek.ir.ops import Op
from deepseek.ir.types import TensorSpec

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_KEEP_DTYPE_ATTRS = {Op.ARANGE, Op.ARANGE_START, Op.ARANGE_START_STEP}


def _retype(x, dtype):
    if x is torch.float32:
        return dtype
    if isinstance(x, list):
        return [_retype(v, dtype) for v in x]
    return x


def _cast(graph: Graph, v: Value, dtype: torch.dtype, name: str) -> Node:
    return Node(Op.TO_COPY, [v], {"dtype": dtype}, [Value(graph.fresh_name(name),
                                                           TensorSpec(v.spec.shape, dtype))])


def map_to_tensorcore(graph: Graph, precision: str = "bf16", target: str = "cuda") -> Graph:
    """Rewrite ``graph`` to compute in ``precision`` ("bf16" | "fp16"); see the module doc.

    ``target`` names the hardware; on "cpu" the rewrite is the same (PyTorch
    runs bf16 on any CPU, fast only with AVX512-BF16/AMX).
    """
    dtype = PRECISION_DTYPES[precision]
    env: dict = {}
    new: dict[int, Value] = {}  # old value -> its retyped copy (Values are shared with callers)

    def look(x):
        return new.get(id(x), x) if isinstance(x, Value) else x

    nodes: list[Node] = []
    for v in graph.inputs:  # cast float32 inputs on entry
        if v.spec.dtype == torch.float32:
            cast = _cast(graph, v, dtype, f"{v.name}_{precision}")
            new[id(v)] = cast.outputs[0]
            nodes.append(cast)
    for name, v in list(graph.const_values.items()):
        if v.spec.dtype == torch.float32:
            graph.constants[name] = graph.constants[name].to(dtype)
            graph.const_values[name] = new[id(v)] = Value(v.name, TensorSpec(v.spec.shape, dtype))
    for old in graph.nodes:
        attrs = old.attrs if old.op in _KEEP_DTYPE_ATTRS else \
            {k: _retype(a, dtype) for k, a in old.attrs.items()}
        inputs = [look(x) for x in old.inputs]
        floats = [x for x in inputs if isinstance(x, Value) and x.spec.dtype.is_floating_point]
        if {x.spec.dtype for x in floats} == {torch.float32, dtype} and old.op is not Op.TO_COPY:
            for x in floats:
                if x.spec.dtype == torch.float32:
                    cast = _cast(graph, x, dtype, f"{x.name}_{precision}")
                    nodes.append(cast)
                    inputs = [cast.outputs[0] if y is x else y for y in inputs]
        node = Node(old.op, inputs, attrs, [], old.source, old.fallback)
        node.outputs = [Value(o.name, o.spec) for o in old.outputs]
        if all(v.spec.is_static for v in node.input_values() + node.outputs):
            specs = infer_specs(node, env)
        else:  # symbolic shapes: the dtype follows the float inputs' new dtype
            specs = [TensorSpec(o.spec.shape, dtype if o.spec.dtype == torch.float32 and floats
                                else o.spec.dtype) for o in old.outputs]
        for o, s in zip(node.outputs, specs):
            if 0 not in o.spec.shape:  # (unused zero-size stats outputs keep their spec)
                o.spec = TensorSpec(o.spec.shape, s.dtype)
        for o_old, o_new in zip(old.outputs, node.outputs):
            new[id(o_old)] = o_new
        nodes.append(node)
    outputs = []
    for v in graph.outputs:  # the model's float32 interface on exit
        nv = look(v)
        if v.spec.dtype == torch.float32 and nv.spec.dtype == dtype:
            cast = _cast(graph, nv, torch.float32, f"{v.name}_fp32")
            nodes.append(cast)
            nv = cast.outputs[0]
        outputs.append(nv)
    graph.nodes = nodes
    graph.outputs = outputs
    return graph
