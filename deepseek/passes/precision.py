"""Hardware mapping: run a float32 graph's tensor-core work in bf16 or fp16.

``map_to_tensorcore(graph, precision="bf16")`` rewrites the dtypes of a
float32 graph, with autocast's rules as the model:

- GEMMs, convolutions and attention (ops with Prop.MATMUL) run in low
  precision on low-precision weights (converted once) and store low-precision
  results; the element-wise ops reading only such results (bias, ReLU, GELU, a
  ResNet block's residual add) stay in low precision, so a chain of them moves
  half the bytes, and float32 graph inputs are cast once on entry;
- the residual stream of a transformer stays float32: embedding lookups and
  layer/group norms and softmax produce float32 (their statistics are float32
  inside every kernel anyway), and an element-wise op with a float32 input
  computes in float32, as PyTorch's type promotion does. On BERT-base this
  halves the error of a model converted to bf16 as a whole (rel. L2 against
  float32: 5.4e-3 against 1.2e-2);
- values a model makes float32 on purpose stay so: a cast of integers to
  float32 (positions, masks) starts a float32 island, and a matmul-class op
  whose activation inputs are all such values runs in float32 (rotary angles);
- scatter-like writes keep the dtype of the tensor they write into (a donated
  KV cache is never recast); 0-d float32 constants stay float32 scalars;
  fallback and quantize/dequantize nodes see their original dtypes.

The graph's outputs are cast back, so the interface keeps the model's dtypes.
"""

from __future__ import annotations

import torch

from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.ops import Op, Prop
from deepseek.ir.types import TensorSpec

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# ops whose result has the dtype of the tensor they write into (input 0)
_WRITES_INTO = frozenset({
    Op.INDEX_PUT, Op.INDEX_COPY, Op.INDEX_ADD, Op.SCATTER_SRC, Op.SCATTER_VALUE,
    Op.SCATTER_ADD, Op.SCATTER_REDUCE_TWO, Op.SLICE_SCATTER, Op.SELECT_SCATTER, Op.COPY,
    Op.MASKED_SCATTER,
})


# ops whose float32 results stay float32: the residual stream and the normalizations
_KEEP_FLOAT32 = frozenset({Op.EMBEDDING, Op.NATIVE_LAYER_NORM, Op.NATIVE_GROUP_NORM, Op.SOFTMAX,
                           Op.LOG_SOFTMAX})


def _cast(graph: Graph, v: Value, dtype: torch.dtype) -> Node:
    out = Value(graph.fresh_name(f"{v.name}_{str(dtype).removeprefix('torch.')}"),
                TensorSpec(v.spec.shape, dtype))
    return Node(Op.TO_COPY, [v], {"dtype": dtype}, [out])


def _is_float(x) -> bool:
    return isinstance(x, Value) and x.spec.dtype.is_floating_point


