"""Element-wise ONNX ops: math, comparisons, logic, activations, Cast, Clip, Where."""

from __future__ import annotations

import torch

from deepseek.frontend.onnx_import import onnx_op
from deepseek.frontend.onnx_ops.common import FLOATS, cast, scalar
from deepseek.frontend.onnx_types import SUB_BYTE, torch_dtype
from deepseek.ir.ops import Op

_UNARY = {
    "Abs": Op.ABS, "Acos": Op.ACOS, "Acosh": Op.ACOSH, "Asin": Op.ASIN, "Asinh": Op.ASINH,
    "Atan": Op.ATAN, "Atanh": Op.ATANH, "Ceil": Op.CEIL, "Cos": Op.COS, "Cosh": Op.COSH,
    "Exp": Op.EXP, "Floor": Op.FLOOR, "Log": Op.LOG, "Neg": Op.NEG,
    "Reciprocal": Op.RECIPROCAL, "Relu": Op.RELU, "Round": Op.ROUND, "Sigmoid": Op.SIGMOID,
    "Sign": Op.SIGN, "Sin": Op.SIN, "Sinh": Op.SINH, "Sqrt": Op.SQRT, "Tan": Op.TAN,
    "Tanh": Op.TANH, "Not": Op.LOGICAL_NOT, "BitwiseNot": Op.BITWISE_NOT, "IsNaN": Op.ISNAN,
    "Mish": Op.MISH, "HardSwish": Op.HARDSWISH,
}


@onnx_op(*_UNARY)
def unary(n):
    x = n.x(0)
    if n.op_type == "Abs" and x.spec.dtype == torch.bool:
        return [x]
    return [n.emit(_UNARY[n.op_type], [x])]


@onnx_op("Identity")
def identity(n):
    return [n.x(0)]


@onnx_op("Softplus")
def softplus(n):
    x = n.x(0)
    # log(1 + exp(x)); PyTorch's threshold would return x itself above 20
    return [n.emit(Op.SOFTPLUS, [x], {"beta": 1, "threshold": 1e9})]


@onnx_op("Softsign")
def softsign(n):
    x = n.x(0)
    one = scalar(n, 1, x.spec.dtype)
    return [n.emit(Op.DIV_TENSOR, [x, n.emit(Op.ADD_TENSOR, [n.emit(Op.ABS, [x]), one])])]


@onnx_op("Gelu")
def gelu(n):
    return [n.emit(Op.GELU, [n.x(0)], {"approximate": n.attr("approximate", "none")})]


@onnx_op("Elu")
def elu(n):
    return [n.emit(Op.ELU, [n.x(0)], {"alpha": n.attr("alpha", 1.0)})]


@onnx_op("Selu")
def selu(n):
    return [n.emit(Op.ELU, [n.x(0)], {"alpha": n.attr("alpha", 1.67326319217681884765625),
                                     "scale": n.attr("gamma", 1.05070102214813232421875)})]


@onnx_op("Celu")
def celu(n):
    alpha = n.attr("alpha", 1.0)
    return [n.emit(Op.ELU, [n.x(0)], {"alpha": alpha, "input_scale": 1.0 / alpha})]


@onnx_op("LeakyRelu")
def leaky_relu(n):
    return [n.emit(Op.LEAKY_RELU, [n.x(0)], {"negative_slope": n.attr("alpha", 0.01)})]


@onnx_op("HardSigmoid")
def hard_sigmoid(n):
    x = n.x(0)
    alpha, beta = n.attr("alpha", 0.2), n.attr("beta", 0.5)
    y = n.emit(Op.ADD_TENSOR, [n.emit(Op.MUL_TENSOR, [x, scalar(n, alpha, x.spec.dtype)]),
                               scalar(n, beta, x.spec.dtype)])
    return [n.emit(Op.CLAMP, [y], {"min": 0.0, "max": 1.0})]


@onnx_op("ThresholdedRelu")
def thresholded_relu(n):
    x = n.x(0)
    mask = n.emit(Op.GT_TENSOR, [x, scalar(n, n.attr("alpha", 1.0), x.spec.dtype)])
    return [n.emit(Op.WHERE_SELF, [mask, x, scalar(n, 0, x.spec.dtype)])]


