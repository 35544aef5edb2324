"""IR -> ONNX for element-wise ops, reductions, views, data movement, creation and QDQ."""

from __future__ import annotations

import math

import torch

from deepseek.errors import UnsupportedOpError
from deepseek.frontend.onnx_export import ExportContext, exports
from deepseek.frontend.onnx_types import onnx_elem_type
from deepseek.ir.graph import Node, Value
from deepseek.ir.ops import Op
from deepseek.ir.types import Sym

I64 = torch.int64
_BIG = 2 ** 62


def X(ctx: ExportContext, node: Node, i: int = 0) -> str:
    v = node.inputs[i]
    if not isinstance(v, Value):
        raise UnsupportedOpError(f"input {i} of {node.kind} must be a tensor")
    return ctx.name(v)


def out_dtype(node: Node, i: int = 0) -> torch.dtype:
    return node.outputs[i].spec.dtype


def _meta(x):
    if isinstance(x, Value):
        return torch.empty([1] * x.spec.rank, dtype=x.spec.dtype, device="meta")
    if isinstance(x, Sym):
        return 1
    return x


def promoted(node: Node, inputs=None) -> torch.dtype:
    """The dtype PyTorch computes the node's (binary) op in."""
    xs = [x for x in (inputs if inputs is not None else node.inputs) if x is not None]
    ms = [_meta(x) for x in xs]
    if len(ms) == 1:
        return ms[0].dtype if isinstance(ms[0], torch.Tensor) else out_dtype(node)
    dt = torch.result_type(ms[0], ms[1])
    for m in ms[2:]:
        dt = torch.promote_types(dt, m.dtype if isinstance(m, torch.Tensor) else dt)
    return dt


def rank(v) -> int:
    return v.spec.rank if isinstance(v, Value) else 0


# --------------------------------------------------------------------------- #
# element-wise
# --------------------------------------------------------------------------- #
_UNARY = {
    Op.ABS: "Abs", Op.NEG: "Neg", Op.EXP: "Exp", Op.LOG: "Log", Op.SQRT: "Sqrt", Op.SIN: "Sin",
    Op.COS: "Cos", Op.TAN: "Tan", Op.TANH: "Tanh", Op.ASIN: "Asin", Op.ACOS: "Acos", Op.ATAN: "Atan",
    Op.SINH: "Sinh", Op.COSH: "Cosh", Op.ASINH: "Asinh", Op.ACOSH: "Acosh", Op.ATANH: "Atanh",
    Op.SIGMOID: "Sigmoid", Op.RELU: "Relu", Op.ERF: "Erf", Op.FLOOR: "Floor", Op.CEIL: "Ceil",
    Op.ROUND: "Round", Op.SIGN: "Sign", Op.SGN: "Sign", Op.RECIPROCAL: "Reciprocal",
    Op.ISNAN: "IsNaN", Op.ISINF: "IsInf", Op.HARDSWISH: "HardSwish",
}
_FLOAT_ONLY = {"Exp", "Log", "Sqrt", "Sin", "Cos", "Tan", "Tanh", "Asin", "Acos", "Atan", "Sinh",
               "Cosh", "Asinh", "Acosh", "Atanh", "Sigmoid", "Erf", "Floor", "Ceil", "Round",
               "Reciprocal", "HardSwish"}


@exports(*_UNARY)
def unary(ctx, node):
    op = _UNARY[node.op]
    dt = out_dtype(node)
    x = node.inputs[0]
    if op in ("IsNaN", "IsInf"):
        return [ctx.one(op, [X(ctx, node)])]
    if op in ("Floor", "Ceil", "Round") and not dt.is_floating_point:
        return [ctx.one("Identity", [X(ctx, node)])]
    if op in _FLOAT_ONLY and not x.spec.dtype.is_floating_point:
        return [ctx.one(op, [ctx.operand(x, dt)])]
    return [ctx.one(op, [ctx.operand(x, dt)])]


@exports(Op.RSQRT)
def rsqrt(ctx, node):
    return [ctx.one("Reciprocal", [ctx.one("Sqrt", [ctx.operand(node.inputs[0], out_dtype(node))])])]


@exports(Op.LOGICAL_NOT)
def logical_not(ctx, node):
    x = ctx.operand(node.inputs[0], torch.bool)
    return [ctx.cast(ctx.one("Not", [x]), torch.bool, out_dtype(node))]