class _Lowering:
    def __init__(self, graph: Graph, low: torch.dtype):
        self.graph, self.low = graph, low
        self.nodes: list[Node] = []
        self.now: dict[int, Value] = {}  # id(original value) -> the value carrying it now
        self.casts: dict[tuple[int, torch.dtype], Value] = {}
        self.finite = torch.finfo(low).max if low == torch.float16 else None
        self.island: set[int] = set()  # ids of values the model made float32 on purpose

    def current(self, x):
        return self.now.get(id(x), x) if isinstance(x, Value) else x

    def as_dtype(self, x, dtype: torch.dtype):
        """``x`` (a current value) in ``dtype``: a converted constant or a cast node."""
        if not _is_float(x) or x.spec.dtype == dtype:
            return x
        key = (id(x), dtype)
        if key not in self.casts:
            g = self.graph
            if g.is_constant(x):
                t = g.constants[x.name]
                if self.finite is not None and dtype == torch.float16:
                    t = t.clamp(-self.finite, self.finite)  # finfo(float32).min masks stay finite
                self.casts[key] = g.add_constant(f"{x.name}_{str(dtype).removeprefix('torch.')}",
                                                 t.to(dtype))
            else:
                cast = _cast(g, x, dtype)
                self.nodes.append(cast)
                self.casts[key] = cast.outputs[0]
        return self.casts[key]

    def compute_dtype(self, node: Node, ins: list) -> torch.dtype | None:
        """The dtype ``node`` computes its float32 values in, or None to leave it as it is."""
        if node.fallback is not None or node.opdef.has(Prop.QUANT):
            return None
        acts = [x for x in ins if _is_float(x) and not self.graph.is_constant(x)]
        if node.op in _WRITES_INTO:
            return ins[0].spec.dtype if _is_float(ins[0]) else None
        if not any(_is_float(x) for x in ins):
            return None  # a creation, or float32 made from integers: its own dtype
        if node.opdef.has(Prop.MATMUL):
            return torch.float32 if acts and all(id(x) in self.island for x in acts) else self.low
        if node.op in _KEEP_FLOAT32:
            return torch.float32
        return torch.float32 if any(x.spec.dtype == torch.float32 for x in acts) else self.low

    def lower(self, node: Node) -> None:
        ins = [self.current(x) for x in node.inputs]
        dtype = self.compute_dtype(node, ins)
        if dtype is None:  # inputs as they were
            ins = [self.as_dtype(x, orig.spec.dtype) if _is_float(x) else x
                   for x, orig in zip(ins, node.inputs)]
            self.emit(node, ins, dict(node.attrs), None)
            if not any(_is_float(x) for x in ins):  # float32 made from integers
                self.island.update(id(o) for o in node.outputs if o.spec.dtype == torch.float32)
            return
        attrs = dict(node.attrs)
        if node.op is Op.TO_COPY and attrs.get("dtype") == torch.float32 and _is_float(ins[0]):
            if set(attrs) <= {"dtype"}:  # float32 -> float32 was a no-op: it stays one
                self.now[id(node.outputs[0])] = ins[0]
                return
            attrs["dtype"] = ins[0].spec.dtype
        # a 0-d float32 constant is a scalar: PyTorch computes with it in float32 and
        # keeps the other operand's dtype, so it stays as it is (GELU's 0.044715...);
        # binary element-wise ops promote mixed activations themselves (no cast pass)
        promotes = node.opdef.has(Prop.BINARY) or node.op is Op.WHERE_SELF
        ins = [x if not (_is_float(x) and orig.spec.dtype == torch.float32)
               or (self.graph.is_constant(x) and x.spec.rank == 0 and node.op not in _WRITES_INTO)
               or (promotes and not self.graph.is_constant(x))
               else self.as_dtype(x, dtype) for x, orig in zip(ins, node.inputs)]
        if dtype == torch.float16:
            attrs = {k: max(-self.finite, min(self.finite, a)) if isinstance(a, float) else a
                     for k, a in attrs.items()}
        follows = attrs.get("dtype") is None or node.op is Op.TO_COPY
        self.emit(node, ins, attrs, dtype if follows else None)
        acts = [x for x in ins if _is_float(x) and not self.graph.is_constant(x)]
        if acts and all(id(x) in self.island for x in acts):
            self.island.update(id(self.current(o)) for o in node.outputs)

    def emit(self, node: Node, ins: list, attrs: dict, dtype: torch.dtype | None) -> None:
        """``node`` with its new inputs; float32 outputs become ``dtype`` (when given)."""
        outs = []
        for o in node.outputs:
            if dtype is not None and o.spec.dtype == torch.float32 and dtype != torch.float32:
                new = Value(self.graph.fresh_name(o.name), TensorSpec(o.spec.shape, dtype))
                self.now[id(o)] = new
                outs.append(new)
            else:
                outs.append(o)
        if outs == node.outputs and all(a is b for a, b in zip(ins, node.inputs)) \
                and attrs == node.attrs:
            self.nodes.append(node)
        else:
            self.nodes.append(Node(node.op, ins, attrs, outs, node.source, node.fallback))

    def run(self) -> Graph:
        g = self.graph
        for v in g.inputs:
            if v.spec.dtype == torch.float32 and v.name not in g.donated:
                self.now[id(v)] = self.as_dtype(v, self.low)
        for node in g.nodes:
            self.lower(node)
        produced = {id(o) for n in g.nodes for o in n.outputs}
        back = set()
        for v in g.outputs:
            cur = self.current(v)
            if cur is not v and id(v) in produced and id(v) not in back:
                cast = _cast(g, cur, v.spec.dtype)  # cast back into the original value
                cast.outputs = [v]
                self.nodes.append(cast)
                back.add(id(v))
        g.nodes = self.nodes
        g.remove_unused_constants()
        return g


def map_to_tensorcore(graph: Graph, precision: str = "bf16", target: str = "cuda") -> Graph:
    """Run the graph's float32 data flow in ``precision`` ("bf16" | "fp16"); see the module doc.

    ``target`` names the hardware; the rewrite is the same on "cpu" (PyTorch
    runs bf16 kernels on any CPU, fast only with AVX512-BF16/AMX).
    """
    return _Lowering(graph, PRECISION_DTYPES[precision]).run()


# pad a GEMM's N only where it is big enough for the tensor cores' tiling to matter
_PAD_MIN_WEIGHT = 1 << 16