@onnx_op("Shrink")
def shrink(n):
    x = n.x(0)
    lambd, bias = n.attr("lambd", 0.5), n.attr("bias", 0.0)
    dt = x.spec.dtype
    lo = n.emit(Op.LT_TENSOR, [x, scalar(n, -lambd, dt)])
    hi = n.emit(Op.GT_TENSOR, [x, scalar(n, lambd, dt)])
    y = n.emit(Op.WHERE_SELF, [hi, n.emit(Op.SUB_TENSOR, [x, scalar(n, bias, dt)]), scalar(n, 0, dt)])
    return [n.emit(Op.WHERE_SELF, [lo, n.emit(Op.ADD_TENSOR, [x, scalar(n, bias, dt)]), y])]


@onnx_op("Swish")
def swish(n):
    x = n.x(0)
    alpha = n.attr("alpha", 1.0)
    if alpha == 1.0:
        return [n.emit(Op.SILU, [x])]
    s = n.emit(Op.SIGMOID, [n.emit(Op.MUL_TENSOR, [x, scalar(n, alpha, x.spec.dtype)])])
    return [n.emit(Op.MUL_TENSOR, [x, s])]


@onnx_op("PRelu")
def prelu(n):
    x, slope = n.x(0), n.x(1)
    neg = n.emit(Op.LT_TENSOR, [x, scalar(n, 0, x.spec.dtype)])
    return [n.emit(Op.WHERE_SELF, [neg, n.emit(Op.MUL_TENSOR, [x, slope]), x])]


@onnx_op("IsInf")
def isinf(n):
    x = n.x(0)
    pos, neg = n.attr("detect_positive", 1), n.attr("detect_negative", 1)
    inf = n.emit(Op.ISINF, [x])
    if pos and neg:
        return [inf]
    if not pos and not neg:
        return [n.emit(Op.LOGICAL_AND, [inf, n.emit(Op.LOGICAL_NOT, [inf])])]
    side = n.emit(Op.GT_TENSOR if pos else Op.LT_TENSOR, [x, scalar(n, 0, x.spec.dtype)])
    return [n.emit(Op.LOGICAL_AND, [inf, side])]


_BINARY = {
    "Add": Op.ADD_TENSOR, "Sub": Op.SUB_TENSOR, "Mul": Op.MUL_TENSOR,
    "Equal": Op.EQ_TENSOR, "Greater": Op.GT_TENSOR, "Less": Op.LT_TENSOR,
    "GreaterOrEqual": Op.GE_TENSOR, "LessOrEqual": Op.LE_TENSOR,
    "And": Op.LOGICAL_AND, "Or": Op.LOGICAL_OR, "Xor": Op.LOGICAL_XOR,
    "BitwiseAnd": Op.BITWISE_AND_TENSOR, "BitwiseOr": Op.BITWISE_OR_TENSOR,
    "BitwiseXor": Op.BITWISE_XOR_TENSOR,
}


@onnx_op(*_BINARY)
def binary(n):
    a, b = n.x(0), n.x(1)
    if n.op_type in ("Add", "Sub", "Mul") and a.spec.dtype == torch.bool:
        raise n.fail("arithmetic on bool tensors is not defined")
    return [n.emit(_BINARY[n.op_type], [a, b])]


@onnx_op("Div")
def div(n):
    a, b = n.x(0), n.x(1)
    if a.spec.dtype.is_floating_point:
        return [n.emit(Op.DIV_TENSOR, [a, b])]
    return [n.emit(Op.DIV_TENSOR_MODE, [a, b], {"rounding_mode": "trunc"})]


@onnx_op("Pow")
def pow_(n):
    a, b = n.x(0), n.x(1)
    if a.spec.dtype.is_floating_point and not b.spec.dtype.is_floating_point:
        b = cast(n, b, a.spec.dtype)
    elif not a.spec.dtype.is_floating_point and b.spec.dtype.is_floating_point:
        out = n.emit(Op.POW_TENSOR_TENSOR, [cast(n, a, torch.float64), cast(n, b, torch.float64)])
        return [cast(n, out, a.spec.dtype)]
    elif a.spec.dtype != b.spec.dtype:
        b = cast(n, b, a.spec.dtype)
    return [cast(n, n.emit(Op.POW_TENSOR_TENSOR, [a, b]), a.spec.dtype)]