@exports(Op.BITWISE_NOT)
def bitwise_not(ctx, node):
    if out_dtype(node) == torch.bool:
        return [ctx.one("Not", [X(ctx, node)])]
    return [ctx.one("BitwiseNot", [X(ctx, node)])]


@exports(Op.TRUNC)
def trunc(ctx, node):
    x = X(ctx, node)
    dt = out_dtype(node)
    if not dt.is_floating_point:
        return [ctx.one("Identity", [x])]
    neg = ctx.one("Less", [x, ctx.const(0, dt)])
    return [ctx.one("Where", [neg, ctx.one("Ceil", [x]), ctx.one("Floor", [x])])]


@exports(Op.FRAC)
def frac(ctx, node):
    x = X(ctx, node)
    dt = out_dtype(node)
    neg = ctx.one("Less", [x, ctx.const(0, dt)])
    t = ctx.one("Where", [neg, ctx.one("Ceil", [x]), ctx.one("Floor", [x])])
    return [ctx.one("Sub", [x, t])]


@exports(Op.EXPM1, Op.LOG1P, Op.LOG2, Op.LOG10, Op.EXP2)
def log_exp_variants(ctx, node):
    dt = out_dtype(node)
    x = ctx.operand(node.inputs[0], dt)
    if node.op is Op.EXPM1:
        return [ctx.one("Sub", [ctx.one("Exp", [x]), ctx.const(1, dt)])]
    if node.op is Op.LOG1P:
        return [ctx.one("Log", [ctx.one("Add", [x, ctx.const(1, dt)])])]
    if node.op is Op.EXP2:
        return [ctx.one("Pow", [ctx.const(2, dt), x])]
    base = 2.0 if node.op is Op.LOG2 else 10.0
    return [ctx.one("Div", [ctx.one("Log", [x]), ctx.const(math.log(base), dt)])]


@exports(Op.CLONE, Op.ALIAS, Op.LIFT_FRESH_COPY, Op.DETACH, Op.CONTIGUOUS, Op.POSITIVE)
def identity(ctx, node):
    return [ctx.one("Identity", [X(ctx, node)])]


@exports(Op.TO_COPY)
def to_copy(ctx, node):
    x = node.inputs[0]
    dt = out_dtype(node)
    if x.spec.dtype == dt:
        return [ctx.one("Identity", [X(ctx, node)])]
    return [ctx.one("Cast", [X(ctx, node)], to=onnx_elem_type(dt))]


@exports(Op.GELU)
def gelu(ctx, node):
    dt = out_dtype(node)
    x = X(ctx, node)
    approx = node.attrs.get("approximate", "none")
    if ctx.opset >= 20:
        return [ctx.one("Gelu", [x], approximate=approx)]
    half = ctx.one("Mul", [x, ctx.const(0.5, dt)])
    if approx == "tanh":
        cube = ctx.one("Mul", [ctx.one("Mul", [x, x]), x])
        inner = ctx.one("Add", [x, ctx.one("Mul", [cube, ctx.const(0.044715, dt)])])
        t = ctx.one("Tanh", [ctx.one("Mul", [inner, ctx.const(math.sqrt(2 / math.pi), dt)])])
    else:
        t = ctx.one("Erf", [ctx.one("Mul", [x, ctx.const(1 / math.sqrt(2), dt)])])
    return [ctx.one("Mul", [half, ctx.one("Add", [t, ctx.const(1, dt)])])]


@exports(Op.SILU)
def silu(ctx, node):
    x = X(ctx, node)
    return [ctx.one("Mul", [x, ctx.one("Sigmoid", [x])])]


@exports(Op.MISH)
def mish(ctx, node):
    x = X(ctx, node)
    if ctx.opset >= 18:
        return [ctx.one("Mish", [x])]
    return [ctx.one("Mul", [x, ctx.one("Tanh", [ctx.one("Softplus", [x])])])]


@exports(Op.HARDTANH)
def hardtanh(ctx, node):
    dt = out_dtype(node)
    lo, hi = node.attrs.get("min_val", -1.0), node.attrs.get("max_val", 1.0)
    return [ctx.one("Clip", [X(ctx, node), ctx.const(lo, dt), ctx.const(hi, dt)])]


@exports(Op.HARDSIGMOID)
def hardsigmoid(ctx, node):
    return [ctx.one("HardSigmoid", [X(ctx, node)], alpha=1 / 6, beta=0.5)]


