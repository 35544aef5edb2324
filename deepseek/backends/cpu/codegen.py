"""Generate straight-line Python over PyTorch/oneDNN kernels for one concrete shape.

The generated function has one statement per node, with every shape and
attribute already evaluated: no graph walking, no dict lookups, no dispatch
through the op registry at run time. Element-wise ops write into a dying
input's buffer where that input's storage has no other live reader, and
each intermediate is released right after its last use.

Example of generated code (MNIST CNN after conv-BN folding)::

    def plan(inputs):
        x, = inputs
        convolution = k_convolution(x, c0, c1, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        relu = torch.relu_(convolution)
        ...
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import functools
import math
import re
import time

import torch

from deepseek.backends.cpu import (choices, direct, dnn_chains, onednn, rowwise, weightonly,
                                  winograd)
from deepseek.ir.fused import parse_program, run_steps
from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.ops import Op, Prop, op_from_name, opdef, pool2d_attrs
from deepseek.ir.serialize import decode_attr
from deepseek.ir.types import bind
from deepseek.passes.memory import can_write_into

# unary element-wise ops with an in-place PyTorch form: op -> callable name
_INPLACE_UNARY = {
    Op.RELU: "torch.relu_", Op.SIGMOID: "torch.sigmoid_", Op.TANH: "torch.tanh_",
    Op.EXP: "torch.exp_", Op.NEG: "torch.neg_", Op.SILU: "torch._C._nn.silu_",
}
# unary ops oneDNN fuses into a convolution as a post-op: op -> (attr, scalars, algorithm)
_CONV_POST_OPS = {
    Op.RELU: ("relu", [], ""), Op.SIGMOID: ("sigmoid", [], ""), Op.TANH: ("tanh", [], ""),
    Op.SILU: ("swish", [], ""), Op.HARDSWISH: ("hardswish", [], ""),
}
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def native_precisions() -> frozenset[str]:
    """The reduced precisions this CPU runs natively: bf16 where oneDNN has bf16
    kernels (AVX-512; AVX512-BF16/AMX for full speed), fp16 with AVX512-FP16/AMX-FP16.
    Elsewhere PyTorch converts element by element in scalar code, far slower than
    float32 (BERT-base at batch 1 on an AVX2 EPYC: 23 s a call in bf16, 0.2 s in fp32).
    int8 where oneDNN's integer kernels run (VNNI dot products; ``quantization.kernels``)."""
    from deepseek.quantization.kernels import native_int8

    mkldnn = torch.ops.mkldnn
    found = {name for name, check in (("bf16", "_is_mkldnn_bf16_supported"),
                                      ("fp16", "_is_mkldnn_fp16_supported"))
             if _ONEDNN and hasattr(mkldnn, check) and getattr(mkldnn, check)()}
    return frozenset(found | ({"int8"} if native_int8() else set()))


# oneDNN's kernels by dtype; bf16 elsewhere (forced by a test) runs through ATen
_ONEDNN_DTYPES = () if not _ONEDNN else (torch.float32,) + (
    (torch.bfloat16,) if "bf16" in native_precisions() else ())

# unary ops that never decrease (f(max(S)) == max(f(S))): they commute with max pooling,
# so they can run on the pooled, smaller tensor. op -> (in-place form, out= form)
_MONOTONE_UNARY = {
    Op.RELU: ("torch.relu_({})", "torch.clamp_min({}, 0, out={})"),
    Op.SIGMOID: ("torch.sigmoid_({})", "torch.sigmoid({}, out={})"),
    Op.TANH: ("torch.tanh_({})", "torch.tanh({}, out={})"),
    Op.EXP: ("torch.exp_({})", "torch.exp({}, out={})"),
}
_MONOTONE_FNS = {Op.RELU: (torch.relu_, lambda x, o: torch.clamp_min(x, 0, out=o)),
                 Op.SIGMOID: (torch.sigmoid_, lambda x, o: torch.sigmoid(x, out=o)),
                 Op.TANH: (torch.tanh_, lambda x, o: torch.tanh(x, out=o)),
                 Op.EXP: (torch.exp_, lambda x, o: torch.exp(x, out=o))}

# a fused element-wise program adding its two inputs, then ReLU (a ResNet block's end)
_ADD_RELU = [("add.Tensor", ["$0", "$1"], {}), ("relu.default", ["#0"], {})]

# plan buffers (out= kernels writing memory allocated once per plan) only for tensors
# this small: above it an allocation is noise next to the kernel that fills it
_BUFFER_MAX_BYTES = 1 << 20
# convolutions lowered to a gather and a GEMM: index tables up to this many entries
_GATHER_MAX_ENTRIES = 1 << 16
# Winograd convolutions: scratch (transformed input, GEMM result) up to this many bytes
_WINOGRAD_MAX_BYTES = 64 << 20

# hot ops called through PyTorch's Python bindings rather than the ATen overload object:
# the bindings parse arguments unboxed, 0.3-2 us a call cheaper (a call of conv1 in the
# MNIST CNN: 2 us of 12). Same schema, same positional order and keyword names.
_PY_BINDINGS = {Op.CONVOLUTION: "torch.convolution", Op.ADDMM: "torch.addmm", Op.MM: "torch.mm",
                Op.BMM: "torch.bmm", Op.BADDBMM: "torch.baddbmm"}

# binary element-wise ops with an in-place method; True where commutative
_INPLACE_BINARY = {
    Op.ADD_TENSOR: ("add_", True), Op.MUL_TENSOR: ("mul_", True),
    Op.SUB_TENSOR: ("sub_", False), Op.DIV_TENSOR: ("div_", False),
}

# scatter-like ops updating input 0 (node.reuse == 0): their in-place ATen overloads
_UPDATE_INPLACE = {Op.INDEX_PUT: torch.ops.aten.index_put_.default,
                   Op.INDEX_COPY: torch.ops.aten.index_copy_.default}

_POST_FNS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
             "swish": torch.nn.functional.silu, "hardswish": torch.nn.functional.hardswish,
             "none": lambda t: t}


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# a 1x1 convolution's attributes (a GEMM run as one: see const_gemm)
_CONV_1X1 = {"padding": [0, 0], "stride": [1, 1], "dilation": [1, 1], "groups": 1}


def _onednn_linear_weight(w_nk: torch.Tensor, rows: int) -> torch.Tensor:
    """The (N, K) weight as oneDNN's linear reads it for ``rows``-row inputs: in the blocked
    layout its kernel picks for that shape (so no reorder runs per call), where this
    PyTorch can ask for it; else a plain (N, K) oneDNN tensor."""
    w = w_nk.contiguous()
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    return reorder(w, rows) if reorder is not None else w.to_mkldnn()


def _fastest(candidates: Mapping[str, Callable[[], object]]) -> str:
    """The name of the fastest of ``candidates`` (kernels for one exact shape), measured.

    Ties go to the first candidate. Each candidate is warmed up first (a first call
    creates oneDNN primitives, wakes thread pools and faults in memory); then rounds
    call every candidate once, in a rotating order, and each is judged by its fastest
    call: on a shared machine noise only ever adds time (a stalled thread costs a whole
    scheduler slice), so the minimum is the estimate that other load disturbs least.
    A choice made for the same graph on this machine before is taken from the disk
    cache instead (``choices``).
    """
    return choices.choose(list(candidates), lambda: _measure(candidates))


def _measure(candidates: Mapping[str, Callable[[], object]]) -> str:
    names = list(candidates)
    for _ in range(2):
        for name in names:
            candidates[name]()
    first = _seconds(candidates[names[0]])
    # about 50 ms of timing per decision: many rounds for small kernels, whose
    # estimates are otherwise at the mercy of noise, few for larger ones, and two for
    # kernels of over 20 ms (GPT-2's 50257-column logits GEMM: 60-70 ms here, where
    # the candidates differ by 8%)
    rounds = max(5 if first <= 0.02 else 2, min(31, int(0.05 / len(names) / max(first, 1e-6))))
    best_time = dict.fromkeys(names, float("inf"))
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            best_time[name] = min(best_time[name], _seconds(candidates[name]))
    best = names[0]
    for name in names[1:]:
        if best_time[name] < best_time[best]:
            best = name
    return best


def _onednn_is_faster(fast: Callable[[], object], aten: Callable[[], object]) -> bool:
    """Whether the oneDNN candidate beats ATen's kernel, measured for this exact shape.

    Small or odd shapes (a convolution with one input channel, a GEMM with one
    row) run faster through ATen; big ones through oneDNN. Decided once per plan.
    """
    return _fastest({"onednn": fast, "aten": aten}) == "onednn"


_GELU_2C = 2 * math.sqrt(2 / math.pi)
_GELU_2C_TENSOR = torch.tensor(_GELU_2C)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU of float32 ``x`` as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
    (the same function: (1 + tanh(u)) / 2 = sigmoid(2u)): one pass of C (``rowwise.c``)
    on contiguous memory where it is built, else four ATen passes (2u = x (2c + 2c
    0.044715 x^2) is one addcmul and one multiply). ATen's vectorized tanh is 3.5x slower
    than its sigmoid on AVX2, and oneDNN's tanh-GELU post-op no faster: after a 128 x
    3072 GEMM on an EPYC (2 threads) the four passes cost 0.45-0.5 ms, ATen's GELU 0.8,
    the post-op 0.95; the C pass 0.27 ms where the four take 0.36. Max error 5e-7
    against float64, as ATen's."""
    if x.is_contiguous() and rowwise.library() is not None:
        return rowwise.gelu_tanh(x)
    t = torch.addcmul(_GELU_2C_TENSOR, x, x, value=_GELU_2C * 0.044715)
    t.mul_(x)
    return torch.sigmoid_(t).mul_(x)


_GELU_PROBE = torch.linspace(-8.0, 8.0, 4097)
_GELU_REFS = {"tanh": torch.nn.functional.gelu(_GELU_PROBE, approximate="tanh"),
              "none": torch.nn.functional.gelu(_GELU_PROBE)}


def _gelu_program(program: str, scalars: dict[int, float]) -> str | None:
    """Which GELU ("tanh" or "none", oneDNN's algorithm names) a fused element-wise
    program computes from its input 0 (its other inputs: the constant ``scalars``,
    by position), judged on 4097 points over [-8, 8]; or None."""
    from deepseek.ir.fused import run_program

    inputs = [_GELU_PROBE] + [torch.tensor(scalars[i]) for i in range(1, len(scalars) + 1)]
    try:
        y = run_program(inputs, program)
    except Exception:  # a program that does not take these inputs
        return None
    if not isinstance(y, torch.Tensor) or y.shape != _GELU_PROBE.shape or y.dtype != torch.float32:
        return None
    for algorithm, ref in _GELU_REFS.items():
        if torch.allclose(y, ref, rtol=1e-5, atol=1e-6):
            return algorithm
    return None


def _epilogue(node: Node, x: Value, graph: Graph) -> tuple[str, list, str] | None:
    """oneDNN's post-op (attr, scalars, algorithm) computing ``node`` from ``x``: ReLU,
    GELU (erf or tanh), or a fused element-wise chain that is one of them (reading x
    as its input 0 and otherwise only scalar constants, as ONNX files spell GELU)."""
    if node.fallback is not None or len(node.outputs) != 1:
        return None
    if node.op is Op.RELU:
        return "relu", [], ""
    if node.op is Op.GELU:
        return "gelu", [], node.attrs.get("approximate", "none")
    if node.op is not Op.FUSED_POINTWISE or not node.outputs[0].spec.dtype.is_floating_point \
            or not node.inputs or node.inputs[0] is not x:
        return None
    scalars = {}
    for i, v in enumerate(node.inputs[1:], 1):
        if not (graph.is_constant(v) and graph.constants[v.name].numel() == 1):
            return None
        scalars[i] = float(graph.constants[v.name])
    algorithm = _gelu_program(node.attrs["program"], scalars)
    return ("gelu", [], algorithm) if algorithm is not None else None