def _low_precision_gemm(graph: Graph, node: Node, batched: bool) -> tuple | None:
    """(b or None, x, W) of ``addmm(b, x, W)`` / ``mm(x, W)`` (and, with ``batched``,
    ``matmul(x, W)`` on an x of any rank) with x bf16/fp16, W a constant (K, N) of x's
    dtype and b None or a constant of N; else None."""
    ops = (Op.ADDMM, Op.MM, Op.MATMUL) if batched else (Op.ADDMM, Op.MM)
    if node.fallback is not None or node.op not in ops:
        return None
    b, x, w = node.inputs if node.op is Op.ADDMM else (None, *node.inputs)
    ok = (isinstance(x, Value) and x.spec.dtype in (torch.bfloat16, torch.float16)
          and x.spec.rank >= 2 and (x.spec.rank == 2 or node.op is Op.MATMUL)
          and graph.is_constant(w) and w.spec.rank == 2 and w.spec.dtype == x.spec.dtype
          and (b is None or (graph.is_constant(b) and b.spec.shape == (w.spec.shape[1],)))
          and node.attrs.get("beta", 1) == 1 and node.attrs.get("alpha", 1) == 1)
    return (b, x, w) if ok else None


def pad_gemm_dims(graph: Graph, multiple: int = 8) -> Graph:
    """Pad the output columns of low-precision GEMMs with a constant weight to a multiple
    of ``multiple`` (run after ``map_to_tensorcore``; CUDA only).

    ``addmm(b, x, W)`` / ``mm(x, W)`` / ``matmul(x, W)`` with a constant bf16/fp16
    (K, N) weight, N not a multiple of ``multiple`` and K*N at least 64k elements (GPT-2's
    50257-word LM head) becomes the same GEMM on W and b padded with zero columns to
    N' (a row stride of whole 16-byte vectors, what cuBLAS's tensor-core kernels
    load and store) and a slice of its first N columns (a view: no copy). The
    activation side (K) is left alone: padding it would copy x every call."""
    nodes = []
    for node in graph.nodes:
        gemm = _low_precision_gemm(graph, node, batched=True)
        if gemm is None or gemm[2].spec.shape[1] % multiple == 0 \
                or graph.constants[gemm[2].name].numel() < _PAD_MIN_WEIGHT:
            nodes.append(node)
            continue
        b, x, w = gemm
        n = w.spec.shape[1]
        extra = -n % multiple
        weight = torch.nn.functional.pad(graph.constants[w.name], (0, extra))
        inputs = [x, graph.add_constant(f"{w.name}_padded", weight)]
        if b is not None:
            bias = torch.nn.functional.pad(graph.constants[b.name], (0, extra))
            inputs.insert(0, graph.add_constant(f"{b.name}_padded", bias))
        out = node.outputs[0]
        wide = Value(graph.fresh_name(f"{out.name}_padded"),
                     TensorSpec(out.spec.shape[:-1] + (n + extra,), out.spec.dtype))
        nodes.append(Node(node.op, inputs, dict(node.attrs), [wide], node.source))
        nodes.append(Node(Op.SLICE_TENSOR, [wide], {"dim": out.spec.rank - 1, "start": 0,
                                                     "end": n, "step": 1}, [out], node.source))
    graph.nodes = nodes
    graph.remove_unused_constants()
    return graph


def map_to_fp8(graph: Graph) -> Graph:
    """GEMMs with a constant weight as ``deepseek::fp8_linear`` (run after the bf16 data
    flow of ``map_to_tensorcore``): ``addmm(b, x, W)`` / ``mm(x, W)`` with x 2-D bf16/fp16,
    W a constant (K, N) and K, N multiples of 16 (what fp8 tensor cores take) becomes one
    fp8 GEMM: W quantized here to float8_e4m3fn with a scale per output channel, x per
    row at run time. Convolutions and other GEMMs stay in bf16."""
    from deepseek.ir.fused import FP8_MAX

    nodes = []
    for node in graph.nodes:
        gemm = _low_precision_gemm(graph, node, batched=False)
        if gemm is None or gemm[2].spec.shape[0] % 16 or gemm[2].spec.shape[1] % 16:
            nodes.append(node)
            continue
        b, x, w = gemm
        weight = graph.constants[w.name].float().t()  # (N, K)
        scale = weight.abs().amax(1).clamp_min(1e-12) / FP8_MAX
        q = (weight / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        nodes.append(Node(Op.FP8_LINEAR, [x, graph.add_constant(f"{w.name}_fp8", q.contiguous()),
                                          graph.add_constant(f"{w.name}_fp8_scale", scale), b],
                          {}, node.outputs, node.source))
    graph.nodes = nodes
    graph.remove_unused_constants()
    return graph