@exports(Op.LEAKY_RELU)
def leaky_relu(ctx, node):
    return [ctx.one("LeakyRelu", [X(ctx, node)], alpha=float(node.attrs.get("negative_slope", 0.01)))]


@exports(Op.ELU)
def elu(ctx, node):
    dt = out_dtype(node)
    x = X(ctx, node)
    alpha = float(node.attrs.get("alpha", 1.0))
    scale, in_scale = float(node.attrs.get("scale", 1.0)), float(node.attrs.get("input_scale", 1.0))
    if scale == 1.0 and in_scale == 1.0:
        return [ctx.one("Elu", [x], alpha=alpha)]
    neg = ctx.one("Mul", [ctx.one("Sub", [ctx.one("Exp", [ctx.one("Mul", [x, ctx.const(in_scale, dt)])]),
                                          ctx.const(1, dt)]), ctx.const(alpha * scale, dt)])
    pos = ctx.one("Mul", [x, ctx.const(scale, dt)])
    return [ctx.one("Where", [ctx.one("Greater", [x, ctx.const(0, dt)]), pos, neg])]


@exports(Op.SOFTPLUS)
def softplus(ctx, node):
    dt = out_dtype(node)
    x = X(ctx, node)
    beta = float(node.attrs.get("beta", 1.0))
    threshold = float(node.attrs.get("threshold", 20.0))
    bx = x if beta == 1 else ctx.one("Mul", [x, ctx.const(beta, dt)])
    sp = ctx.one("Softplus", [bx])
    if beta != 1:
        sp = ctx.one("Div", [sp, ctx.const(beta, dt)])
    if threshold < 30:  # PyTorch returns x itself above the threshold
        sp = ctx.one("Where", [ctx.one("Greater", [bx, ctx.const(threshold, dt)]), x, sp])
    return [sp]


@exports(Op.CLAMP)
def clamp(ctx, node):
    dt = out_dtype(node)
    x = ctx.operand(node.inputs[0], dt)
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    if dt == torch.bool:
        raise UnsupportedOpError("clamp on bool tensors")
    return [ctx.one("Clip", [x, ctx.operand(lo, dt) if lo is not None else "",
                             ctx.operand(hi, dt) if hi is not None else ""])]


@exports(Op.CLAMP_TENSOR)
def clamp_tensor(ctx, node):
    dt = out_dtype(node)
    y = ctx.operand(node.inputs[0], dt)
    lo = node.inputs[1] if len(node.inputs) > 1 else None
    hi = node.inputs[2] if len(node.inputs) > 2 else None
    if lo is not None:
        y = ctx.one("Max", [y, ctx.operand(lo, dt)])
    if hi is not None:
        y = ctx.one("Min", [y, ctx.operand(hi, dt)])
    return [y]


@exports(Op.NAN_TO_NUM)
def nan_to_num(ctx, node):
    dt = out_dtype(node)
    x = X(ctx, node)
    info = torch.finfo(dt)
    nan = node.attrs.get("nan") or 0.0
    pos = node.attrs.get("posinf")
    neg = node.attrs.get("neginf")
    y = ctx.one("Where", [ctx.one("IsNaN", [x]), ctx.const(nan, dt), x])
    y = ctx.one("Where", [ctx.one("IsInf", [x], detect_negative=0),
                          ctx.const(info.max if pos is None else pos, dt), y])
    return [ctx.one("Where", [ctx.one("IsInf", [x], detect_positive=0),
                              ctx.const(info.min if neg is None else neg, dt), y])]


_ARITH = {Op.ADD_TENSOR: "Add", Op.ADD_SCALAR: "Add", Op.SUB_TENSOR: "Sub", Op.SUB_SCALAR: "Sub",
          Op.MUL_TENSOR: "Mul", Op.MUL_SCALAR: "Mul", Op.MAXIMUM: "Max", Op.MINIMUM: "Min",
          Op.FMAX: "Max", Op.FMIN: "Min"}


@exports(*_ARITH)
def arith(ctx, node):
    dt = out_dtype(node)
    a, b = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else node.attrs.get("other")
    if b is None:
        b = node.attrs.get("other")
    alpha = node.attrs.get("alpha", 1)
    op = _ARITH[node.op]
    if dt == torch.bool and op in ("Add", "Mul"):
        op = "Or" if op == "Add" else "And"
    if dt == torch.bool and op in ("Max", "Min"):
        op = "Or" if op == "Max" else "And"
    bn = ctx.operand(b, dt)
    if alpha != 1:
        bn = ctx.one("Mul", [bn, ctx.const(alpha, dt)])
    return [ctx.one(op, [ctx.operand(a, dt), bn])]