@onnx_op("Mod")
def mod(n):
    a, b = n.x(0), n.x(1)
    fmod = n.attr("fmod", 0)
    return [n.emit(Op.FMOD_TENSOR if fmod else Op.REMAINDER_TENSOR, [a, b])]


@onnx_op("BitShift")
def bitshift(n):
    a, b = n.x(0), n.x(1)
    direction = n.attr("direction", "")
    if direction not in ("LEFT", "RIGHT"):
        raise n.bad(f"direction must be LEFT or RIGHT, got {direction!r}")
    op = Op.BITWISE_LEFT_SHIFT_TENSOR if direction == "LEFT" else Op.BITWISE_RIGHT_SHIFT_TENSOR
    return [n.emit(op, [a, b])]


@onnx_op("Max", "Min", "Sum", "Mean")
def variadic(n):
    xs = [n.x(i) for i in range(n.n_inputs) if n.has(i)]
    if not xs:
        raise n.bad("needs at least one input")
    op = {"Max": Op.MAXIMUM, "Min": Op.MINIMUM, "Sum": Op.ADD_TENSOR, "Mean": Op.ADD_TENSOR}[n.op_type]
    out = xs[0]
    for x in xs[1:]:
        out = n.emit(op, [out, x])
    if n.op_type == "Mean" and len(xs) > 1:
        out = n.emit(Op.DIV_TENSOR, [out, scalar(n, len(xs), out.spec.dtype)])
    return [out]


@onnx_op("Where")
def where(n):
    return [n.emit(Op.WHERE_SELF, [n.x(0), n.x(1), n.x(2)])]


@onnx_op("Clip")
def clip(n):
    x = n.x(0)
    dt = x.spec.dtype
    if n.opset < 11:
        lo, hi = n.attr("min"), n.attr("max")
        lo_v = hi_v = None
    else:
        lo = hi = None
        lo_v, hi_v = n.opt(1), n.opt(2)
        klo, khi = n.known(1), n.known(2)
        if lo_v is not None and isinstance(klo, torch.Tensor):
            lo, lo_v = klo.reshape(-1)[0].item(), None
        if hi_v is not None and isinstance(khi, torch.Tensor):
            hi, hi_v = khi.reshape(-1)[0].item(), None
    if lo_v is not None or hi_v is not None:
        if lo is not None:
            lo_v = scalar(n, lo, dt)
        if hi is not None:
            hi_v = scalar(n, hi, dt)
        return [n.emit(Op.CLAMP_TENSOR, [x, lo_v, hi_v])]
    if lo is None and hi is None:
        return [x]
    if not dt.is_floating_point:
        lo = int(lo) if lo is not None else None
        hi = int(hi) if hi is not None else None
    return [n.emit(Op.CLAMP, [x], {"min": lo, "max": hi})]


_F8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0, torch.float8_e4m3fnuz: 240.0,
           torch.float8_e5m2fnuz: 57344.0}


def convert(n, x, dtype: torch.dtype, saturate: bool = True):
    """ONNX Cast semantics onto ``_to_copy`` (float8 saturation and NaN rules included)."""
    src = x.spec.dtype
    if src == dtype:
        return x
    if dtype in _F8_MAX and src.is_floating_point:
        m = _F8_MAX[dtype]
        if saturate:
            # finite values beyond the range become the largest finite value
            y = n.emit(Op.CLAMP, [x], {"min": -m, "max": m})  # infinities too
            return cast(n, y, dtype)
        big = n.emit(Op.GT_TENSOR, [n.emit(Op.ABS, [x]), scalar(n, m, src)])
        if dtype != torch.float8_e5m2:  # no infinities: out of range is NaN
            y = n.emit(Op.WHERE_SELF, [big, scalar(n, float("nan"), src), x])
        else:
            inf = n.emit(Op.MUL_TENSOR, [n.emit(Op.SIGN, [x]), scalar(n, float("inf"), src)])
            y = n.emit(Op.WHERE_SELF, [big, inf, x])
        return cast(n, y, dtype)
    if src in _F8_MAX and dtype != torch.float32:
        x = cast(n, x, torch.float32)
    return cast(n, x, dtype)


# float4 e2m1: its magnitudes, and the rounding boundaries between them (ties to even mantissa)
_FP4_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
_FP4_BOUNDS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
_FP4_TIE_UP = {1, 3, 5}  # at these boundaries the tie goes to the larger magnitude