def _packed_conv_weight(weight: torch.Tensor, a: Mapping, shape) -> torch.Tensor | None:
    """A 2-D convolution's weight in oneDNN's blocked layout for input ``shape`` (attrs
    ``a`` bound), or None where oneDNN has no kernel for it."""
    if weight.dtype not in _ONEDNN_DTYPES:
        return None
    try:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), a["padding"], a["stride"], a["dilation"], a["groups"], list(shape))
    except RuntimeError:
        return None


def _kernel_hint(kind: str) -> str:
    """A Python identifier prefix for an op's kernel ("quantized_decomposed::x.y" too)."""
    return "k_" + re.sub(r"\W", "_", kind.split(".")[0]).lstrip("_") + "_"


def _source(x) -> str:
    """Source text of a call argument (a name, or a list of names from a Tensor[] slot)."""
    return "[" + ", ".join(map(_source, x)) + "]" if isinstance(x, list) else x


class _Emitter:
    def __init__(self, graph: Graph, env: Mapping[str, int], device: str,
                 constants: Mapping[str, torch.Tensor] | None = None):
        self.graph = graph
        self.env = env
        self.device = device
        self.constants = graph.constants if constants is None else constants
        self.names: dict[int, str] = {}
        self.globals: dict[str, Any] = {"torch": torch, "CL": torch.channels_last}
        self.lines: list[str] = []
        self.uses = {id(v): 0 for n in graph.nodes for v in n.input_values()}
        for n in graph.nodes:
            for v in n.input_values():
                self.uses[id(v)] += 1
        self.users: dict[int, list[Node]] = {}
        for n in graph.nodes:
            for v in n.input_values():
                self.users.setdefault(id(v), []).append(n)
        self._position: dict[int, int] | None = None
        self.fused_into: dict[int, str] = {}  # post-op node id -> name of the fused result
        self.algorithms: dict[int, str] = {}  # node id -> a fast algorithm's name (Winograd)
        self.cl: set[int] = set()  # ids of 4-D values that are channels-last at run time
        self.nhwc_rows: dict[int, tuple] = {}  # id of an NHWC-order flatten -> its (C, H, W)
        self.after_pool: dict[int, tuple] = {}  # max-pool node id -> (unary op applied to its
        # result, that op's node)
        self.hosted: dict[int, Node] = {}  # node id -> the later node whose statement runs it
        # nodes whose statement moves to a later node's (their inputs live until then)
        self.deferred: dict[int, Node] = {}
        self.conv_add_relu: dict[int, tuple[Node, Value]] = {}  # host id -> (conv, residual)
        self.packed: dict[int, torch.Tensor] = {}  # conv id -> its oneDNN-packed weight
        self.buffers: list[tuple] = []  # (shape, dtype, format, views, zero) of each plan buffer
        # oneDNN kernel statements (expression -> (kernel, argument names)), and the
        # statements of nodes that stretches of kernel calls may merge (dnn_chains.Step)
        self.dnn_exprs: dict[str, tuple] = {}
        self.steps: dict[int, dnn_chains.Step] = {}
        self.buffer_free: list[int] = []  # index of the last node reading each buffer so far
        self.index = {id(o): i for i, n in enumerate(graph.nodes) for o in n.outputs}
        self.index.update({id(n): i for i, n in enumerate(graph.nodes)})

    def name(self, x) -> str:
        if isinstance(x, Value):
            return self.names[id(x)]
        if isinstance(x, (list, tuple)):
            return "[" + ", ".join(self.name(v) for v in x) + "]"
        if isinstance(x, torch.dtype):
            return self.const(x, "dt")
        if isinstance(x, torch.memory_format):
            return self.const(x, "mf")
        if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
            return f"float({str(x)!r})"
        return repr(x)

    def dnn_call(self, kernel: onednn._Kernel, *values: Value) -> str:
        """The statement calling the oneDNN primitive ``kernel`` on ``values`` (channels-last
        where it reads them so), recorded so that a stretch of such statements can run as
        one call (``dnn_chains``)."""
        cl = kernel.source[1] == torch.channels_last
        expr = (f"{self.const(kernel, 'dnn')}("
                f"{', '.join(self.as_cl(v) if cl else self.name(v) for v in values)})")
        self.dnn_exprs[expr] = (kernel, tuple(self.name(v) for v in values))
        return expr

    def const(self, obj, hint: str) -> str:
        name = f"{hint}{len(self.globals)}"
        self.globals[name] = obj
        return name

    def emit(self, index: int, node: Node) -> None:
        outs = node.outputs
        attrs = {k: bind(a, self.env) for k, a in node.attrs.items()}
        ins = node.inputs
        lhs = ", ".join(self.names[id(o)] for o in outs) + ("," if len(outs) == 1 and
                                                            node.opdef.n_outputs == -1 else "")
        live = [o for o in outs if self.uses.get(id(o)) or o in self.graph.outputs]
        if id(node) in self.fused_into:  # already computed by its producer's fused kernel
            self.lines.append(f"    {lhs} = {self.fused_into[id(node)]}")
            self.steps[index] = dnn_chains.Step(lhs, (self.fused_into[id(node)],))
            return
        if id(node) in self.deferred:  # computed by a later node's statement
            return
        expr = self.special(index, node, ins, attrs, live)
        if expr is None:
            args, kwargs = node.opdef.call_args([self.name(x) for x in ins],
                                                {k: self.name(a) for k, a in attrs.items()})
            if node.opdef.has(Prop.CREATION):
                kwargs["device"] = repr(self.device)
            fn = _PY_BINDINGS.get(node.op) if self.device == "cpu" else None
            fn = fn or self.const(node.opdef.overload._op, _kernel_hint(node.kind))
            args = [_source(a) for a in args] + [f"{k}={_source(v)}" for k, v in kwargs.items()]
            expr = f"{fn}({', '.join(args)})"
        self.lines.append(f"    {lhs} = {expr}")
        if expr in self.dnn_exprs and len(outs) == 1:
            kernel, args = self.dnn_exprs[expr]
            self.steps[index] = dnn_chains.Step(lhs, args, kernel)

    def special(self, index, node, ins, attrs, live) -> str | None:
        """A faster call for common ops, or None for the generic ATen call."""
        op, out = node.op, node.outputs[0]
        n = self.name
        k = node.reuse  # set by schedule_inplace_ops: input k's buffer dies here
        if op in _MONOTONE_UNARY and self.device == "cpu":
            before_pool = self.unary_before_pool(node, ins)
            if before_pool is not None:
                return before_pool
        if k == 0 and op in _INPLACE_UNARY:
            if id(ins[0]) in self.cl:
                self.cl.add(id(out))
            return f"{_INPLACE_UNARY[op]}({n(ins[0])})"
        if k is not None and op in _INPLACE_BINARY and attrs.get("alpha", 1) == 1:
            method, commutative = _INPLACE_BINARY[op]
            if k == 0 or commutative:
                return f"{n(ins[k])}.{method}({n(ins[1 - k])})"
        if k == 0 and op in _UPDATE_INPLACE:  # e.g. a KV cache updated where it lies
            args, kwargs = node.opdef.call_args([n(x) for x in ins],
                                                {key: n(a) for key, a in attrs.items()})
            fn = self.const(_UPDATE_INPLACE[op], _kernel_hint(node.kind) + "inplace")
            args = [_source(a) for a in args] + [f"{key}={_source(v)}" for key, v in kwargs.items()]
            return f"{fn}({', '.join(args)})"
        if op is Op.ADD_LAYER_NORM:
            return self.add_layer_norm(node, ins, attrs)
        if op is Op.LINEAR_WEIGHT_ONLY and self.device == "cpu":
            stream = self.streaming_linear(node, ins, attrs)
            if stream is not None:
                return stream
        if op in (Op.QUANTIZE_PER_TENSOR, Op.QUANTIZE_PER_TENSOR_TENSOR):
            quantize = self.quantize(node, ins, attrs)
            if quantize is not None:
                return quantize
        if id(node) in self.conv_add_relu:
            self.cl.add(id(out))
            conv, z = self.conv_add_relu[id(node)]
            if conv.op is Op.CONV2D_INT8:
                return self.dnn_call(self.int8_residual[id(conv)], conv.inputs[0], z)
            return self.conv_residual(conv, z, node)
        if op is Op.FUSED_POINTWISE:
            return self.fused_chain(node, ins)
        made = {Op.CONV2D_INT8: lambda: self.int8_alone(node),  # oneDNN kernels made once
                Op.TO_COPY: lambda: self.convert_for_conv(node, ins, attrs)}.get(op)
        if made is not None and self.device == "cpu":
            expr = made()
            if expr is not None:
                return expr
        if op is Op.SCALED_DOT_PRODUCT_ATTENTION and self.device == "cpu":
            made_attention = self.attention(node, ins, attrs)
            if made_attention is not None:
                return made_attention
        if op in (Op.ADDMM, Op.MM, Op.MATMUL) and self.device == "cpu":
            fused = self.const_gemm(node, ins, attrs)
            if fused is not None:
                return fused
        if op is Op.CONVOLUTION and self.device == "cpu":
            fused = self.conv2d(node, ins, attrs)
            if fused is not None:
                return fused
        if op in (Op.VIEW, Op.UNSAFE_VIEW, Op.RESHAPE) and self.device == "cpu":
            flat = self.nhwc_flatten(node, ins, attrs)
            if flat is not None:
                return flat
        if op in (Op.VIEW, Op.UNSAFE_VIEW):  # reshape: inputs may be channels-last
            return f"{n(ins[0])}.reshape({n(attrs['size'])})"
        if op is Op.PERMUTE:
            return f"{n(ins[0])}.permute({n(attrs['dims'])})"
        only_first = live == [out]
        if op is Op.MAX_POOL2D and self.device == "cpu":
            a = attrs
            if ins[0].spec.rank == 4:
                self.cl.add(id(out))
            # pooling is 3x faster on channels-last activations (vectorized over channels)
            args = (*pool2d_attrs(a["kernel_size"], a.get("stride", []), a.get("padding", 0),
                                  a.get("dilation", 1)), bool(a.get("ceil_mode", False)))
            pool = (self.pool2d(ins[0], "max", args, lambda t: torch.max_pool2d(t, *args)) or
                    f"torch.max_pool2d({self.as_cl(ins[0])}, {a['kernel_size']}, "
                    f"{a.get('stride', [])}, {a.get('padding', 0)}, {a.get('dilation', 1)}, "
                    f"{a.get('ceil_mode', False)})")
            if id(node) in self.after_pool:  # a monotone op moved past the pooling
                return _MONOTONE_UNARY[self.after_pool[id(node)][0]][0].format(pool)
            return pool
        if op is Op.MEAN_DIM and self.device == "cpu":
            mean = self.spatial_mean(node, ins, attrs)
            if mean is not None:
                return mean
        if op is Op.AVG_POOL2D and self.device == "cpu" and not attrs.get("ceil_mode", False) \
                and attrs.get("divisor_override") is None:
            args = (*pool2d_attrs(attrs["kernel_size"], attrs.get("stride", []),
                                  attrs.get("padding", 0)), False)
            include = bool(attrs.get("count_include_pad", True))
            pool = self.pool2d(ins[0], "avg_include_pad" if include else "avg", args,
                               lambda t: torch.nn.functional.avg_pool2d(
                                   t, *args[:3], count_include_pad=include))
            if pool is not None:
                self.cl.add(id(out))
                return pool
        if op is Op.NATIVE_LAYER_NORM and only_first:
            return (f"torch.layer_norm({n(ins[0])}, {attrs['normalized_shape']}, {n(ins[1])}, "
                    f"{n(ins[2])}, {attrs['eps']!r}), None, None")
        if op is Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING and only_first:
            x, w, b, m, v = (n(i) for i in ins)
            return f"torch.batch_norm({x}, {w}, {b}, {m}, {v}, False, 0.0, {attrs['eps']!r}, False), None, None"
        if op is Op.GELU:
            return self.gelu(ins[0], attrs.get("approximate", "none"))
        if op is Op.SOFTMAX and not attrs["half_to_float"]:
            return f"torch.softmax({n(ins[0])}, {attrs['dim']})"
        return None

    def pool2d(self, x: Value, algorithm: str, args: tuple, aten: Callable) -> str | None:
        """A 4-D float32/bf16 pooling (``onednn.pool2d``'s ``algorithm`` and ``args``) as
        oneDNN's primitive, made once, where that measures faster than ``aten`` (its ATen
        statement's function on the same arguments; max pooling in bf16 on a Xeon: 3-4x),
        else None."""
        if x.spec.rank != 4 or x.spec.dtype not in (torch.float32, torch.bfloat16):
            return None
        shape = list(x.spec.concrete(self.env))
        made = onednn.pool2d(algorithm, *args, shape, x.spec.dtype)
        if made is None:
            return None
        xr = torch.randn(shape, dtype=x.spec.dtype).contiguous(memory_format=torch.channels_last)
        if _fastest({"aten": lambda: aten(xr), "onednn_made": made.step(xr)}) \
                != "onednn_made":
            return None
        return self.dnn_call(made, x)

    def attention(self, node: Node, ins, attrs) -> str | None:
        """Scaled dot-product attention as oneDNN primitives made once
        (``onednn.Attention``), reading q, k and v where the projections wrote them and,
        where the result's only readers merge its heads (``permute(0, 2, 1, 3)``),
        writing it heads-inner; where that measures faster than PyTorch's attention on
        the same shapes, else None. Float32/bf16, no dropout, as many key/value heads as
        query heads, an additive float mask or ``is_causal`` (not both)."""
        q, k, v = ins[:3]
        mask = ins[3] if len(ins) > 3 else None
        causal = bool(attrs.get("is_causal"))
        values = [t for t in (q, k, v, mask) if t is not None]
        if not all(isinstance(t, Value) for t in values) \
                or any(t.spec.rank != 4 for t in (q, k, v)) \
                or q.spec.dtype not in (torch.float32, torch.bfloat16) \
                or {k.spec.dtype, v.spec.dtype} != {q.spec.dtype} \
                or attrs.get("dropout_p") or attrs.get("enable_gqa") \
                or (mask is not None and (causal or mask.spec.rank > 4
                                          or mask.spec.dtype not in (q.spec.dtype, torch.float32))):
            return None
        qs, ks, vs = (list(t.spec.concrete(self.env)) for t in (q, k, v))
        if ks[:2] != qs[:2] or vs[:2] != qs[:2] or ks[3] != qs[3] or vs != ks:
            return None
        scale = attrs.get("scale") or qs[3] ** -0.5
        users = self.users.get(id(node.outputs[0]), [])
        heads_inner = node.outputs[0] not in self.graph.outputs and bool(users) and all(
            u.op is Op.PERMUTE and list(u.attrs["dims"]) == [0, 2, 1, 3] for u in users)
        made = onednn.attention(qs, ks[2], q.spec.dtype, scale, causal, heads_inner)
        if made is None:
            return None
        qr, kr, vr = (torch.randn(s).to(q.spec.dtype) for s in (qs, ks, vs))
        mr = None if mask is None else \
            torch.randn(mask.spec.concrete(self.env)).to(mask.spec.dtype)
        candidates = {
            "aten": lambda: torch.nn.functional.scaled_dot_product_attention(
                qr, kr, vr, attn_mask=mr, is_causal=causal, scale=scale),
            "onednn_made": lambda: made(qr, kr, vr, mr)}
        try:
            if _fastest(candidates) != "onednn_made":
                return None
        except RuntimeError:  # oneDNN made no primitive for these operands
            return None
        return (f"{self.const(made, 'attention')}({self.name(q)}, {self.name(k)}, "
                f"{self.name(v)}, {self.name(mask) if mask is not None else None})")

    def convert_for_conv(self, node: Node, ins, attrs) -> str | None:
        """A 4-D dtype conversion read only by convolutions (a network's float32 input
        ahead of its bf16 stem) as one oneDNN reorder into channels-last memory, where that
        measures faster than converting and then re-laying out (two passes), else None."""
        x, out = ins[0], node.outputs[0]
        if not isinstance(x, Value) or x.spec.rank != 4 or out in self.graph.outputs \
                or set(attrs) - {"dtype", "layout", "device", "memory_format"} \
                or attrs.get("memory_format") not in (None, torch.preserve_format) \
                or attrs.get("device") not in (None, torch.device("cpu")) \
                or not all(u.op is Op.CONVOLUTION for u in self.users.get(id(out), [None])):
            return None
        shape = list(x.spec.concrete(self.env))
        made = onednn.reorder(shape, x.spec.dtype, out.spec.dtype)
        if made is None:
            return None
        xr = torch.randn(shape).to(x.spec.dtype)
        if _fastest({"aten": lambda: xr.to(out.spec.dtype).contiguous(
                memory_format=torch.channels_last), "onednn_made": made.step(xr)}) \
                != "onednn_made":
            return None
        self.cl.add(id(out))
        return self.dnn_call(made, x)

    def spatial_mean(self, node: Node, ins, attrs) -> str | None:
        """The mean of a 4-D activation over its height and width (global average pooling,
        as ``adaptive_avg_pool2d(x, 1)`` decomposes) as one oneDNN average pooling over the
        whole image, where measured faster (bf16 ATen upcasts: 90 against 45 us on
        ResNet-50's 2048x7x7 on a Xeon)."""
        x = ins[0]
        if not isinstance(x, Value) or x.spec.rank != 4 or attrs.get("dtype") is not None:
            return None
        if sorted(d % 4 for d in attrs.get("dim") or ()) != [2, 3]:
            return None
        h, w = x.spec.concrete(self.env)[2:]
        keep = bool(attrs.get("keepdim", False))
        pool = self.pool2d(x, "avg", ([h, w], [h, w], [0, 0], [1, 1], False),
                           lambda t: t.mean([-1, -2], keep))
        if pool is None:
            return None
        if keep:
            self.cl.add(id(node.outputs[0]))
            return pool
        return f"{pool}.flatten(1)"

    def quantize(self, node: Node, ins, attrs) -> str | None:
        """Per-tensor quantization with constant parameters: the reference's arithmetic
        (``clamp(round(x * (1 / scale)) + zp)`` with the same float64 reciprocal) as one
        multiply and three in-place steps, without its temporaries and ``.item()`` calls
        (8x faster on a 3 MB activation); or bitwise the same in one pass of a C kernel
        (``rowwise.quantize``: 3.6x faster again on ResNet-50's 56x56x256) where it is
        built and measured faster."""
        x = ins[0]
        if x.spec.dtype != torch.float32:
            return None
        if node.op is Op.QUANTIZE_PER_TENSOR:
            scale, zero_point = attrs["scale"], attrs["zero_point"]
        else:
            s, z = ins[1], ins[2]
            if not (self.graph.is_constant(s) and self.graph.is_constant(z)):
                return None
            scale, zero_point = float(self.constants[s.name]), int(self.constants[z.name])
        inv, zp, dtype = 1.0 / float(scale), int(zero_point), attrs["dtype"]
        lo, hi = attrs["quant_min"], attrs["quant_max"]
        if self.device == "cpu" and dtype in (torch.uint8, torch.int8) and \
                rowwise.library() is not None:
            xr = torch.randn(x.spec.concrete(self.env)) * (hi - lo) / 4 / inv
            if _fastest({"native": lambda: rowwise.quantize(xr, inv, zp, lo, hi, dtype),
                         "aten": lambda: torch.mul(xr, inv).round_().add_(zp).clamp_(lo, hi)
                         .to(dtype)}) == "native":
                return (f"{self.const(rowwise.quantize, 'quantize')}({self.name(x)}, {inv!r}, "
                        f"{zp}, {lo}, {hi}, {self.name(dtype)})")
        return (f"torch.mul({self.name(x)}, {inv!r}).round_().add_({zp})"
                f".clamp_({lo}, {hi}).to({self.name(dtype)})")

    def position(self) -> dict[int, int]:
        """id(value) -> index of the node producing it (built once per plan)."""
        if self._position is None:
            self._position = {id(o): i for i, n in enumerate(self.graph.nodes) for o in n.outputs}
        return self._position

    def add_layer_norm(self, node: Node, ins, attrs) -> str:
        """Residual add + layer norm: one C kernel (``rowwise.c``) for float32 over the last
        dim where it is built and measured faster, else PyTorch's two kernels (GPU
        backends: one Triton kernel)."""
        x, r, w, b = (self.name(v) if v is not None else "None" for v in ins)
        shape = list(attrs["normalized_shape"])
        eps = attrs["eps"]
        if (self.device == "cpu" and len(shape) == 1 and ins[0].spec.dtype == torch.float32
                and all(v is None or v.spec.dtype == torch.float32 for v in ins)
                and rowwise.library() is not None):
            xr, rr = (torch.randn(ins[0].spec.concrete(self.env)) for _ in range(2))
            wr, br = (None if v is None else torch.randn(shape) for v in ins[2:])
            if _fastest({"native": lambda: rowwise.add_layer_norm(xr, rr, wr, br, eps),
                         "aten": lambda: torch.layer_norm(torch.add(xr, rr), shape, wr, br, eps)
                         }) == "native":
                return (f"{self.const(rowwise.add_layer_norm, 'add_ln')}({x}.contiguous(), "
                        f"{r}.contiguous(), {w}, {b}, {eps!r})")
        s = self.names[id(node.outputs[0])]
        return (f"({s} := torch.add({x}, {r})), "
                f"torch.layer_norm({s}, {shape}, {w}, {b}, {eps!r})")

    def streaming_linear(self, node: Node, ins, attrs) -> str | None:
        """A weight-only linear at decoding's few rows with constant weights: the C kernel
        that streams the int weight, prepared once (``weightonly.StreamingLinear``), called
        directly. None: the op's own call (the float weight made once, then a GEMM)."""
        x, *rest = ins
        if not all(v is None or self.graph.is_constant(v) for v in rest):
            return None
        w, s, z, b = (None if v is None else self.constants[v.name] for v in rest)
        bits, group = attrs["bits"], attrs["group_size"]
        rows = math.prod(x.spec.concrete(self.env)[:-1])
        if not weightonly.supports(rows, x.spec.dtype, w, s, z, bits, group):
            return None
        kernel = self.const(weightonly.StreamingLinear(w, s, z, b, bits, group), "wonly")
        return f"{kernel}({self.name(x)})"

    def fused_chain(self, node: Node, ins) -> str:
        """A fused element-wise kernel as a chain of PyTorch ops, each step after the
        first writing into a buffer that dies there (one allocation per kernel). A chain
        that is a GELU (a tanh GELU spelled out, as GPT-2 writes it) runs as ATen's one
        vectorized GELU instead: 8 passes over memory become one."""
        x = ins[0] if ins else None
        post = _epilogue(node, x, self.graph) if isinstance(x, Value) else None
        if post is not None and post[0] == "gelu" and x.spec.dtype == node.outputs[0].spec.dtype:
            return self.gelu(x, post[2])
        steps = parse_program(node.attrs["program"])
        meta = [torch.empty(v.spec.concrete(self.env), dtype=v.spec.dtype, device="meta")
                if isinstance(v, Value) else v for v in ins]
        dtypes = [r.dtype for r in run_steps(meta, node.attrs["program"])]
        base = self.names[id(node.outputs[0])]
        last = {}
        for j, (_, args, _) in enumerate(steps):
            for a in args:
                if isinstance(a, str) and a[:1] in "#$":
                    last[a] = j
        reusable = {f"${node.reuse}"} if node.reuse is not None else set()
        for j, (opname, args, attrs) in enumerate(steps):
            src = [self.name(ins[int(a[1:])]) if isinstance(a, str) and a[:1] == "$"
                   else f"{base}_{a[1:]}" if isinstance(a, str) and a[:1] == "#"
                   else self.name(a) for a in args]
            dying = [k for k, a in enumerate(args) if isinstance(a, str) and last.get(a) == j
                     and (a[:1] == "#" and dtypes[int(a[1:])] == dtypes[j] or a in reusable)]
            op = op_from_name(opname)
            expr = None
            if op in _INPLACE_UNARY and 0 in dying:
                expr = f"{_INPLACE_UNARY[op]}({src[0]})"
            elif op in _INPLACE_BINARY and attrs.get("alpha", 1) == 1 and len(src) == 2:
                method, commutative = _INPLACE_BINARY[op]
                k = 0 if 0 in dying else 1 if commutative and 1 in dying else None
                if k is not None:
                    expr = f"{src[k]}.{method}({src[1 - k]})"
            if expr is None:
                d = opdef(op)
                call_args, kwargs = d.call_args(src, {k: self.name(decode_attr(v))
                                                      for k, v in attrs.items()})
                fn = self.const(d.overload._op, _kernel_hint(opname))
                expr = f"{fn}({', '.join(list(call_args) + [f'{k}={v}' for k, v in kwargs.items()])})"
            target = base if j == len(steps) - 1 else f"{base}_{j}"
            if j < len(steps) - 1:
                self.lines.append(f"    {target} = {expr}")
        return expr

    def gelu(self, x: Value, approximate: str) -> str:
        """ATen's one GELU kernel, or ``gelu_tanh`` for a float32 tanh GELU on the CPU."""
        if approximate == "tanh" and x.spec.dtype == torch.float32 and self.device == "cpu":
            return f"{self.const(gelu_tanh, 'gelu_tanh')}({self.name(x)})"
        return f"torch._C._nn.gelu({self.name(x)}, approximate={approximate!r})"

    def as_cl(self, value: Value) -> str:
        """``value`` as a channels-last argument for a kernel that is faster on it (the
        conversion left out where the value is known to be channels-last already; the
        kernels are correct on any layout)."""
        name = self.name(value)
        return name if id(value) in self.cl else f"{name}.contiguous(memory_format=CL)"

    def storage_reach(self, value: Value) -> tuple[bool, int]:
        """Where ``value``'s storage may go: (whether it may reach a graph output, the
        index of the last node reading it). Followed through views, in-place ops, the
        aliases this emitter makes (post-ops, ops moved past a pool) and nodes run by a
        fallback; conservatively, every other op returns a fresh tensor."""
        outputs = {id(v) for v in self.graph.outputs}
        stack, seen, last = [value], set(), self.index[id(value)]
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            if id(v) in outputs:
                return True, len(self.graph.nodes)
            for n in self.users.get(id(v), []):
                last = max(last, self.index[id(n)])
                if (n.fallback is not None or n.opdef.has(Prop.VIEW) or n.reuse is not None
                        or id(n) in self.fused_into or n.op in _MONOTONE_UNARY
                        or n.op in _INPLACE_UNARY or n.op in _INPLACE_BINARY
                        or n.op is Op.FUSED_POINTWISE):
                    stack.extend(n.outputs)
        return False, last

    def escapes(self, value: Value) -> bool:
        return self.storage_reach(value)[0]

    def buffer(self, value: Value, shape, memory_format=torch.contiguous_format,
               views: tuple = (), writer: Node | None = None) -> str | None:
        """A buffer of the plan for an out= kernel computing ``value``: allocated once, not
        per call. None where ``value`` may reach the caller (outputs are always fresh
        tensors, never overwritten by a later call) or is too big for an allocation to
        matter next to the kernel writing it. Values of one shape whose storages live at
        different times share a buffer. Calls running the same plan at once each take
        their own set of buffers (see ``generate``). ``views`` (see ``_make_buffers``)
        are made once with the buffer, named ``<buffer>_v0``, ``_v1``... ``writer``: the node
        whose statement writes it, where that comes before ``value``'s own (a kernel that
        also computes the ops after it)."""
        spec = (tuple(shape), value.spec.dtype, memory_format, tuple(views), False)
        if self.device != "cpu" or _nbytes(shape, value.spec.dtype) > _BUFFER_MAX_BYTES:
            return None
        escapes, last = self.storage_reach(value)
        if escapes:
            return None
        return self.slot(spec, self.index[id(writer if writer is not None else value)], last)

    def scratch(self, node: Node, shape, dtype, views: tuple = (), zero: bool = False) -> str:
        """A buffer of the plan that ``node``'s statement alone uses (e.g. a zero-padded
        copy of an input); ``zero``: zero-filled once when made."""
        i = self.index[id(node)]
        return self.slot((tuple(shape), dtype, torch.contiguous_format, tuple(views), zero), i, i)

    def slot(self, spec: tuple, start: int, last: int) -> str:
        """A buffer of ``spec`` free from node ``start`` on (its last reader ran before),
        kept until node ``last``: an existing one, or a new one."""
        for i, (other, free_after) in enumerate(zip(self.buffers, self.buffer_free)):
            if other == spec and free_after < start:
                self.buffer_free[i] = last
                return f"_b{i}"
        self.buffers.append(spec)
        self.buffer_free.append(last)
        return f"_b{len(self.buffers) - 1}"

    def pooled_by(self, node: Node):
        """The max-pool node that is the only reader of this unary node's result, when the
        unary op may move past it (monotone, 4-D float, result not a graph output)."""
        out = node.outputs[0]
        users = self.users.get(id(out), [])
        if (node.op not in _MONOTONE_UNARY or len(users) != 1 or users[0].op is not Op.MAX_POOL2D
                or users[0].inputs[0] is not out or out in self.graph.outputs
                or out.spec.rank != 4 or not out.spec.dtype.is_floating_point):
            return None
        return users[0]

    def unary_before_pool(self, node: Node, ins) -> str | None:
        """A monotone unary op (ReLU...) read only by a max pool: pooling wants
        channels-last, so either the op runs after the pool on the 4x smaller result
        (free when its input is channels-last already), or it writes its result straight
        into a channels-last buffer (the layout copy and the op in one pass). Measured."""
        pool = self.pooled_by(node)
        x = ins[0]
        if pool is None or not isinstance(x, Value):
            return None
        if id(x) not in self.cl:
            shape = x.spec.concrete(self.env)
            pa = {k: bind(v, self.env) for k, v in pool.attrs.items()}
            args = (pa["kernel_size"], pa.get("stride", []), pa.get("padding", 0),
                    pa.get("dilation", 1), pa.get("ceil_mode", False))
            inplace, into = _MONOTONE_FNS[node.op]
            xr = torch.randn(shape, dtype=x.spec.dtype)
            cl = torch.channels_last
            if _fastest({
                "into_cl": lambda: torch.max_pool2d(
                    into(xr, torch.empty_like(xr, memory_format=cl)), *args),
                "pool_first": lambda: inplace(torch.max_pool2d(xr.contiguous(memory_format=cl),
                                                               *args)),
            }) == "into_cl":
                self.cl.add(id(node.outputs[0]))
                xs = self.name(x)
                buf = self.buffer(node.outputs[0], shape, torch.channels_last)
                return _MONOTONE_UNARY[node.op][1].format(
                    xs, buf or f"torch.empty_like({xs}, memory_format=CL)")
        self.after_pool[id(pool)] = (node.op, node)
        self.hosted[id(node)] = pool  # the profiler times it as part of the pool
        if id(x) in self.cl:
            self.cl.add(id(node.outputs[0]))
        return self.name(x)  # the op runs on the pool's result

    def wants_cl(self, value: Value) -> bool:
        """Whether ``value``'s reader converts it to channels-last anyway: a max pool, or a
        unary op (ReLU...) whose only reader is a max pool."""
        users = self.users.get(id(value), [])
        if len(users) != 1 or value in self.graph.outputs:
            return False
        user = users[0]
        if user.op is Op.MAX_POOL2D:
            return user.inputs[0] is value
        if user.op not in _CONV_POST_OPS and user.op not in _INPLACE_UNARY:
            return False
        nxt = self.users.get(id(user.outputs[0]), [])
        return (len(nxt) == 1 and nxt[0].op is Op.MAX_POOL2D and nxt[0].inputs[0] is user.outputs[0]
                and user.outputs[0] not in self.graph.outputs)

    def conv2d(self, node: Node, ins, attrs) -> str | None:
        """A 2-D float32 convolution with a constant weight through the fastest of
        (measured for this shape): oneDNN on a pre-packed weight, with channels-last
        activations and the following unary op (ReLU, SiLU...) fused as a post-op;
        ATen's convolution; and, for small ones, a gather of the input's patches (through
        an index table made once) and one GEMM, whose result is channels-last as it
        stands; for 3x3 ones with stride 1, Winograd F(4x4, 3x3) and F(2x2, 3x3)
        (``winograd.py``: 4x and 2.25x fewer multiplications, ReLU applied as it writes);
        for few input channels, a direct kernel (``direct.py``) that also does a
        following 2x2 max pool as it writes. Where a max pool reads the result, the
        candidates leaving NCHW are timed with the copy to channels-last the pool would
        make."""
        x, w, b = ins
        g = self.graph
        dtype = x.spec.dtype
        if (attrs["transposed"] or len(attrs["stride"]) != 2 or not g.is_constant(w)
                or (b is not None and not g.is_constant(b))
                or dtype not in (torch.float32, torch.bfloat16) or w.spec.dtype != dtype):
            return None
        shape = list(x.spec.concrete(self.env))
        a = attrs
        weight = g.constants[w.name]
        packed = _packed_conv_weight(weight, a, shape)
        gather = self.gather_conv(node, x, w, b, a, shape) if dtype == torch.float32 else None
        if packed is None and gather is None:
            return None
        post, scalars, algo = "none", [], ""
        out = node.outputs[0]
        users = self.users.get(id(out), [])
        fuse = packed is not None and len(users) == 1 and users[0].op in _CONV_POST_OPS \
            and out not in g.outputs
        if fuse:
            post, scalars, algo = _CONV_POST_OPS[users[0].op]
        bias = g.constants[b.name] if b is not None else None
        xr = torch.randn(shape, dtype=dtype)
        xcl = xr.contiguous(memory_format=torch.channels_last)
        to_cl = self.wants_cl(out)

        def aten():
            y = _POST_FNS[post](torch.convolution(
                xr, weight, bias, a["stride"], a["padding"], a["dilation"], False,
                a["output_padding"], a["groups"]))
            return y.contiguous(memory_format=torch.channels_last) if to_cl else y

        candidates: dict[str, Callable[[], object]] = {}
        if packed is not None:
            candidates["onednn"] = lambda: torch.ops.mkldnn._convolution_pointwise(
                xcl, packed, bias, a["padding"], a["stride"], a["dilation"], a["groups"], post,
                scalars, algo)
        # the same oneDNN convolution, its primitive made once (no per-call setup), timed as
        # it runs in a stretch of such kernels, which the plan calls at once (dnn_chains)
        made = onednn.conv2d(weight, bias, a["stride"], a["padding"], a["dilation"],
                             a["groups"], shape, dtype, post, choose=_fastest) \
            if packed is not None else None
        if made is not None:
            candidates["onednn_made"] = made.step(xcl)
        candidates["aten"] = aten
        # ATen's convolution on channels-last memory (its own oneDNN call, weights unpacked):
        # beat the packed kernel on MNIST's 32->64 3x3 at 14x14 on an AVX2 CPU (70 vs 95 us)
        # (not for one input channel: ATen then takes the input, and returns, NCHW memory)
        wcl = weight.contiguous(memory_format=torch.channels_last)
        x_cl = id(x) in self.cl
        if shape[1] > 1:
            candidates["aten_cl"] = lambda: _POST_FNS[post](torch.convolution(
                xcl if x_cl else xr.contiguous(memory_format=torch.channels_last), wcl, bias,
                a["stride"], a["padding"], a["dilation"], False, a["output_padding"], a["groups"]))
        if gather is not None:
            candidates["gather"] = lambda: _POST_FNS[post](gather[0](xr))
        # the native kernels do a following 2x2 max pool as they write: where there is one,
        # they are timed with it, and the other candidates with the pool after them (the
        # oneDNN pooling primitive the plan would run, else ATen's)
        pooled = bool(users) and post in ("none", "relu") and \
            self.pool_after(node, post, users) is not None
        if pooled:
            pool_step = self.pool_step(out, dtype)
            candidates = {name: (lambda f=f: (f(), pool_step())) for name, f in candidates.items()}
        direct = self.direct_conv(w, b, a, shape, post, pool=pooled)
        if direct is not None:
            candidates["direct"] = functools.partial(direct, xcl)
        winos = self.winograd_convs(w, b, a, shape, post, pool=pooled)
        for name, wino in winos.items():
            with torch.inference_mode(False):
                scratch = torch.empty(wino.v_shape), torch.empty(wino.m_shape)
            candidates[name] = functools.partial(wino, xcl, *scratch)
        best = _fastest(candidates)
        if best == "aten":
            return None  # ATen's generic call, as written in the graph
        if best == "aten_cl":
            self.cl.add(id(out))
            return (f"torch.convolution({self.as_cl(x)}, {self.const(wcl, 'wcl')}, "
                    f"{self.name(b) if b is not None else None}, {a['stride']}, {a['padding']}, "
                    f"{a['dilation']}, False, {a['output_padding']}, {a['groups']})")
        if best == "gather":
            self.cl.add(id(out))
            return gather[1]()
        if best == "direct":
            return self.emit_direct(node, x, w, b, a, shape, post, users)
        if best in winos:
            return self.emit_winograd(node, x, w, b, a, shape, post, users, winos[best])
        if best == "onednn_made":
            if fuse:
                self.fused_into[id(users[0])] = self.names[id(out)]
                self.cl.add(id(users[0].outputs[0]))
            self.cl.add(id(out))
            return self.dnn_call(made, x)
        pool = self.pooled_by(users[0]) if fuse else None
        if pool is not None:  # the post-op could run after a max pool instead: measured
            pa = {k: bind(v, self.env) for k, v in pool.attrs.items()}
            pargs = (pa["kernel_size"], pa.get("stride", []), pa.get("padding", 0),
                     pa.get("dilation", 1), pa.get("ceil_mode", False))
            inplace = _MONOTONE_FNS[users[0].op][0]

            def conv(p):
                return torch.ops.mkldnn._convolution_pointwise(
                    xcl, packed, bias, a["padding"], a["stride"], a["dilation"], a["groups"], p,
                    scalars if p != "none" else [], algo if p != "none" else "")

            if _fastest({"post_op": lambda: torch.max_pool2d(conv(post), *pargs),
                         "pool_first": lambda: inplace(torch.max_pool2d(conv("none"), *pargs))}) \
                    == "pool_first":
                fuse, post, scalars, algo = False, "none", [], ""
        if fuse:
            self.fused_into[id(users[0])] = self.names[id(out)]
            self.cl.add(id(users[0].outputs[0]))
        self.cl.add(id(out))
        return (f"torch.ops.mkldnn._convolution_pointwise({self.as_cl(x)}, "
                f"{self.const(packed, 'packed')}, {self.name(b) if b is not None else None}, "
                f"{a['padding']}, {a['stride']}, {a['dilation']}, {a['groups']}, "
                f"{post!r}, {scalars}, {algo!r})")

    def emit_winograd(self, node: Node, x: Value, w: Value, b, a, shape, post: str, users,
                      wino: winograd.WinogradConv) -> str:
        """The statement of the Winograd kernel ``wino`` (remade to take the 2x2 max pool
        after it where ``fuse_after`` finds one and it was made without); its scratch
        comes from the plan's buffers."""
        self.algorithms[id(node)] = f"winograd F({wino.tile}x{wino.tile},3x3)"
        pool = self.fuse_after(node, post, users)
        if pool is not None and not wino.pool:
            wino = winograd.WinogradConv(
                self.constants[w.name], self.constants[b.name] if b is not None else None,
                a["padding"], shape, relu=post == "relu", tile=wino.tile, pool=True)
        v, m = (self.scratch(node, s, torch.float32) for s in (wino.v_shape, wino.m_shape))
        res = self.result_buffer(node, pool)
        return f"{self.const(wino, 'wino')}({self.as_cl(x)}, {v}, {m}{res})"

    def direct_conv(self, w: Value, b, a, shape, post: str, pool: bool = False):
        """The direct kernel (``direct.py``) for a float32 convolution with few input channels
        (ReLU applied as it writes where ``post`` says so; with ``pool``, a 2x2 max pool
        too), or None where it does not apply or no C compiler can build it."""
        c = w.spec.concrete(self.env)[1]
        if (len(shape) != 4 or c > direct.MAX_IN_CHANNELS or a["groups"] != 1
                or list(a["dilation"]) != [1, 1] or post not in ("none", "relu")
                or w.spec.dtype != torch.float32 or direct.library() is None):
            return None
        return direct.DirectConv(self.constants[w.name],
                                 self.constants[b.name] if b is not None else None,
                                 a["stride"], a["padding"], shape, relu=post == "relu", pool=pool)

    def emit_direct(self, node: Node, x: Value, w: Value, b, a, shape, post: str, users) -> str:
        """The direct kernel's statement (with the ReLU and 2x2 max pool after it, as
        ``fuse_after`` finds them)."""
        pool = self.fuse_after(node, post, users)
        kernel = self.direct_conv(w, b, a, shape, post, pool=pool is not None)
        return f"{self.const(kernel, 'direct')}({self.as_cl(x)}{self.result_buffer(node, pool)})"

    def pool_after(self, node: Node, post: str, users) -> Node | None:
        """The 2x2 stride-2 max pool (floor) that alone reads ``node``'s result (after its
        ReLU where ``post`` is "relu"), which a native convolution kernel can do as it
        writes; None where there is none."""
        out = node.outputs[0]
        last = users[0].outputs[0] if post == "relu" else out
        pool = self.sole_reader(last)
        pa = {} if pool is None or pool.op is not Op.MAX_POOL2D or pool.inputs[0] is not last \
            else {k: bind(v, self.env) for k, v in pool.attrs.items()}
        two = [2, 2]
        if not (list(pa.get("kernel_size", ())) == two and list(pa.get("stride") or two) == two
                and pa.get("padding", 0) in (0, [0, 0]) and pa.get("dilation", 1) in (1, [1, 1])
                and not pa.get("ceil_mode", False)):
            return None
        return pool

    def fuse_after(self, node: Node, post: str, users) -> Node | None:
        """Mark what a native convolution kernel computes besides ``node``: its ReLU (``post``)
        and the max pool ``pool_after`` finds, which it returns (None where there is none):
        both become aliases of the kernel's result."""
        out = node.outputs[0]
        pool = self.pool_after(node, post, users)
        for fused in ([users[0]] if post == "relu" else []) + ([pool] if pool is not None else []):
            self.fused_into[id(fused)] = self.names[id(fused.inputs[0])]  # its input: an alias
            self.cl.add(id(fused.outputs[0]))
        self.cl.add(id(out))
        return pool

    def result_buffer(self, node: Node, pool: Node | None) -> str:
        """``, <buffer>`` for a native kernel's out= argument (its result, pooled by ``pool``
        where given, is written at ``node``), or "" where it gets a fresh tensor."""
        result = node.outputs[0] if pool is None else pool.outputs[0]
        res = self.buffer(result, result.spec.concrete(self.env), torch.channels_last, writer=node)
        return f", {res}" if res else ""

    def sole_reader(self, value: Value) -> Node | None:
        """The one node reading ``value``, where it is not also a graph output."""
        users = self.users.get(id(value), [])
        return users[0] if len(users) == 1 and value not in self.graph.outputs else None

    def pool_step(self, value: Value, dtype: torch.dtype) -> Callable[[], object]:
        """A 2x2 stride-2 max pool of a channels-last ``value`` (random data) as the plan
        would run it: oneDNN's pooling primitive made once, else ATen's."""
        shape = tuple(value.spec.concrete(self.env))
        y = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
        made = onednn.pool2d("max", (2, 2), (2, 2), (0, 0), (1, 1), False, shape, dtype)
        return made.step(y) if made is not None else (lambda: torch.max_pool2d(y, 2, 2))

    def winograd_convs(self, w: Value, b, a, shape, post: str,
                       pool: bool = False) -> dict[str, winograd.WinogradConv]:
        """Winograd kernels for a float32 3x3 convolution with stride 1 (ReLU applied as
        the result is written where ``post`` says so), by candidate name: F(4x4, 3x3) and
        F(2x2, 3x3) (``winograd.py``); none where they do not apply: other shapes or
        post-ops, few channels (a first layer), scratch over ``_WINOGRAD_MAX_BYTES``, or
        no C compiler to build the transforms."""
        o, c, kh, kw = w.spec.concrete(self.env)
        if ((kh, kw) != (3, 3) or list(a["stride"]) != [1, 1] or list(a["dilation"]) != [1, 1]
                or a["groups"] != 1 or len(shape) != 4 or c < 8 or post not in ("none", "relu")
                or w.spec.dtype != torch.float32 or winograd.library() is None):
            return {}
        bias = self.constants[b.name] if b is not None else None
        kernels = {f"winograd{m}": winograd.WinogradConv(
            self.constants[w.name], bias, a["padding"], shape, relu=post == "relu", tile=m,
            pool=pool) for m in winograd.TILES}
        return {k: v for k, v in kernels.items() if v.scratch_bytes() <= _WINOGRAD_MAX_BYTES}

    def gather_conv(self, node: Node, x: Value, w: Value, b, a, shape) -> tuple | None:
        """A small convolution as a gather and a GEMM: (the kernel on a given input, for
        timing; a function emitting its statements). The input is copied into a
        zero-padded buffer of the plan, an index table made once picks each output
        pixel's patch into a (pixels, C*KH*KW) matrix, and one GEMM with the weight as
        (C*KH*KW, O) writes (pixels, O): NHWC memory, a channels-last result as it
        stands. Few input channels (a network's first layer) is where this beats
        oneDNN's and ATen's kernels; the index table bounds its size."""
        n, c, h, wd = shape
        o, cw, kh, kw = w.spec.concrete(self.env)
        out_shape = node.outputs[0].spec.concrete(self.env)
        if a["groups"] != 1 or cw != c or len(out_shape) != 4:
            return None
        (ph, pw), (sh, sw), (dh, dw) = a["padding"], a["stride"], a["dilation"]
        oh, ow = out_shape[2], out_shape[3]
        k, pixels, hp, wp = c * kh * kw, n * oh * ow, h + 2 * ph, wd + 2 * pw
        if (pixels * k > _GATHER_MAX_ENTRIES or _nbytes((n, c, hp, wp), torch.float32) > _BUFFER_MAX_BYTES
                or _nbytes((pixels, o), torch.float32) > _BUFFER_MAX_BYTES):
            return None
        # the index of each patch element in the padded input, patch columns in (c, kh, kw)
        # order as the weight's; float64 counts exactly far beyond these sizes
        where = torch.arange(n * c * hp * wp, dtype=torch.float64).view(n, c, hp, wp)
        table = torch.nn.functional.unfold(where, (kh, kw), dilation=(dh, dw), stride=(sh, sw))
        if table.shape[-1] != oh * ow:
            return None
        index = table.transpose(1, 2).reshape(-1).round().long()  # (pixels, k), row-major
        wt = self.constants[w.name].reshape(o, k).t().contiguous()  # (k, O)
        bias = self.constants[b.name] if b is not None else None
        nhwc = ((n, o, oh, ow), (oh * ow * o, 1, ow * o, o))  # (pixels, O) as channels-last

        padded = torch.zeros(n, c, hp, wp)
        inner, flat = padded[:, :, ph:ph + h, pw:pw + wd], padded.view(-1)
        cols, result = torch.empty(pixels * k), torch.empty(pixels, o)

        def run(xr):
            inner.copy_(xr)
            torch.index_select(flat, 0, index, out=cols)
            if bias is not None:
                torch.addmm(bias, cols.view(pixels, k), wt, out=result)
            else:
                torch.mm(cols.view(pixels, k), wt, out=result)
            return result.as_strided(*nhwc)

        def emit() -> str:
            pad = self.scratch(node, (n, c, hp, wp), torch.float32, zero=True, views=(
                ("narrow", ((2, ph, h), (3, pw, wd))), ("view", (-1,))))
            col = self.scratch(node, (pixels * k,), torch.float32, views=(("view", (pixels, k)),))
            self.lines.append(f"    {pad}_v0.copy_({self.name(x)})")
            self.lines.append(f"    torch.index_select({pad}_v1, 0, {self.const(index, 'patches')}, "
                              f"out={col})")
            gemm = (f"torch.addmm({self.name(b)}, {col}_v0, {self.const(wt, 'wcols')}"
                    if b is not None else f"torch.mm({col}_v0, {self.const(wt, 'wcols')}")
            res = self.buffer(node.outputs[0], (pixels, o), views=(("strided",) + nhwc,))
            if res is None:
                return f"{gemm}).as_strided({nhwc[0]}, {nhwc[1]})"
            self.lines.append(f"    {gemm}, out={res})")
            return f"{res}_v0"

        return run, emit

    def gemm_operands(self, node: Node, attrs) -> tuple | None:
        """(x, w, b) of a float32 or bf16 GEMM with a constant (K, N) weight (and a constant
        bias of N, or None) that the CPU backend lays out itself, or None for ATen's call."""
        g = self.graph
        ins = node.inputs
        if node.op is Op.ADDMM:
            b, x, w = ins
            if attrs.get("beta", 1) != 1 or attrs.get("alpha", 1) != 1:
                return None
        elif node.op in (Op.MM, Op.MATMUL):
            (x, w), b = ins, None
        else:
            return None
        dtype = x.spec.dtype if isinstance(x, Value) else None
        if not (isinstance(x, Value) and g.is_constant(w) and dtype in (torch.float32, torch.bfloat16)
                and w.spec.dtype == dtype and x.spec.rank >= 2 and w.spec.rank == 2
                and (x.spec.rank == 2 or node.op is Op.MATMUL)):
            return None
        if b is not None and not (g.is_constant(b) and b.spec.shape == (w.spec.shape[1],)
                                  and b.spec.dtype == dtype):
            return None
        return x, w, b

    def const_gemm(self, node: Node, ins, attrs) -> str | None:
        """A float32/bf16 GEMM with a constant weight, through the fastest of (measured for
        this shape): oneDNN's linear on a weight in its own blocked layout (2-3x MKL's
        sgemm on AMD CPUs for big GEMMs); the same GEMM as oneDNN's 1x1 convolution on
        a channels-last view of x (no copy either way); ATen's addmm/mm; and, for a few
        rows (batch-1 GEMV, which MKL runs on one thread), a batched GEMM over the
        weight's columns split in one block per thread. An input flattened in NHWC order
        (``nhwc_flatten``) is read straight from its channels-last memory, with the
        weight's rows permuted once here to match, whichever kernel runs."""
        ops = self.gemm_operands(node, attrs)
        if ops is None:
            return None
        x, w, b = ops
        wt = self.constants[w.name]  # (K, N)
        nhwc = self.nhwc_rows.get(id(x))
        if nhwc is not None:  # x's columns are in (h, w, c) order: so are the weight's rows
            c, h, ww = nhwc
            wt = wt.reshape(c, h, ww, -1).permute(1, 2, 0, 3).reshape(c * h * ww, -1).contiguous()
        k, n_cols = wt.shape
        bias = self.constants[b.name] if b is not None else None
        bname = self.name(b) if b is not None else "None"
        shape = x.spec.concrete(self.env)  # (..., K): leading dims fold into the GEMM's rows
        rows = -(-x.spec.nbytes(self.env) // x.spec.dtype.itemsize // k)
        xr = torch.randn(rows, k, dtype=x.spec.dtype)
        wname = self.const(wt, "wperm") if nhwc is not None else self.name(w)
        t = torch.get_num_threads()

        def operand(batch: int | None = None) -> str:
            """x as the GEMM's (rows, K) operand, or expanded to (batch, rows, K)."""
            if nhwc is not None:  # the NHWC flatten as one strided view of the NHWC memory
                # (exact: contiguous() guarantees that memory, and is free when it is so)
                size, stride = ((rows, k), (k, 1)) if batch is None else \
                    ((batch, rows, k), (0, k, 1))
                return (f"{self.name(x)}.contiguous(memory_format=CL).as_strided({size}, "
                        f"{stride})")
            r = self.name(x) + (f".reshape(-1, {k})" if len(shape) > 2 else "")
            return r if batch is None else f"{r}.expand({batch}, {rows}, {k})"

        candidates: dict[str, Callable[[], object]] = {}
        calls: dict[str, Callable[[], str]] = {}
        out_value = node.outputs[0]
        # the activation reading this GEMM alone (GELU, ReLU), as oneDNN's post-op
        act, post = None, None
        reader = self.activation_reader(out_value)
        onednn_ok = x.spec.dtype in _ONEDNN_DTYPES
        if onednn_ok and reader is not None and nhwc is None and rows > 8:
            act, act_input, post = reader
        # the (N, K) weight every oneDNN candidate starts from, transposed once (a 9 MB
        # transposing copy takes milliseconds: four per GEMM were 1 s of BERT's start)
        wt_nk = wt.t().contiguous() if onednn_ok else None
        # the GEMM as oneDNN's 1x1 convolution over a 1 x rows NHWC image: (rows, K) row-major
        # is that image, and the channels-last result is (rows, N) row-major; oneDNN's
        # convolution kernels outrun its matmul on AVX2 (BERT's 768->3072: 180 against 130
        # GFLOP/s on an EPYC)
        conv_w = _packed_conv_weight(wt_nk.view(n_cols, k, 1, 1), _CONV_1X1,
                                     (1, k, 1, rows)) if onednn_ok and nhwc is None else None

        def conv_run(attr="none", scalars=(), algorithm=""):
            return torch.ops.mkldnn._convolution_pointwise(
                xr.view(1, 1, rows, k).permute(0, 3, 1, 2), conv_w, bias, [0, 0], [1, 1], [1, 1],
                1, attr, list(scalars), algorithm)

        def conv_call(attr="none", scalars=(), algorithm="") -> str:
            return (f"torch.ops.mkldnn._convolution_pointwise({operand()}.reshape(1, 1, {rows}, "
                    f"{k}).permute(0, 3, 1, 2), {self.const(conv_w, 'wconv')}, {bname}, [0, 0], "
                    f"[1, 1], [1, 1], 1, {attr!r}, {list(scalars)}, {algorithm!r})"
                    f".permute(0, 2, 3, 1).reshape({rows}, {n_cols})")

        if onednn_ok:
            weight = _onednn_linear_weight(wt_nk, rows)
            candidates["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(
                xr, weight, bias, "none", [], "")
            calls["onednn"] = lambda: (f"torch.ops.mkldnn._linear_pointwise({operand()}, "
                                       f"{self.const(weight, 'wdnn')}, {bname}, 'none', [], '')")
        if conv_w is not None:
            candidates["conv1x1"], calls["conv1x1"] = conv_run, conv_call
        # oneDNN's matmul and its 1x1 convolution, each a primitive made once (no per-call
        # setup; at a few rows the convolution's kernels stream the weight faster: ResNet-50's
        # classifier at batch 1 100 against 181 us on an AMX Xeon)
        made = onednn.linear(wt, bias, rows, x.spec.dtype, choose=_fastest) if onednn_ok \
            else None
        if made is not None:
            candidates["onednn_made"] = functools.partial(made, xr)
            calls["onednn_made"] = lambda: self.dnn_call(made, x) if len(shape) == 2 \
                and nhwc is None else f"{self.const(made, 'dnn')}({operand()})"

        def conv_made(activation="none"):
            return onednn.conv2d(wt_nk.view(n_cols, k, 1, 1), bias, [1, 1], [0, 0],
                                 [1, 1], 1, (1, k, 1, rows), x.spec.dtype, activation,
                                 choose=_fastest) \
                if onednn_ok and nhwc is None else None

        def conv_made_call(kernel) -> str:
            return (f"{self.const(kernel, 'dnn')}({operand()}.view(1, 1, {rows}, {k}).permute("
                    f"0, 3, 1, 2)).permute(0, 2, 3, 1).reshape({rows}, {n_cols})")

        xr_image = xr.view(1, 1, rows, k).permute(0, 3, 1, 2)
        conv_kernel = conv_made()
        if conv_kernel is not None:
            candidates["conv1x1_made"] = functools.partial(conv_kernel, xr_image)
            calls["conv1x1_made"] = lambda: conv_made_call(conv_kernel)
        if post is not None:
            activation = torch.relu if post[0] == "relu" else gelu_tanh if post[2] == "tanh" \
                else torch._C._nn.gelu  # as the activation's own statement computes it
            # the candidates above, each with the activation as its post-op, against the
            # GEMM (a 1x1 convolution where oneDNN has one) and the activation apart
            fused = {"onednn": lambda: torch.ops.mkldnn._linear_pointwise(xr, weight, bias, *post)}
            if conv_w is not None:
                fused["conv1x1"] = lambda: conv_run(*post)
            act_name = "relu" if post[0] == "relu" else "gelu_tanh" if post[2] == "tanh" \
                else "gelu"
            made_act = onednn.linear(wt, bias, rows, x.spec.dtype, act_name, choose=_fastest)
            if made_act is not None:
                fused["onednn_made"] = functools.partial(made_act, xr)
            conv_act = conv_made(act_name)
            if conv_act is not None:
                fused["conv1x1_made"] = functools.partial(conv_act, xr_image)
            fused["apart"] = (lambda: activation(conv_run())) if conv_w is not None else \
                (lambda: activation(torch.addmm(bias, xr, wt))) if bias is not None \
                else (lambda: activation(torch.mm(xr, wt)))
            best = _fastest(fused)
            if best != "apart":  # the GEMM and its activation as one oneDNN call
                self.fused_into[id(act)] = self.names[id(act_input)]
                call = conv_call(*post) if best == "conv1x1" else \
                    conv_made_call(conv_act) if best == "conv1x1_made" else \
                    self.dnn_call(made_act, x) if best == "onednn_made" and len(shape) == 2 else \
                    f"{self.const(made_act, 'dnn')}({operand()})" if best == "onednn_made" else (
                    f"torch.ops.mkldnn._linear_pointwise({operand()}, "
                    f"{self.const(weight, 'wdnn')}, {bname}, {post[0]!r}, {post[1]}, "
                    f"{post[2]!r})")
                out = list(out_value.spec.concrete(self.env))
                return call if len(shape) == 2 else f"{call}.view({out})"

        def out_arg(buf_shape) -> str:
            buf = self.buffer(out_value, buf_shape)
            return f", out={buf}" if buf else ""

        candidates["aten"] = (lambda: torch.addmm(bias, xr, wt)) if bias is not None else \
            (lambda: torch.mm(xr, wt))
        calls["aten"] = (lambda: f"torch.addmm({bname}, {operand()}, {wname}{out_arg((rows, n_cols))})") \
            if bias is not None else (lambda: f"torch.mm({operand()}, {wname}{out_arg((rows, n_cols))})")
        if t > 1 and rows <= 8 and n_cols % t == 0 and n_cols // t >= 8:
            part = n_cols // t
            ws = wt.reshape(k, t, part).permute(1, 0, 2).contiguous()  # (T, K, N/T)
            bs = bias.reshape(t, 1, part) if bias is not None else None

            def split():
                xs = xr.expand(t, rows, k)
                y = torch.baddbmm(bs, xs, ws) if bs is not None else torch.bmm(xs, ws)
                return y.view(1, n_cols) if rows == 1 else y.permute(1, 0, 2).reshape(rows, n_cols)

            def split_call():
                # one row: the (T, 1, N/T) result is the (1, N) one in memory; with a plan
                # buffer, the kernel writes a (T, 1, N/T) view of it made with the buffer
                buf = self.buffer(out_value, (1, n_cols), views=(("view", (t, 1, part)),)) \
                    if rows == 1 else None
                out = f", out={buf}_v0" if buf else ""
                e = f"{operand(t)}, {self.const(ws, 'wsplit')}{out})"
                e = (f"torch.baddbmm({self.const(bs, 'bsplit')}, {e}" if bs is not None
                     else f"torch.bmm({e}")
                if buf:
                    self.lines.append(f"    {e}")
                    return buf
                return (f"{e}.view(1, {n_cols})" if rows == 1
                        else f"{e}.permute(1, 0, 2).reshape({rows}, {n_cols})")

            candidates["split"], calls["split"] = split, split_call
        best = _fastest(candidates) if len(candidates) > 1 else "aten"
        if best == "aten" and nhwc is None and self.escapes(out_value):
            return None  # ATen's generic call, as written in the graph
        call = calls[best]()
        out = list(node.outputs[0].spec.concrete(self.env))
        return call if len(shape) == 2 or nhwc is not None else f"{call}.view({out})"

    def activation_reader(self, value: Value) -> tuple[Node, Value, tuple] | None:
        """(node, its input, ``_epilogue`` form) of the ReLU/GELU that alone reads a GEMM's
        result ``value``, directly or through a reshape (element-wise: the same either
        side of it); neither may be a graph output. None if there is no such reader."""
        g, act_input = self.graph, value
        users = self.users.get(id(value), [])
        if len(users) == 1 and users[0].op in (Op.VIEW, Op.UNSAFE_VIEW, Op.RESHAPE):
            act_input = users[0].outputs[0]
            users = self.users.get(id(act_input), [])
        if len(users) != 1 or value in g.outputs or act_input in g.outputs:
            return None
        post = _epilogue(users[0], act_input, g)
        return (users[0], act_input, post) if post is not None else None

    def nhwc_flatten(self, node: Node, ins, attrs) -> str | None:
        """Flatten a channels-last [N, C, H, W] into [N, C*H*W] in its memory's (h, w, c)
        order, a free view instead of a copy, when the only reader is a GEMM with a
        constant weight: that GEMM reads x's memory directly and takes the weight with
        its rows permuted to match (``const_gemm``), so this node passes x on as it is.
        The result is the same; only the summation order differs."""
        x, out = ins[0], node.outputs[0]
        if id(x) not in self.cl or not isinstance(x, Value) or out in self.graph.outputs:
            return None
        shape, oshape = x.spec.concrete(self.env), out.spec.concrete(self.env)
        if len(shape) != 4 or len(oshape) != 2 or oshape[0] != shape[0] or shape[1] == 1 \
                or shape[2] * shape[3] == 1:
            return None
        users = self.users.get(id(out), [])
        if len(users) != 1:
            return None
        user = users[0]
        ops = self.gemm_operands(user, {k: bind(a, self.env) for k, a in user.attrs.items()})
        if ops is None or ops[0] is not out or id(user) in self.fused_into:
            return None
        self.nhwc_rows[id(out)] = tuple(shape[1:])
        return self.name(x)  # still [N, C, H, W]: the GEMM flattens it (see above)

    def producer(self, v) -> Node | None:
        i = self.index.get(id(v)) if isinstance(v, Value) else None
        return self.graph.nodes[i] if i is not None else None

    def find_conv_residuals(self, fusable: Callable[[Node | None], bool]) -> None:
        """Convolution + residual add + ReLU (a ResNet block's end: a fused element-wise
        node adding a convolution read only there and another tensor of its shape, then
        ReLU) for one fused kernel: the convolution's statement moves to the add's, as
        the residual may be computed after it (the block's downsample)."""
        for node in self.graph.nodes:
            if node.op is not Op.FUSED_POINTWISE or parse_program(node.attrs["program"]) != _ADD_RELU:
                continue
            out = node.outputs[0]
            for a, z in (node.inputs, node.inputs[::-1]):
                conv = self.producer(a)
                if fusable(conv) and isinstance(z, Value) and z is not a \
                        and z.spec == a.spec == out.spec and self._inputs_kept(conv, node):
                    self.deferred[id(conv)] = node
                    self.conv_add_relu[id(node)] = (conv, z)
                    break

    def _inputs_kept(self, conv: Node, host: Node) -> bool:
        """Whether no node between ``conv`` and ``host`` overwrites one of conv's inputs."""
        ins = {id(v) for v in conv.input_values()}
        for n in self.graph.nodes[self.index[id(conv)] + 1:self.index[id(host)]]:
            if n.reuse is not None and id(n.inputs[n.reuse]) in ins:
                return False
        return True

    def onednn_conv(self, node: Node | None) -> bool:
        """A 2-D float32/bf16 convolution with a constant weight that oneDNN packs (the
        packed weight kept in ``self.packed``), read by one node only."""
        if node is None or node.op is not Op.CONVOLUTION:
            return False
        x, w, b = node.inputs
        a, out, g = node.attrs, node.outputs[0], self.graph
        if not (len(a["stride"]) == 2 and not a["transposed"] and g.is_constant(w)
                and (b is None or g.is_constant(b)) and isinstance(x, Value)
                and x.spec.dtype in (torch.float32, torch.bfloat16) and w.spec.dtype == x.spec.dtype
                and len(self.users.get(id(out), [])) == 1 and out not in g.outputs):
            return False
        packed = _packed_conv_weight(self.constants[w.name],
                                     {k: bind(v, self.env) for k, v in a.items()},
                                     x.spec.concrete(self.env))
        if packed is None:
            return False
        self.packed[id(node)] = packed
        return True

    def conv_residual(self, conv: Node, z: Value, host: Node) -> str:
        """oneDNN's convolution with the residual add and ReLU as post-ops: one pass over
        the output instead of the convolution's and the add's (measured on ResNet-50's
        64->256 1x1 layer at 56x56: 248 us against 682 us in float32); through a
        primitive made once where that measures faster than PyTorch's op, and where the
        residual's storage dies at ``host`` (``can_write_into``), also as oneDNN's sum
        post-op accumulating into the residual's own buffer (no new output to fill)."""
        x, w, b = conv.inputs
        a = {k: bind(v, self.env) for k, v in conv.attrs.items()}
        packed = self.packed[id(conv)]
        shape, dtype = list(x.spec.concrete(self.env)), x.spec.dtype
        bias = self.constants[b.name] if b is not None else None
        made = onednn.conv2d(self.constants[w.name], bias, a["stride"], a["padding"],
                             a["dilation"], a["groups"], shape, dtype, "relu", "add",
                             choose=_fastest)
        dies = can_write_into(self.graph, host, z)
        summed = onednn.conv2d(self.constants[w.name], bias, a["stride"], a["padding"],
                               a["dilation"], a["groups"], shape, dtype, "relu", "sum",
                               choose=_fastest) \
            if made is not None and dies else None
        if made is not None:
            xr = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
            zr = torch.randn(z.spec.concrete(self.env), dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            candidates = {
                "onednn": lambda: torch.ops.mkldnn._convolution_pointwise.binary(
                    xr, zr, packed, bias, a["padding"], a["stride"], a["dilation"],
                    a["groups"], "add", None, "relu", [], ""),
                "onednn_made": made.step(xr, zr)}
            if summed is not None:  # timed on a residual it keeps accumulating into
                candidates["onednn_sum"] = summed.step(xr, zr)
            best = _fastest(candidates)
            if best != "onednn":
                return self.dnn_call(summed if best == "onednn_sum" else made, x, z)
        return (f"torch.ops.mkldnn._convolution_pointwise.binary({self.as_cl(conv.inputs[0])}, "
                f"{self.as_cl(z)}, {self.const(packed, 'packed')}, "
                f"{self.name(b) if b is not None else None}, {a['padding']}, {a['stride']}, "
                f"{a['dilation']}, {a['groups']}, 'add', None, 'relu', [], '')")

    def prepare(self) -> None:
        """Decisions that span nodes, made before any statement (backends extend it)."""
        self.int8_residual: dict[int, onednn._Kernel] = {}
        self.find_conv_residuals(lambda n: self.onednn_conv(n) or self.int8_conv(n))
        for host, (conv, z) in list(self.conv_add_relu.items()):
            if conv.op is not Op.CONV2D_INT8:
                continue
            # the residual add and ReLU as the int8 primitive's post-ops, accumulating into
            # z's buffer where z dies there (oneDNN's sum post-op), else adding it
            host_node = self.graph.nodes[self.index[host]]
            made = self.int8_made(conv, "relu", None, "sum" if can_write_into(
                self.graph, host_node, z) else "add")
            if made is None:  # no primitive: the nodes run apart, as captured
                del self.conv_add_relu[host], self.deferred[id(conv)]
            else:
                self.int8_residual[id(conv)] = made

    def int8_conv(self, node: Node | None) -> bool:
        """Whether ``node`` is an int8 convolution with a float result and no post-op,
        read by one node only, that a oneDNN int8 primitive made once can run with a
        residual add and ReLU after it (a quantized ResNet block's end)."""
        if self.int8_attrs(node) is None:
            return False
        a, out = node.attrs, node.outputs[0]
        return (a["post_op"] == "none" and a["output_dtype"] in (None, torch.float32)
                and len(self.users.get(id(out), [])) == 1 and out not in self.graph.outputs)

    def int8_attrs(self, node: Node | None) -> dict | None:
        """The bound attributes of an int8 convolution that oneDNN's int8 primitive can
        run here (one group, constant symmetric weights it computes exactly, 4-D int8 or
        uint8 input), else None."""
        from deepseek.quantization.kernels import int8_native_for

        if node is None or node.op is not Op.CONV2D_INT8 or self.device != "cpu":
            return None
        x, w, ws, wz, b = node.inputs
        a = {k: bind(v, self.env) for k, v in node.attrs.items()}
        ok = (isinstance(x, Value) and x.spec.dtype in (torch.uint8, torch.int8)
              and all(self.graph.is_constant(v) for v in (w, ws, wz, b) if v is not None)
              and a["groups"] == 1 and x.spec.rank == 4 and onednn.available()
              and (wz is None or not bool(self.constants[wz.name].ne(0).any()))
              and int8_native_for(self.constants[w.name]))
        return a if ok else None

    def int8_made(self, node: Node, post: str, out_dtype, residual: str | None = None):
        """``node``'s int8 primitive made once (``onednn.qconv2d``) with activation
        ``post``, result ``out_dtype`` (None: float32) and ``residual``, or None."""
        x, w, ws, _, b = node.inputs
        a = self.int8_attrs(node)
        return onednn.qconv2d(
            self.constants[w.name], self.constants[ws.name],
            None if b is None else self.constants[b.name], a["stride"], a["padding"],
            a["dilation"], list(x.spec.concrete(self.env)), x.spec.dtype, a["x_scale"],
            a["x_zero_point"], post, out_dtype, a["output_scale"], a["output_zero_point"],
            residual=residual)

    def int8_alone(self, node: Node) -> str | None:
        """An int8 convolution as its primitive made once, called from the plan (so it
        can join a chain), where that measures faster than PyTorch's int8 ops (which make
        their primitive every call); else None."""
        from deepseek.quantization.kernels import pytorch_conv2d_int8

        a = self.int8_attrs(node)
        if a is None:
            return None
        made = self.int8_made(node, a["post_op"], a["output_dtype"])
        if made is None:
            return None
        x = node.inputs[0]
        xr = torch.randint(0, 100, list(x.spec.concrete(self.env)), dtype=x.spec.dtype
                           ).contiguous(memory_format=torch.channels_last)
        consts = [None if v is None else self.constants[v.name] for v in node.inputs[1:]]
        rest = [a[k] for k in ("stride", "padding", "dilation", "groups", "post_op",
                               "output_scale", "output_zero_point", "output_dtype")]
        if _fastest({"onednn_made": made.step(xr), "pytorch": lambda: pytorch_conv2d_int8(
                xr, a["x_scale"], a["x_zero_point"], *consts, *rest)}) != "onednn_made":
            return None
        self.cl.add(id(node.outputs[0]))
        return self.dnn_call(made, x)

    def generate(self) -> Callable:
        g = self.graph
        for v in g.inputs:
            self.names[id(v)] = f"i_{v.name}"
        for name, v in g.const_values.items():
            self.names[id(v)] = self.const(self.constants[name], "c")
        for n in g.nodes:
            for o in n.outputs:
                self.names[id(o)] = f"v_{o.name}"
        self.lines = ["def plan(inputs):"]
        if g.inputs:
            self.lines.append(f"    {', '.join(self.names[id(v)] for v in g.inputs)}, = inputs")
        preamble_at = len(self.lines)
        if self.device == "cpu":  # measured choices: from the disk cache where made before
            from deepseek.runtime.artifact import graph_to_json

            with choices.recording(graph_to_json(g), self.env):
                return self._generate(preamble_at)
        return self._generate(preamble_at)

    def _generate(self, preamble_at: int) -> Callable:
        g = self.graph
        self.prepare()
        last = g.last_use()
        never_made = set()
        for node_id, host in self.deferred.items():
            node = g.nodes[self.index[node_id]]
            self.hosted[node_id] = host  # the profiler times it as part of its host
            never_made.update(id(o) for o in node.outputs)
            for v in node.input_values():
                last[v] = max(last[v], self.index[id(host)])
        dying: dict[int, list[str]] = {}
        for v, i in last.items():
            if i < len(g.nodes) and v not in g.inputs and not g.is_constant(v) \
                    and id(v) not in never_made:
                dying.setdefault(i, []).append(self.names[id(v)])
        starts = []  # index in self.lines of each node's statement, then of the return
        for i, node in enumerate(g.nodes):
            starts.append(len(self.lines))
            choices.at_node(i + 1)
            self.emit(i, node)
            for o in node.outputs:  # outputs nobody reads die at once
                if id(o) not in self.uses and o not in g.outputs and id(o) not in never_made:
                    dying.setdefault(i, []).append(self.names[id(o)])
            if dying.get(i):
                self.lines.append(f"    del {', '.join(dying[i])}")
        starts.append(len(self.lines))
        if self.buffers:
            # the plan's buffers: one set per call in flight, reused across calls (a
            # list's pop and append are atomic, so concurrent calls never share a set;
            # a call that raises just drops its set)
            self.globals["_pool"] = []
            self.globals["_new_buffers"] = functools.partial(_make_buffers, tuple(self.buffers))
            names = ", ".join(", ".join([f"_b{i}"] + [f"_b{i}_v{j}" for j in range(len(b[3]))])
                              for i, b in enumerate(self.buffers))
            preamble = ["    try:", "        _bufs = _pool.pop()", "    except IndexError:",
                        "        _bufs = _new_buffers()", f"    {names}, = _bufs"]
            self.lines[preamble_at:preamble_at] = preamble
            starts = [i + len(preamble) for i in starts]
            self.lines.append("    _pool.append(_bufs)")
        # outputs leave in PyTorch's default layout, whatever layout was used inside
        self.lines.append(f"    return [{', '.join(self.names[id(v)] + '.contiguous()' for v in g.outputs)}]")
        index = {id(n): i for i, n in enumerate(g.nodes)}
        fused = frozenset(i for i, n in enumerate(g.nodes) if id(n) in self.fused_into
                          or id(n) in self.hosted)
        marks = {
            # indices of nodes computed by another node's kernel (post-ops)
            "fused_nodes": fused,
            # of those, the ones a later node's statement computes (an op moved past a max
            # pool): index -> that node's index; the others are computed by their producer
            "fused_hosts": {index[k]: index[id(h)] for k, h in self.hosted.items()},
            # nodes run by an algorithm doing fewer operations than the op's definition
            # counts (Winograd): index -> its name; their FLOP rates are effective ones
            "algorithms": {index[k]: name for k, name in self.algorithms.items()},
        }
        plain = dnn_chains.merge(self.lines, starts, self.steps, self.const) \
            if any(s.kernel for s in self.steps.values()) else self.lines
        return _build(self.lines, self.globals, starts, None, marks, plain)


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _make_buffers(specs: tuple) -> tuple[torch.Tensor, ...]:
    """A plan's buffers, each ``(shape, dtype, memory_format, views, zero)``, followed by
    its views: ``("view", shape)``, ``("narrow", ((dim, start, length), ...))`` or
    ``("strided", size, stride)``. Never inference tensors (a first call under
    torch.inference_mode must not make buffers that later calls outside it cannot write)."""
    out = []
    with torch.inference_mode(False):
        for shape, dtype, fmt, views, zero in specs:
            t = torch.empty(shape, dtype=dtype, memory_format=fmt)
            if zero:
                t.zero_()
            out.append(t)
            for view in views:
                if view[0] == "view":
                    out.append(t.view(view[1]))
                elif view[0] == "narrow":
                    u = t
                    for dim, start, length in view[1]:
                        u = u.narrow(dim, start, length)
                    out.append(u)
                else:
                    out.append(t.as_strided(view[1], view[2]))
    return tuple(out)


def _build(lines: list[str], globals_: dict, starts: list[int],
           hook: Callable[[int], object] | None, marks: Mapping[str, object],
           plain: list[str] | None = None) -> Callable:
    """Exec the plan's source; with ``hook``, a ``_hook(i)`` line goes before node i's
    statement (its ``del`` line stays with it) and ``_hook(len(nodes))`` before the return.
    ``marks`` (what the profiler reads about nodes) become attributes of the function.
    ``plain``: the plain plan's lines where they differ from ``lines`` (stretches of
    oneDNN kernels merged into one call); the instrumented twin keeps a statement per node."""
    if hook is not None:
        lines = list(lines)
        for i in reversed(range(len(starts))):
            lines.insert(starts[i], f"    _hook({i})")
    source = "\n".join(plain if hook is None and plain is not None else lines) + "\n"
    namespace = dict(globals_)
    if hook is not None:
        namespace["_hook"] = hook
    name = "<deepseek-cpu-plan>" if hook is None else "<deepseek-cpu-plan-instrumented>"
    exec(compile(source, name, "exec"), namespace)  # our own generated code
    fn = namespace["plan"]
    fn.source = source
    vars(fn).update(marks)
    if hook is None:  # the twin shares this plan's kernels, packed weights and choices
        fn.instrumented = lambda h: _build(lines, globals_, starts, h, marks)
    return fn


def generate_plan(graph: Graph, env: Mapping[str, int], device: str = "cpu",
                  instrument: Callable[[int], object] | None = None,
                  constants: Mapping[str, torch.Tensor] | None = None,
                  tuner=None) -> Callable:
    """Compile ``graph`` for the symbol bindings ``env`` into ``plan(inputs) -> outputs``.

    With ``instrument``, the plan calls ``instrument(i)`` just before node i and
    ``instrument(len(graph.nodes))`` after the last (the profiler's clock); without
    it the code is exactly the plain plan. ``plan.instrumented(hook)`` makes such a
    twin of a plan that already exists, with the same kernels and packed weights.
    ``constants`` replaces the graph's weights (e.g. copies on the backend's device).
    Devices other than the CPU get the CUDA backend's kernel choices
    (``deepseek.backends.cuda.codegen``), measured or cached by ``tuner``.
    """
    if device == "cpu":
        emitter = _Emitter(graph, env, device, constants)
    else:  # CUDA devices (ROCm builds too): the CUDA backend's kernel choices
        from deepseek.backends.cuda.codegen import CUDAEmitter

        emitter = CUDAEmitter(graph, env, device, constants)
        emitter.tuner = tuner
    plan = emitter.generate()
    return plan if instrument is None else plan.instrumented(instrument)