@exports(Op.RSUB_TENSOR, Op.RSUB_SCALAR)
def rsub(ctx, node):
    dt = out_dtype(node)
    a, b = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else node.attrs.get("other")
    alpha = node.attrs.get("alpha", 1)
    an = ctx.operand(a, dt)
    if alpha != 1:
        an = ctx.one("Mul", [an, ctx.const(alpha, dt)])
    return [ctx.one("Sub", [ctx.operand(b, dt), an])]


def _int_div(ctx, a: str, b: str, mode: str | None, dt) -> str:
    if mode == "floor":
        rem = ctx.one("Mod", [a, b], fmod=0)
        return ctx.one("Div", [ctx.one("Sub", [a, rem]), b])
    return ctx.one("Div", [a, b])  # ONNX integer division truncates


@exports(Op.DIV_TENSOR, Op.DIV_SCALAR, Op.DIV_TENSOR_MODE, Op.DIV_SCALAR_MODE, Op.FLOOR_DIVIDE)
def div(ctx, node):
    dt = out_dtype(node)
    a, b = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else node.attrs.get("other")
    mode = "floor" if node.op is Op.FLOOR_DIVIDE else node.attrs.get("rounding_mode")
    an, bn = ctx.operand(a, dt), ctx.operand(b, dt)
    if not dt.is_floating_point:
        return [_int_div(ctx, an, bn, mode, dt)]
    q = ctx.one("Div", [an, bn])
    if mode == "floor":
        q = ctx.one("Floor", [q])
    elif mode == "trunc":
        neg = ctx.one("Less", [q, ctx.const(0, dt)])
        q = ctx.one("Where", [neg, ctx.one("Ceil", [q]), ctx.one("Floor", [q])])
    return [q]


@exports(Op.REMAINDER_TENSOR, Op.REMAINDER_SCALAR, Op.FMOD_TENSOR, Op.FMOD_SCALAR)
def remainder(ctx, node):
    dt = out_dtype(node)
    a, b = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else node.attrs.get("other")
    an, bn = ctx.operand(a, dt), ctx.operand(b, dt)
    fmod = node.op in (Op.FMOD_TENSOR, Op.FMOD_SCALAR)
    if fmod:
        return [ctx.one("Mod", [an, bn], fmod=1)]
    if not dt.is_floating_point:
        return [ctx.one("Mod", [an, bn], fmod=0)]
    q = ctx.one("Floor", [ctx.one("Div", [an, bn])])
    return [ctx.one("Sub", [an, ctx.one("Mul", [q, bn])])]


@exports(Op.POW_TENSOR_SCALAR, Op.POW_TENSOR_TENSOR, Op.POW_SCALAR)
def pow_(ctx, node):
    dt = out_dtype(node)
    if node.op is Op.POW_SCALAR:
        base, exp = node.attrs.get("self"), node.inputs[0]
    else:
        base = node.inputs[0]
        exp = node.inputs[1] if node.op is Op.POW_TENSOR_TENSOR else node.attrs.get("exponent")
    if node.op is Op.POW_TENSOR_SCALAR and exp == 2 and dt.is_floating_point:
        b = ctx.operand(base, dt)
        return [ctx.one("Mul", [b, b])]
    if node.op is Op.POW_TENSOR_SCALAR and exp == 0.5 and dt.is_floating_point:
        return [ctx.one("Sqrt", [ctx.operand(base, dt)])]
    return [ctx.one("Pow", [ctx.operand(base, dt), ctx.operand(exp, dt)])]


_COMPARE = {Op.EQ_TENSOR: "Equal", Op.EQ_SCALAR: "Equal", Op.NE_TENSOR: "Equal",
            Op.NE_SCALAR: "Equal", Op.LT_TENSOR: "Less", Op.LT_SCALAR: "Less",
            Op.LE_TENSOR: "LessOrEqual", Op.LE_SCALAR: "LessOrEqual", Op.GT_TENSOR: "Greater",
            Op.GT_SCALAR: "Greater", Op.GE_TENSOR: "GreaterOrEqual", Op.GE_SCALAR: "GreaterOrEqual"}


