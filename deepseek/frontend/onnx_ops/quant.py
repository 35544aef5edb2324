"""Quantization: QuantizeLinear / DequantizeLinear (QDQ) and the integer ops.

QDQ pairs become the IR's quantize/dequantize ops
(``quantized_decomposed::quantize_per_tensor`` / ``..._per_channel`` and
their ``dequantize`` twins): the form compression leaves and lowering turns
into integer kernels, so a QDQ ONNX model from another tool imports the same
way. Cases those ops do not cover (run-time scales, blocked quantization,
float8, float64 inputs) become the equivalent arithmetic: ``round(x / scale)
+ zero_point`` clamped and cast; ``(q - zero_point) * scale``.

MatMulInteger, ConvInteger, QLinearMatMul and QLinearConv follow the ONNX
reference: integer products of zero-point-shifted operands (convolutions in
float64, exact for any realistic size), then requantization.
"""

from __future__ import annotations

import torch

from deepseek.frontend.onnx_import import onnx_op
from deepseek.frontend.onnx_ops.common import cast, channel_shape, reshape
from deepseek.frontend.onnx_ops.elementwise import convert, to_sub_byte
from deepseek.frontend.onnx_types import SUB_BYTE, torch_dtype
from deepseek.ir.ops import Op

_INT_Q = (torch.int8, torch.uint8, torch.int16, torch.int32)
_F8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _bounds(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return info.min, info.max


def _param(n, v, x_rank: int, axis: int, block: int, x_shape):
    """Scale or zero point shaped to broadcast against x (per-tensor, per-axis or blocked)."""
    shape = n.shape(v)
    if len(shape) == 0 or (len(shape) == 1 and shape[0] == 1 and block == 0):
        return v
    if block:
        dim = x_shape[axis]
        n.budget(dim, what="a block index")
        idx = n.const(torch.arange(dim, dtype=torch.int64) // block)
        return n.emit(Op.INDEX_SELECT, [v, idx], {"dim": axis})
    if len(shape) != 1:
        raise n.bad(f"scale/zero point of shape {shape} needs block_size")
    return reshape(n, v, channel_shape(x_rank, axis, shape[0]))


def _const_params(n, i_scale: int, i_zp: int):
    scale = n.known(i_scale)
    zp = n.known(i_zp) if n.has(i_zp) else None
    ok = isinstance(scale, torch.Tensor) and (zp is None or isinstance(zp, torch.Tensor))
    return (scale, zp) if ok else (None, None)


@onnx_op("QuantizeLinear")
def quantize_linear(n):
    x, s = n.x(0), n.x(1)
    zp = n.opt(2)
    out_attr = n.attr("output_dtype", 0)
    sub_byte = n.logical(2) or (out_attr if out_attr in SUB_BYTE else None)
    if sub_byte is not None:  # int4/uint4/int2/uint2 held in int8/uint8, float4 in float32
        dtype, bounds = SUB_BYTE[sub_byte][0], SUB_BYTE[sub_byte][1]
    else:
        dtype = zp.spec.dtype if zp is not None else (torch_dtype(out_attr) if out_attr else torch.uint8)
        bounds = _bounds(dtype) if dtype in _INT_Q else None
    rank, shape = n.rank(x), n.shape(x)
    axis = n.attr("axis", 1) % rank if rank else 0
    block = n.attr("block_size", 0)
    scale_c, zp_c = _const_params(n, 1, 2)
    if bounds is not None and dtype in _INT_Q and scale_c is not None and block == 0 and \
            x.spec.dtype != torch.float64:
        qmin, qmax = bounds
        zp_t = zp_c if zp_c is not None else torch.zeros_like(scale_c, dtype=torch.int64)
        if scale_c.numel() == 1:
            return [n.mark(n.emit(Op.QUANTIZE_PER_TENSOR, [x], {
                "scale": float(scale_c.reshape(-1)[0]), "zero_point": int(zp_t.reshape(-1)[0]),
                "quant_min": qmin, "quant_max": qmax, "dtype": dtype}), sub_byte)]
        return [n.mark(n.emit(Op.QUANTIZE_PER_CHANNEL, [
            x, n.const(scale_c.reshape(-1).to(torch.float32)),
            n.const(zp_t.reshape(-1).to(torch.int64))],
            {"axis": axis, "quant_min": qmin, "quant_max": qmax, "dtype": dtype}), sub_byte)]
    # the general arithmetic form
    work = torch.float32 if x.spec.dtype != torch.float64 else torch.float64
    xs = cast(n, x, work)
    s_b = cast(n, _param(n, s, rank, axis, block, shape), work)
    y = n.emit(Op.DIV_TENSOR, [xs, s_b])
    if dtype in _F8 or (sub_byte is not None and bounds is None):
        if zp is not None:
            y = n.emit(Op.ADD_TENSOR, [y, cast(n, _param(n, zp, rank, axis, block, shape), work)])
        if sub_byte is not None:
            return [to_sub_byte(n, y, sub_byte)]
        return [convert(n, y, dtype, bool(n.attr("saturate", 1)))]
    if dtype not in _INT_Q and dtype != getattr(torch, "uint16", None):
        raise n.fail(f"quantizing to {dtype} is not supported")
    y = n.emit(Op.ROUND, [y])
    if zp is not None:
        y = n.emit(Op.ADD_TENSOR, [y, cast(n, _param(n, zp, rank, axis, block, shape), work)])
    qmin, qmax = bounds or _bounds(dtype)
    return [n.mark(cast(n, n.emit(Op.CLAMP, [y], {"min": float(qmin), "max": float(qmax)}), dtype),
                   sub_byte)]


@onnx_op("DequantizeLinear")
def dequantize_linear(n):
    x, s = n.x(0), n.x(1)
    zp = n.opt(2)
    rank, shape = n.rank(x), n.shape(x)
    axis = n.attr("axis", 1) % rank if rank else 0
    block = n.attr("block_size", 0)
    out_attr = n.attr("output_dtype", 0)
    out_dtype = torch_dtype(out_attr) if out_attr else s.spec.dtype
    scale_c, zp_c = _const_params(n, 1, 2)
    src = x.spec.dtype
    if src in _INT_Q and scale_c is not None and block == 0:
        qmin, qmax = _bounds(src)
        zp_t = zp_c if zp_c is not None else torch.zeros_like(scale_c, dtype=torch.int64)
        if scale_c.numel() == 1:
            y = n.emit(Op.DEQUANTIZE_PER_TENSOR, [x], {
                "scale": float(scale_c.reshape(-1)[0]), "zero_point": int(zp_t.reshape(-1)[0]),
                "quant_min": qmin, "quant_max": qmax, "dtype": src, "out_dtype": torch.float32})
        else:
            y = n.emit(Op.DEQUANTIZE_PER_CHANNEL, [
                x, n.const(scale_c.reshape(-1).to(torch.float32)),
                n.const(zp_t.reshape(-1).to(torch.int64))],
                {"axis": axis, "quant_min": qmin, "quant_max": qmax, "dtype": src,
                 "out_dtype": torch.float32})
        return [cast(n, y, out_dtype)]
    work = torch.float32
    y = cast(n, cast(n, x, torch.int64) if src in (torch.uint16, torch.uint32) else x, work)
    if zp is not None:
        zp = cast(n, zp, torch.int64) if zp.spec.dtype in (torch.uint16, torch.uint32) else zp
        y = n.emit(Op.SUB_TENSOR, [y, cast(n, _param(n, zp, rank, axis, block, shape), work)])
    y = n.emit(Op.MUL_TENSOR, [y, cast(n, _param(n, s, rank, axis, block, shape), work)])
    return [cast(n, y, out_dtype)]


def _shifted(n, i: int, i_zp: int, dtype, zp_axis: int | None = None):
    """Input ``i`` minus its zero point, as ``dtype``."""
    v = cast(n, n.x(i), dtype)
    if n.has(i_zp):
        zp = cast(n, n.x(i_zp), dtype)
        zshape = n.shape(zp)
        if zp_axis is not None and len(zshape) == 1 and zshape[0] != 1:
            zp = reshape(n, zp, channel_shape(n.rank(v), zp_axis, zshape[0]))
        v = n.emit(Op.SUB_TENSOR, [v, zp])
    return v


@onnx_op("MatMulInteger")
def matmul_integer(n):
    a = _shifted(n, 0, 2, torch.int32, zp_axis=0 if n.rank(n.x(0)) == 2 else None)
    b = _shifted(n, 1, 3, torch.int32)
    return [n.emit(Op.MATMUL, [a, b])]


def _conv_attrs(n, x):
    from deepseek.frontend.onnx_ops.nn import _conv_params, _symmetric

    r, kernel, strides, dil, pairs, _ = _conv_params(n, x, n.shape(n.x(1 if n.op_type ==
                                                                         "ConvInteger" else 3)))
    x, pad = _symmetric(n, x, pairs)
    return x, {"stride": strides, "padding": pad, "dilation": dil, "transposed": False,
               "output_padding": [0] * r, "groups": n.attr("group", 1)}


@onnx_op("ConvInteger")
def conv_integer(n):
    x = _shifted(n, 0, 2, torch.float64)
    w = _shifted(n, 1, 3, torch.float64, zp_axis=0)
    x, attrs = _conv_attrs(n, x)
    return [cast(n, n.emit(Op.CONVOLUTION, [x, w, None], attrs), torch.int32)]


def _requantize(n, acc, scale, i_zp: int, out_dtype):
    """round(acc * scale) + zero point, saturated to ``out_dtype`` (the ONNX reference)."""
    y = n.emit(Op.MUL_TENSOR, [acc, scale])
    y = n.emit(Op.ROUND, [y])
    if n.has(i_zp):
        y = n.emit(Op.ADD_TENSOR, [y, cast(n, n.x(i_zp), y.spec.dtype)])
    lo, hi = _bounds(out_dtype)
    return cast(n, n.emit(Op.CLAMP, [y], {"min": float(lo), "max": float(hi)}), out_dtype)


@onnx_op("QLinearMatMul")
def qlinear_matmul(n):
    a = _shifted(n, 0, 2, torch.int32)
    b = _shifted(n, 3, 5, torch.int32)
    acc = cast(n, n.emit(Op.MATMUL, [a, b]), torch.float64)
    sa, sb, sy = (cast(n, n.x(i), torch.float64) for i in (1, 4, 6))
    scale = n.emit(Op.DIV_TENSOR, [n.emit(Op.MUL_TENSOR, [sa, sb]), sy])
    out = n.x(7).spec.dtype if n.has(7) else n.x(0).spec.dtype
    return [_requantize(n, acc, scale, 7, out)]


@onnx_op("QLinearConv")
def qlinear_conv(n):
    x = _shifted(n, 0, 2, torch.float64)
    w = _shifted(n, 3, 5, torch.float64, zp_axis=0)
    x, attrs = _conv_attrs(n, x)
    b = cast(n, n.x(8), torch.float64) if n.has(8) else None
    acc = n.emit(Op.CONVOLUTION, [x, w, b], attrs)
    sx, sw, sy = (cast(n, n.x(i), torch.float64) for i in (1, 4, 6))
    sw_shape = n.shape(sw)
    if len(sw_shape) == 1 and sw_shape[0] != 1:
        sw = reshape(n, sw, channel_shape(n.rank(acc), 1, sw_shape[0]))
    scale = n.emit(Op.DIV_TENSOR, [n.emit(Op.MUL_TENSOR, [sx, sw]), sy])
    out = n.x(7).spec.dtype if n.has(7) else n.x(0).spec.dtype
    return [_requantize(n, acc, scale, 7, out)]