def to_sub_byte(n, x, elem_type: int):
    """ONNX Cast to a sub-byte type, as stored unpacked: integers truncate and wrap around
    (int4: -9 -> 7), float4 e2m1 rounds to nearest even and saturates at 6 (NaN -> -0)."""
    storage, lo_hi, _ = SUB_BYTE[elem_type]
    if lo_hi is not None:
        v = x
        if v.spec.dtype.is_floating_point:
            v = n.emit(Op.TRUNC, [v])
        v = cast(n, v, torch.int64)
        lo, hi = lo_hi
        span = hi - lo + 1
        v = n.emit(Op.ADD_TENSOR, [n.emit(Op.REMAINDER_TENSOR, [n.emit(Op.SUB_TENSOR, [v, scalar(n, lo, torch.int64)]),
                                                                  scalar(n, span, torch.int64)]),
                                   scalar(n, lo, torch.int64)])
        return n.mark(cast(n, v, storage), elem_type)
    f = cast(n, x, torch.float32)
    bounds = torch.tensor(_FP4_BOUNDS, dtype=torch.float32)
    for i in _FP4_TIE_UP:
        bounds[i] = torch.nextafter(bounds[i], torch.tensor(0.0))
    idx = n.emit(Op.BUCKETIZE_TENSOR, [n.emit(Op.ABS, [f]), n.const(bounds)], {"out_int32": False,
                                                                              "right": False})
    mag = n.emit(Op.INDEX_SELECT, [n.const(torch.tensor(_FP4_GRID)), reshape_flat(n, idx)], {"dim": 0})
    mag = n.emit(Op.RESHAPE, [mag], {"shape": n.shape(f)})
    one = scalar(n, 1.0, torch.float32)
    zero = scalar(n, 0.0, torch.float32)
    negative = n.emit(Op.LOGICAL_OR, [n.emit(Op.LT_TENSOR, [f, zero]),
                                      n.emit(Op.LT_TENSOR, [n.emit(Op.DIV_TENSOR, [one, f]), zero])])
    y = n.emit(Op.WHERE_SELF, [negative, n.emit(Op.NEG, [mag]), mag])  # 1/-0.0 < 0 keeps -0.0
    y = n.emit(Op.WHERE_SELF, [n.emit(Op.ISNAN, [f]), scalar(n, -0.0, torch.float32), y])
    return n.mark(y, elem_type)


def reshape_flat(n, v):
    numel = 1
    for d in n.shape(v):
        numel = numel * d
    return n.emit(Op.RESHAPE, [v], {"shape": [numel]})


@onnx_op("Cast")
def cast_op(n):
    to = n.attr("to")
    if to is None:
        raise n.bad("needs the 'to' attribute")
    to = int(to) if not isinstance(to, str) else _legacy_type(to)
    if to in SUB_BYTE:
        return [to_sub_byte(n, n.x(0), to)]
    return [convert(n, n.x(0), torch_dtype(to), bool(n.attr("saturate", 1)))]


def _legacy_type(name: str) -> int:
    from onnx import TensorProto

    return TensorProto.DataType.Value(name.upper())


@onnx_op("CastLike")
def cast_like(n):
    target = n.logical(1)
    if target is not None:
        return [to_sub_byte(n, n.x(0), target)]
    return [convert(n, n.x(0), n.x(1).spec.dtype, bool(n.attr("saturate", 1)))]


@onnx_op("Dropout")
def dropout(n):
    x = n.x(0)
    ratio = n.scalar(1, n.attr("ratio", 0.5)) if n.opset >= 12 else n.attr("ratio", 0.5)
    training = bool(n.scalar(2, False)) if n.opset >= 12 else False
    if n.opset < 7:
        training = not n.attr("is_test", 0)
    if training and ratio != 0:
        raise n.fail("Dropout in training mode (random) is not supported; export for inference")
    outs = [x]
    if n.n_outputs > 1:
        outs.append(n.emit(Op.FULL, [], {"size": n.shape(x), "fill_value": True, "dtype": torch.bool}))
    return outs


@onnx_op("Erf")
def erf(n):
    x = n.x(0)
    if x.spec.dtype not in FLOATS:
        return [cast(n, n.emit(Op.ERF, [cast(n, x, torch.float32)]), x.spec.dtype)]
    return [n.emit(Op.ERF, [x])]