@exports(*_COMPARE)
def compare(ctx, node):
    a = node.inputs[0]
    b = node.inputs[1] if len(node.inputs) > 1 else node.attrs.get("other")
    dt = promoted(node, [a, b])
    op = _COMPARE[node.op]
    if dt == torch.bool and op != "Equal":
        dt = torch.int32  # ONNX orders numbers only
    y = ctx.one(op, [ctx.operand(a, dt), ctx.operand(b, dt)])
    if node.op in (Op.NE_TENSOR, Op.NE_SCALAR):
        y = ctx.one("Not", [y])
    return [y]


_LOGICAL = {Op.LOGICAL_AND: "And", Op.LOGICAL_OR: "Or", Op.LOGICAL_XOR: "Xor"}


@exports(*_LOGICAL)
def logical(ctx, node):
    a, b = node.inputs
    y = ctx.one(_LOGICAL[node.op], [ctx.operand(a, torch.bool), ctx.operand(b, torch.bool)])
    return [ctx.cast(y, torch.bool, out_dtype(node))]


_BITWISE = {Op.BITWISE_AND_TENSOR: "And", Op.BITWISE_AND_SCALAR: "And", Op.BITWISE_OR_TENSOR: "Or",
            Op.BITWISE_OR_SCALAR: "Or", Op.BITWISE_XOR_TENSOR: "Xor", Op.BITWISE_XOR_SCALAR: "Xor"}


@exports(*_BITWISE)
def bitwise(ctx, node):
    dt = out_dtype(node)
    a = node.inputs[0]
    b = node.inputs[1] if len(node.inputs) > 1 else node.attrs.get("other")
    op = _BITWISE[node.op]
    if dt != torch.bool:
        if ctx.opset < 18:
            raise UnsupportedOpError("integer bitwise ops need opset 18")
        op = "Bitwise" + op
    return [ctx.one(op, [ctx.operand(a, dt), ctx.operand(b, dt)])]


@exports(Op.BITWISE_LEFT_SHIFT_TENSOR, Op.BITWISE_RIGHT_SHIFT_TENSOR)
def shift(ctx, node):
    dt = out_dtype(node)
    if dt != torch.uint8:
        raise UnsupportedOpError("ONNX BitShift is defined for unsigned integers only")
    direction = "LEFT" if node.op is Op.BITWISE_LEFT_SHIFT_TENSOR else "RIGHT"
    return [ctx.one("BitShift", [ctx.operand(node.inputs[0], dt), ctx.operand(node.inputs[1], dt)],
                    direction=direction)]


@exports(Op.WHERE_SELF)
def where(ctx, node):
    dt = out_dtype(node)
    c, a, b = node.inputs
    return [ctx.one("Where", [ctx.operand(c, torch.bool), ctx.operand(a, dt), ctx.operand(b, dt)])]


@exports(Op.MASKED_FILL_SCALAR, Op.MASKED_FILL_TENSOR)
def masked_fill(ctx, node):
    dt = out_dtype(node)
    x, mask = node.inputs[0], node.inputs[1]
    value = node.inputs[2] if node.op is Op.MASKED_FILL_TENSOR else node.attrs["value"]
    return [ctx.one("Where", [ctx.operand(mask, torch.bool), ctx.operand(value, dt),
                              ctx.operand(x, dt)])]


@exports(Op.LERP_SCALAR, Op.LERP_TENSOR)
def lerp(ctx, node):
    dt = out_dtype(node)
    a, b = ctx.operand(node.inputs[0], dt), ctx.operand(node.inputs[1], dt)
    w = ctx.operand(node.inputs[2] if node.op is Op.LERP_TENSOR else node.attrs["weight"], dt)
    return [ctx.one("Add", [a, ctx.one("Mul", [w, ctx.one("Sub", [b, a])])])]


@exports(Op.ADDCMUL, Op.ADDCDIV)
def addc(ctx, node):
    dt = out_dtype(node)
    s, t1, t2 = (ctx.operand(x, dt) for x in node.inputs[:3])
    p = ctx.one("Mul" if node.op is Op.ADDCMUL else "Div", [t1, t2])
    value = node.attrs.get("value", 1)
    if value != 1:
        p = ctx.one("Mul", [p, ctx.const(value, dt)])
    return [ctx.one("Add", [s, p])]


@exports(Op.PRELU)
def prelu(ctx, node):
    x, w = node.inputs
    wn = X(ctx, node, 1)
    if x.spec.rank >= 2 and w.spec.rank == 1:  # per channel: broadcast along dim 1
        wn = ctx.one("Reshape", [wn, ctx.i64([-1] + [1] * (x.spec.rank - 2))])
    return [ctx.one("PRelu", [X(ctx, node), wn])]


# --------------------------------------------------------------------------- #
# reductions
# --------------------------------------------------------------------------- #
def reduce(ctx, op: str, x: str, axes, keepdims: bool) -> str:
    """Reduce* with axes as an attribute or an input, as the opset wants (None: all axes)."""
    axes_input = ctx.opset >= 18 or (op == "ReduceSum" and ctx.opset >= 13)
    if axes is None:
        return ctx.one(op, [x], keepdims=int(keepdims))
    axes = [int(a) for a in axes]
    if axes_input:
        return ctx.one(op, [x, ctx.i64(axes)], keepdims=int(keepdims))
    return ctx.one(op, [x], axes=axes, keepdims=int(keepdims))


def _dims(node, key="dim"):
    d = node.attrs.get(key)
    if d is None or d == []:
        return None
    if isinstance(d, int):
        return [d]
    return list(d)


@exports(Op.SUM_DIM_INTLIST, Op.SUM, Op.MEAN_DIM, Op.MEAN, Op.AMAX, Op.AMIN, Op.MAX, Op.MIN,
         Op.PROD, Op.LOGSUMEXP)
def reductions(ctx, node):
    dt = out_dtype(node)
    x = node.inputs[0]
    op = {Op.SUM_DIM_INTLIST: "ReduceSum", Op.SUM: "ReduceSum", Op.MEAN_DIM: "ReduceMean",
          Op.MEAN: "ReduceMean", Op.AMAX: "ReduceMax", Op.AMIN: "ReduceMin", Op.MAX: "ReduceMax",
          Op.MIN: "ReduceMin", Op.PROD: "ReduceProd", Op.LOGSUMEXP: "ReduceLogSumExp"}[node.op]
    axes = _dims(node)
    keep = bool(node.attrs.get("keepdim", False))
    if x.spec.rank == 0:
        return [ctx.cast(X(ctx, node), x.spec.dtype, dt)]
    work = dt
    if dt == torch.bool:  # ReduceMax/Min on bool: through an integer type
        work = torch.int32
    xin = ctx.operand(x, work)
    y = reduce(ctx, op, xin, axes, keep)
    return [ctx.cast(y, work, dt)]


@exports(Op.PROD_DIM_INT)
def prod_dim(ctx, node):
    dt = out_dtype(node)
    return [reduce(ctx, "ReduceProd", ctx.operand(node.inputs[0], dt), [node.attrs["dim"]],
                   bool(node.attrs.get("keepdim", False)))]


@exports(Op.MAX_DIM, Op.MIN_DIM)
def max_dim(ctx, node):
    x = X(ctx, node)
    dim, keep = node.attrs["dim"], bool(node.attrs.get("keepdim", False))
    op = "ReduceMax" if node.op is Op.MAX_DIM else "ReduceMin"
    vals = reduce(ctx, op, x, [dim], keep)
    idx = ctx.one("ArgMax" if node.op is Op.MAX_DIM else "ArgMin", [x], axis=dim, keepdims=int(keep))
    return [vals, idx]


@exports(Op.ARGMAX, Op.ARGMIN)
def argmax(ctx, node):
    x = X(ctx, node)
    dim = node.attrs.get("dim")
    keep = bool(node.attrs.get("keepdim", False))
    op = "ArgMax" if node.op is Op.ARGMAX else "ArgMin"
    if node.inputs[0].spec.dtype == torch.bool:
        x = ctx.cast(x, torch.bool, torch.int32)
    if dim is None:
        flat = ctx.one("Reshape", [x, ctx.i64([-1])])
        y = ctx.one(op, [flat], axis=0, keepdims=0)
        if keep:
            y = ctx.one("Reshape", [y, ctx.i64([1] * node.inputs[0].spec.rank)])
        return [y]
    return [ctx.one(op, [x], axis=dim, keepdims=int(keep))]


def _var(ctx, node, x: str, dt, dims, correction, keep):
    v = node.inputs[0]
    mean = reduce(ctx, "ReduceMean", x, dims, True)
    d = ctx.one("Sub", [x, mean])
    ss = reduce(ctx, "ReduceSum", ctx.one("Mul", [d, d]), dims, keep)
    shape = v.spec.shape
    axes = range(len(shape)) if dims is None else [a % len(shape) for a in dims]
    count = 1
    for a in axes:
        count = count * shape[a]
    if isinstance(count, int):
        denom = ctx.const(max(count - correction, 0), dt)
    else:
        denom = ctx.cast(ctx.scalar_i64(Sym(f"({count}) - {correction}")), I64, dt)
    return ctx.one("Div", [ss, denom]), (reduce(ctx, "ReduceMean", x, dims, keep) if not keep else mean)


@exports(Op.VAR_CORRECTION, Op.STD_CORRECTION, Op.VAR_MEAN_CORRECTION)
def var(ctx, node):
    dt = out_dtype(node)
    x = ctx.operand(node.inputs[0], dt)
    corr = node.attrs.get("correction")
    corr = 1 if corr is None else corr
    var_, mean = _var(ctx, node, x, dt, _dims(node), corr, bool(node.attrs.get("keepdim", False)))
    if node.op is Op.STD_CORRECTION:
        return [ctx.one("Sqrt", [var_])]
    if node.op is Op.VAR_MEAN_CORRECTION:
        return [var_, mean]
    return [var_]


@exports(Op.ANY_DIM, Op.ANY_DIMS, Op.ANY, Op.ALL_DIM, Op.ALL)
def any_all(ctx, node):
    x = ctx.operand(node.inputs[0], torch.int32)
    op = "ReduceMax" if node.op in (Op.ANY_DIM, Op.ANY_DIMS, Op.ANY) else "ReduceMin"
    x = ctx.one("Cast", [ctx.one("Cast", [x], to=onnx_elem_type(torch.bool))],
                to=onnx_elem_type(torch.int32))
    y = reduce(ctx, op, x, _dims(node), bool(node.attrs.get("keepdim", False)))
    return [ctx.cast(y, torch.int32, torch.bool)]


@exports(Op.LINALG_VECTOR_NORM, Op.NORM_SCALAROPT_DIM)
def vector_norm(ctx, node):
    dt = out_dtype(node)
    x = ctx.operand(node.inputs[0], dt)
    p = node.attrs.get("ord", node.attrs.get("p", 2))
    p = 2 if p is None else p
    dims, keep = _dims(node), bool(node.attrs.get("keepdim", False))
    if p == 2:
        return [reduce(ctx, "ReduceL2", x, dims, keep)]
    if p == 1:
        return [reduce(ctx, "ReduceL1", x, dims, keep)]
    if p == float("inf"):
        return [reduce(ctx, "ReduceMax", ctx.one("Abs", [x]), dims, keep)]
    s = reduce(ctx, "ReduceSum", ctx.one("Pow", [ctx.one("Abs", [x]), ctx.const(p, dt)]), dims, keep)
    return [ctx.one("Pow", [s, ctx.const(1.0 / p, dt)])]


@exports(Op.CUMSUM)
def cumsum(ctx, node):
    dt = out_dtype(node)
    return [ctx.one("CumSum", [ctx.operand(node.inputs[0], dt), ctx.const(node.attrs["dim"], I64)])]


@exports(Op.SOFTMAX, Op.LOG_SOFTMAX)
def softmax(ctx, node):
    dt = out_dtype(node)
    op = "Softmax" if node.op is Op.SOFTMAX else "LogSoftmax"
    return [ctx.one(op, [ctx.operand(node.inputs[0], dt)], axis=node.attrs["dim"])]


@exports(Op.TOPK)
def topk(ctx, node):
    k = node.attrs["k"]
    dim = node.attrs.get("dim", -1)
    vals, idx = ctx.add("TopK", [X(ctx, node), ctx.i64([k])], 2, axis=dim,
                        largest=int(node.attrs.get("largest", True)),
                        sorted=int(node.attrs.get("sorted", True)))
    return [vals, idx]


@exports(Op.SORT, Op.SORT_STABLE)
def sort(ctx, node):
    x = node.inputs[0]
    dim = node.attrs.get("dim", -1)
    n = x.spec.shape[dim]
    vals, idx = ctx.add("TopK", [X(ctx, node), ctx.i64([n])], 2, axis=dim,
                        largest=int(bool(node.attrs.get("descending", False))), sorted=1)
    return [vals, idx]
