"""Integer kernels that quantization lowering emits: PyTorch custom ops ``deepseek_quant::*``.

Each op is defined by its reference formula (``reference_*`` below, in float32),
which is also its fallback. The fast paths:

- CPU: oneDNN's int8 convolution and linear (``torch.ops.onednn.qconv2d_pointwise``
  and ``qlinear_pointwise``, the kernels of PyTorch's x86 quantization), with
  the int8 weight pre-packed once and cached on the weight tensor itself, so a
  graph holds plain int8 constants (safetensors) and still runs pre-packed. A
  convolution or linear runs instead as a oneDNN int8 primitive made once per input
  shape (``deepseek.backends.cpu.onednn.qconv2d`` / ``qlinear``: no primitive made per
  call) where that measures faster on its first input.
- dynamic int8 linear (``linear_int8_dynamic``: each row of the activation quantized with
  its own scale at run time): on the CPU one C pass quantizes the rows, oneDNN's int8
  linear multiplies, one C pass makes the float result; on CUDA ATen's steps around
  ``torch._int_mm``.
- CUDA: ``torch._int_mm`` (int8 x int8 -> int32) for linear; convolution and
  shapes ``_int_mm`` refuses take the reference path.

This module imports nothing from Deepseek when it is imported (the op registry,
``deepseek.ir.ops``, imports it so that these ops exist before the registry is
built); the CPU paths take the CPU backend's weight layouts and C quantize kernel at
call time.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

NAMESPACE = "deepseek_quant"
_LIB = torch.library.Library(NAMESPACE, "DEF")
_LIB.define(
    "linear_int8(Tensor x, float x_scale, int x_zero_point, Tensor weight, Tensor weight_scale, "
    "Tensor? weight_zero_point, Tensor? bias, str post_op, float output_scale, "
    "int output_zero_point, ScalarType? output_dtype) -> Tensor")
_LIB.define(
    "conv2d_int8(Tensor x, float x_scale, int x_zero_point, Tensor weight, Tensor weight_scale, "
    "Tensor? weight_zero_point, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
    "int groups, str post_op, float output_scale, int output_zero_point, "
    "ScalarType? output_dtype) -> Tensor")
_LIB.define(
    "linear_int8_dynamic(Tensor x, bool symmetric, Tensor weight, Tensor weight_scale, "
    "Tensor? weight_zero_point, Tensor? bias, str post_op) -> Tensor")
_LIB.define(
    "linear_weight_only(Tensor x, Tensor weight, Tensor weight_scale, Tensor? weight_zero_point, "
    "Tensor? bias, int bits, int group_size) -> Tensor")

POST_OPS = ("none", "relu", "gelu", "gelu_tanh")  # gelu: the erf form; linear kernels only
_GELU = {"gelu": "none", "gelu_tanh": "tanh"}  # post-op -> F.gelu's (and oneDNN's) approximate
_QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


# --- reference semantics ---------------------------------------------------------
def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      bits: int = 8, group_size: int = 0) -> torch.Tensor:
    """Float32 weight ``(q - zero_point) * scale``; scale is per tensor ([1] or []), per
    output channel ([N]) or per group ([N, K / group_size]). ``bits == 4`` means
    ``weight`` holds two 4-bit values a byte (see :func:`pack_int4`)."""
    q = unpack_int4(weight) if bits == 4 else weight
    n = q.shape[0]
    q2 = q.reshape(n, -1).float()
    s = scale.float()
    z = zero_point.float() if zero_point is not None else None
    if group_size:
        g = q2.reshape(n, -1, group_size)
        zz = z.reshape(n, -1, 1) if z is not None else 0.0
        w = ((g - zz) * s.reshape(n, -1, 1)).reshape(n, -1)
    else:
        s = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(())
        zz = (z.reshape(-1, 1) if z.numel() > 1 else z.reshape(())) if z is not None else 0.0
        w = (q2 - zz) * s
    return w.reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values ([-8, 7], in an int8 tensor [N, K], K even) a byte:
    column 2j in the low nibble of byte j, 2j+1 in the high one, each stored as q + 8."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The int8 [N, K] tensor that :func:`pack_int4` packed."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


def _finish(y: torch.Tensor, post_op: str, out_scale: float, out_zp: int,
            out_dtype, one_pass: bool = False) -> torch.Tensor:
    """``post_op``, then quantization to ``out_dtype`` (if integer). ``one_pass``: the
    quantization by the CPU backend's C kernel where it is built, bitwise the same (the
    CPU kernels; the reference functions keep ATen's steps)."""
    if post_op == "relu":
        y = torch.relu(y)
    elif post_op in _GELU:
        y = F.gelu(y, approximate=_GELU[post_op])
    if out_dtype is None or out_dtype == torch.float32:
        return y
    qmin, qmax = _QRANGE[out_dtype]
    if one_pass and y.device.type == "cpu":
        from deepseek.backends.cpu import rowwise  # at call time (see the module doc)

        if rowwise.library() is not None:
            return rowwise.quantize(y, 1.0 / out_scale, out_zp, qmin, qmax, out_dtype)
    return torch.clamp(torch.round(y * (1.0 / out_scale)) + out_zp, qmin, qmax).to(out_dtype)


def reference_linear_int8(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias,
                          post_op, output_scale, output_zero_point, output_dtype,
                          dequantize=dequantize_weight):
    """``finish(linear((x - x_zp) * x_scale, dequantize(weight), bias))``, where finish applies
    ``post_op`` and, for an integer ``output_dtype``, quantizes with the output scale/zero point."""
    xd = (x.float() - x_zero_point) * x_scale
    y = F.linear(xd, dequantize(weight, weight_scale, weight_zero_point), bias)
    return _finish(y, post_op, output_scale, output_zero_point, output_dtype)


def reference_linear_int8_dynamic(x, symmetric, weight, weight_scale, weight_zero_point, bias,
                                  post_op, dequantize=dequantize_weight):
    """``post_op(linear(dq(q(x)), dequantize(weight), bias))`` where each row of ``x`` (a
    token) is quantized to int8 with its own scale (and, not ``symmetric``, zero point),
    chosen from that row at run time: PyTorch's ``choose_qparams_per_token(_asymmetric)``,
    ``quantize_per_token`` and ``dequantize_per_token``."""
    q, scale, zero_point = quantize_per_row(x.float(), symmetric)
    xd = torch.ops.quantized_decomposed.dequantize_per_token(q, scale, zero_point, -128, 127,
                                                             torch.int8, torch.float32)
    y = F.linear(xd, dequantize(weight, weight_scale, weight_zero_point), bias)
    return _finish(y, post_op, 1.0, 0, None)


def quantize_per_row(x: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """(q, scale, zero point): each row (last dim) of float ``x`` quantized to int8 with
    parameters chosen from that row, by PyTorch's ``choose_qparams_per_token`` (symmetric)
    or ``choose_qparams_per_token_asymmetric`` and ``quantize_per_token``."""
    qd = torch.ops.quantized_decomposed
    choose = qd.choose_qparams_per_token if symmetric else qd.choose_qparams_per_token_asymmetric
    scale, zero_point = choose(x, torch.int8)
    return qd.quantize_per_token(x, scale, zero_point, -128, 127, torch.int8), scale, zero_point


def reference_conv2d_int8(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias,
                          stride, padding, dilation, groups, post_op, output_scale,
                          output_zero_point, output_dtype, dequantize=dequantize_weight):
    """As :func:`reference_linear_int8`, for a 2-D convolution."""
    xd = (x.float() - x_zero_point) * x_scale
    w = dequantize(weight, weight_scale, weight_zero_point)
    y = F.conv2d(xd, w, bias, stride, padding, dilation, groups)
    return _finish(y, post_op, output_scale, output_zero_point, output_dtype)


def reference_linear_weight_only(x, weight, weight_scale, weight_zero_point, bias, bits,
                                 group_size):
    """``linear(x, dequantize(weight), bias)`` in x's dtype."""
    w = dequantize_weight(weight, weight_scale, weight_zero_point, bits, group_size)
    return F.linear(x, w.to(x.dtype), bias if bias is None else bias.to(x.dtype))


# --- caches on the weight tensor ---------------------------------------------------
_CACHE: dict[int, tuple] = {}  # id(owner) -> (weakref to owner, owner._version, {key: value})


def _cached(owner: torch.Tensor, key: tuple, build):
    """``build()`` computed once per ``key`` and per version of ``owner`` (a weight).

    The codegen passes the same constant tensor object on every call, so the
    pre-packed weight is made on the first call only; an in-place change of the
    weight (a new ``_version``) invalidates it, and it is dropped with the
    weight. (Kept beside the tensor, not on it: an opaque oneDNN tensor in its
    ``__dict__`` would break ``copy.deepcopy`` and ``torch.save`` of the weight.)
    """
    i = id(owner)
    entry = _CACHE.get(i)
    if entry is None or entry[0]() is not owner or entry[1] != owner._version:
        ref = weakref.ref(owner, lambda _, i=i, cache=_CACHE: cache.pop(i, None))  # (bound now:
        # at interpreter exit the module globals may be gone when the callback runs)
        entry = _CACHE[i] = (ref, owner._version, {})
    hit = entry[2].get(key)
    if hit is None:
        hit = entry[2][key] = build()
    return hit


def _tensor_key(t: torch.Tensor | None) -> tuple:
    return (None,) if t is None else (id(t), t._version)


def _channel_params(weight, weight_scale, weight_zero_point) -> tuple:
    """(float32 scales [N], int64 zeros [N], has a non-zero weight zero point)."""
    n = weight.shape[0]

    def build():
        s = weight_scale.float().reshape(-1).expand(n).contiguous()
        nonzero = weight_zero_point is not None and bool(weight_zero_point.ne(0).any())
        return s, torch.zeros(n, dtype=torch.long), nonzero

    return _cached(weight, ("channel", *_tensor_key(weight_scale), *_tensor_key(weight_zero_point)),
                   build)


def _zero_point_term(weight, weight_scale, weight_zero_point) -> torch.Tensor:
    """``scale * zero_point`` per output channel: what a weight zero point subtracts."""
    n = weight.shape[0]
    return _cached(weight, ("zp_term", *_tensor_key(weight_scale), *_tensor_key(weight_zero_point)),
                   lambda: (weight_scale.float().reshape(-1).expand(n)
                            * weight_zero_point.float().reshape(-1).expand(n)).contiguous())


# oneDNN's uint8 x int8 kernels. With VNNI (AVX-512 VNNI, AVX-VNNI) they sum products in
# int32, exact for any int8 weight. Without it (AVX2, AVX-512 before Cascade Lake) they add
# pairs of products in int16 with saturation (vpmaddubsw): exact only while a pair fits,
# 255 * (|w1| + |w2|) <= 32767, i.e. for weights in [-64, 64] (7-bit weights,
# QuantConfig(weight_bits=7)). Other weights run the float32 formula on a weight
# de-quantized once (exact products; correct, but slower than a float32 model).
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise"))
_VNNI = _ONEDNN and torch.cpu._is_vnni_supported()
PAIR_SAFE = 64  # the largest |weight| whose pairs of products fit int16 without VNNI


def native_int8() -> bool:
    """Whether this CPU runs every int8 convolution and linear natively (oneDNN on VNNI
    dot products); without VNNI only weights within [-64, 64] do (``int8_native_for``)."""
    return _VNNI


def int8_native_for(weight: torch.Tensor) -> bool:
    """Whether oneDNN's int8 kernels compute exactly with this int8 weight here."""
    if not _ONEDNN or weight.dtype != torch.int8:
        return False
    return _VNNI or _cached(weight, ("pair_safe",), lambda: weight.numel() == 0 or bool(
        weight.min() >= -PAIR_SAFE and weight.max() <= PAIR_SAFE))


def _dequantized(weight, weight_scale, weight_zero_point, bits: int = 8, group_size: int = 0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight of an integer op, made once per weight and scales (the float
    formula's operand)."""
    return _cached(weight, ("dequant", bits, group_size, dtype, *_tensor_key(weight_scale),
                            *_tensor_key(weight_zero_point)),
                   lambda: dequantize_weight(weight, weight_scale, weight_zero_point, bits,
                                             group_size).to(dtype))


def _onednn_ok(x, weight, weight_scale) -> bool:
    return (x.dtype in (torch.uint8, torch.int8) and weight_scale.numel() in (1, weight.shape[0])
            and int8_native_for(weight))


# --- CPU -----------------------------------------------------------------------------
def _linear_int8_cpu(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias,
                     post_op, output_scale, output_zero_point, output_dtype):
    args = (x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias, post_op,
            output_scale, output_zero_point, output_dtype)
    if weight.dim() != 2 or not _ONEDNN:
        return reference_linear_int8(*args, _dequantized)
    if not _onednn_ok(x, weight, weight_scale):
        return _float_linear_cpu(*args)
    made = _made_linear_int8(*args)
    if made is not None:
        return made(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], weight.shape[0])
    return pytorch_linear_int8(*args)


def pytorch_linear_int8(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias,
                        post_op, output_scale, output_zero_point, output_dtype):
    """The linear through PyTorch's oneDNN int8 linear (its weight pre-packed once)."""
    if x.dtype == torch.int8:  # oneDNN's int8-activation GEMM is a slow reference path (~5000x
        x = torch.bitwise_xor(x.view(torch.uint8), 128)  # here): x + 128 as uint8, exactly
        x_zero_point = x_zero_point + 128
    scales, zeros, zp = _channel_params(weight, weight_scale, weight_zero_point)
    packed = _cached(weight, ("qlinear",), lambda: torch.ops.onednn.qlinear_prepack(weight, None))
    fuse = not zp  # a weight zero point is corrected for after the kernel, before post-ops
    quant_out = output_dtype is not None and output_dtype != torch.float32
    name, algorithm = ("gelu", _GELU[post_op]) if post_op in _GELU else (post_op, "")
    y = torch.ops.onednn.qlinear_pointwise(
        x.contiguous(), x_scale, x_zero_point, packed, scales, zeros,
        None if bias is None else bias.float(), output_scale if fuse and quant_out else 1.0,
        output_zero_point if fuse and quant_out else 0,
        output_dtype if fuse and quant_out else torch.float32, name if fuse else "none", [],
        algorithm if fuse else "")
    if fuse:
        return y
    rowsum = ((x.float() - x_zero_point) * x_scale).sum(-1, keepdim=True)
    y = y - rowsum * _zero_point_term(weight, weight_scale, weight_zero_point)
    return _finish(y, post_op, output_scale, output_zero_point, output_dtype, one_pass=True)


def _linear_int8_dynamic_cpu(x, symmetric, weight, weight_scale, weight_zero_point, bias,
                              post_op):
    """Rows quantized in one C pass (as uint8, zero point 128), the static int8 linear
    with the weight's scales on them (a made oneDNN primitive or PyTorch's), and one C pass
    to the float result (zero points, the rows' scales, bias, ReLU or GELU)."""
    from deepseek.backends.cpu import rowwise  # at call time (see the module doc)

    args = (x, symmetric, weight, weight_scale, weight_zero_point, bias, post_op)
    if not (x.dtype == torch.float32 and weight.dim() == 2 and weight.dtype == torch.int8
            and weight_scale.numel() in (1, weight.shape[0]) and int8_native_for(weight)
            and rowwise.library() is not None):
        return reference_linear_int8_dynamic(*args, _dequantized)
    k, n = weight.shape[1], weight.shape[0]
    rows = rowwise.quantize_rows(x.reshape(-1, k).contiguous(), symmetric)
    scales = _channel_params(weight, weight_scale, None)[0]  # the static call's, cached
    # sw[n] * sum_k q w: the static kernel (made primitive or PyTorch's) on uint8 rows
    acc = _linear_int8_cpu(rows[0], 1.0, 128, weight, weight_scale, None, None, "none", 1.0, 0,
                           None)
    colsum = _cached(weight, ("colsum",), lambda: weight.sum(1, dtype=torch.int32).float())
    zero_point = None if weight_zero_point is None else _cached(
        weight, ("zp_float", *_tensor_key(weight_zero_point)),
        lambda: weight_zero_point.float().reshape(-1).expand(n).contiguous())
    y = rowwise.dequantize_rows(acc, rows, scales, colsum, zero_point,
                                None if bias is None else bias.float().contiguous(), k, post_op)
    return y.reshape(*x.shape[:-1], n)


def _float_conv2d_cpu(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias,
                      stride, padding, dilation, groups, post_op, output_scale, output_zero_point,
                      output_dtype):
    """The float formula of an int8 convolution whose weight oneDNN's int8 kernels cannot
    take here (8-bit weights without VNNI): the input de-quantized in channels-last memory
    and oneDNN's float32 convolution on the weight de-quantized and packed once, ReLU as its
    post-op. ATen's conv2d on the plain weight re-laid it out on every call (ResNet-50's
    512-channel 3x3 layers: 4.2 ms each against 1.4)."""
    from deepseek.backends.cpu.codegen import _packed_conv_weight  # at call time

    xd = x.contiguous(memory_format=torch.channels_last).float().sub_(x_zero_point).mul_(x_scale)
    key = ("float_packed", *_tensor_key(weight_scale), *_tensor_key(weight_zero_point),
           tuple(stride), tuple(padding), tuple(dilation), groups, tuple(x.shape))
    geometry = {"padding": list(padding), "stride": list(stride), "dilation": list(dilation),
                "groups": groups}
    packed = _cached(weight, key, lambda: _packed_conv_weight(
        _dequantized(weight, weight_scale, weight_zero_point), geometry, x.shape))
    if packed is None:  # no oneDNN kernel for this geometry
        return reference_conv2d_int8(x, x_scale, x_zero_point, weight, weight_scale,
                                     weight_zero_point, bias, stride, padding, dilation, groups,
                                     post_op, output_scale, output_zero_point, output_dtype,
                                     _dequantized)
    y = torch.ops.mkldnn._convolution_pointwise(
        xd, packed, None if bias is None else bias.float(), list(padding), list(stride),
        list(dilation), groups, "relu" if post_op == "relu" else "none", [], "")
    return _finish(y, "none", output_scale, output_zero_point, output_dtype, one_pass=True)


def _float_linear_cpu(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias,
                      post_op, output_scale, output_zero_point, output_dtype):
    """As ``_float_conv2d_cpu``, for a linear: oneDNN's float32 linear on the weight
    de-quantized once and laid out for this row count, ReLU as its post-op."""
    from deepseek.backends.cpu.codegen import _onednn_linear_weight  # at call time

    rows, n = x.numel() // x.shape[-1], weight.shape[0]
    xd = x.reshape(rows, -1).float().sub_(x_zero_point).mul_(x_scale)
    packed = _cached(weight, ("float_linear", *_tensor_key(weight_scale),
                              *_tensor_key(weight_zero_point), rows),
                     lambda: _onednn_linear_weight(
                         _dequantized(weight, weight_scale, weight_zero_point), rows))
    relu = post_op == "relu"  # as the kernel's post-op; GELU after it
    y = torch.ops.mkldnn._linear_pointwise(xd, packed, None if bias is None else bias.float(),
                                           "relu" if relu else "none", [], "")
    return _finish(y.reshape(*x.shape[:-1], n), "none" if relu else post_op, output_scale,
                   output_zero_point, output_dtype, one_pass=True)


def _conv2d_int8_cpu(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias,
                     stride, padding, dilation, groups, post_op, output_scale, output_zero_point,
                     output_dtype):
    args = (x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias, stride,
            padding, dilation, groups, post_op, output_scale, output_zero_point, output_dtype)
    if weight.dim() != 4 or x.dim() != 4 or not _ONEDNN:
        return reference_conv2d_int8(*args, _dequantized)
    if not _onednn_ok(x, weight, weight_scale):
        return _float_conv2d_cpu(*args)
    made = _made_conv2d_int8(*args)
    if made is not None:
        return made(x.contiguous(memory_format=torch.channels_last))
    return pytorch_conv2d_int8(*args)


def _made_if_faster(weight: torch.Tensor, key: tuple, make, x_made: torch.Tensor, pytorch):
    """The oneDNN int8 primitive ``make()`` builds (made once per ``key`` and weight) where
    one can be made and it ran faster on ``x_made`` than ``pytorch()`` (PyTorch's int8 op,
    which makes its primitive every call) on the first input seen; else None."""
    def build():
        from deepseek.timing import time_interleaved  # at call time (see the module doc)

        kernel = make()
        if kernel is None:
            return False
        times = time_interleaved({"made": lambda: kernel(x_made), "pytorch": pytorch},
                                 iters=5, warmup=2)
        return kernel if times["made"] < times["pytorch"] else False

    return _cached(weight, key, build) or None


def _symmetric(weight_zero_point) -> bool:
    return weight_zero_point is None or not bool(weight_zero_point.ne(0).any())


def _made_conv2d_int8(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias,
                      stride, padding, dilation, groups, post_op, output_scale,
                      output_zero_point, output_dtype):
    """The convolution as a oneDNN int8 primitive made once for this input shape
    (``onednn.qconv2d``) where it measures faster than PyTorch's int8 op (for a 1x1 layer,
    its int8 linear); else None. Symmetric weights, one group."""
    from deepseek.backends.cpu import onednn  # at call time (see the module doc)

    if groups != 1 or not _symmetric(weight_zero_point):
        return None
    args = (x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias, stride,
            padding, dilation, groups, post_op, output_scale, output_zero_point, output_dtype)
    key = ("made_qconv", tuple(x.shape), x.dtype, x_scale, x_zero_point, tuple(stride),
           tuple(padding), tuple(dilation), post_op, output_scale, output_zero_point,
           output_dtype, *_tensor_key(weight_scale), *_tensor_key(bias))
    return _made_if_faster(
        weight, key, lambda: onednn.qconv2d(
            weight, weight_scale, bias, list(stride), list(padding), list(dilation),
            list(x.shape), x.dtype, x_scale, x_zero_point, post_op, output_dtype, output_scale,
            output_zero_point),
        x.contiguous(memory_format=torch.channels_last), lambda: pytorch_conv2d_int8(*args))


def _made_linear_int8(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias,
                      post_op, output_scale, output_zero_point, output_dtype):
    """The linear as a oneDNN int8 primitive made once for this row count
    (``onednn.qlinear``) where it measures faster than PyTorch's int8 linear; else None.
    Symmetric weights."""
    from deepseek.backends.cpu import onednn  # at call time (see the module doc)

    if not _symmetric(weight_zero_point):
        return None
    args = (x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias, post_op,
            output_scale, output_zero_point, output_dtype)
    rows = x.numel() // x.shape[-1]
    key = ("made_qlinear", rows, x.dtype, x_scale, x_zero_point, post_op, output_scale,
           output_zero_point, output_dtype, *_tensor_key(weight_scale), *_tensor_key(bias))
    return _made_if_faster(
        weight, key, lambda: onednn.qlinear(
            weight, weight_scale, bias, rows, x.dtype, x_scale, x_zero_point, post_op,
            output_dtype, output_scale, output_zero_point),
        x.reshape(rows, -1).contiguous(), lambda: pytorch_linear_int8(*args))


def pytorch_conv2d_int8(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point,
                         bias, stride, padding, dilation, groups, post_op, output_scale,
                         output_zero_point, output_dtype):
    """The convolution through PyTorch's oneDNN int8 ops."""
    if weight.shape[2:] == (1, 1) and list(padding) == [0, 0] and groups == 1:
        # a 1x1 convolution is a GEMM over the (strided) pixels of the channels-last input:
        # oneDNN's int8 linear runs it 3-50x faster than its convolution (whose kernel for
        # an input zero point of 0 took 5 ms on a 1x1 256->1024 at 14x14, against 0.09 ms)
        if list(stride) != [1, 1]:
            x = x[:, :, ::stride[0], ::stride[1]]
        n, c, h, w = x.shape
        rows = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, c)
        matrix = _cached(weight, ("matrix",), lambda: weight.reshape(weight.shape[0], -1))
        y = _linear_int8_cpu(rows, x_scale, x_zero_point, matrix, weight_scale,
                             weight_zero_point, bias, post_op, output_scale, output_zero_point,
                             output_dtype)
        return y.reshape(n, h, w, -1).permute(0, 3, 1, 2)  # channels-last memory
    if x.dtype == torch.int8:  # oneDNN convolutions read uint8: x + 128, exactly, as a bit flip
        x = torch.bitwise_xor(x.view(torch.uint8), 128)
        x_zero_point = x_zero_point + 128
    scales, zeros, zp = _channel_params(weight, weight_scale, weight_zero_point)
    packed = _cached(weight, ("qconv", x_scale, x_zero_point, tuple(stride), tuple(padding),
                              tuple(dilation), groups, *_tensor_key(weight_scale)),
                     lambda: torch.ops.onednn.qconv_prepack(weight, scales, x_scale, x_zero_point,
                                                            stride, padding, dilation, groups,
                                                            None))
    fuse = not zp
    quant_out = output_dtype is not None and output_dtype != torch.float32
    y = torch.ops.onednn.qconv2d_pointwise(
        x, x_scale, x_zero_point, packed, scales, zeros, None if bias is None else bias.float(),
        stride, padding, dilation, groups, output_scale if fuse and quant_out else 1.0,
        output_zero_point if fuse and quant_out else 0,
        output_dtype if fuse and quant_out else torch.float32, post_op if fuse else "none", [], "")
    if fuse:
        return y
    # the zero point term: per output position, the sum of the dequantized inputs it reads
    xd = (x.float() - x_zero_point) * x_scale
    ones = torch.ones(groups, weight.shape[1], *weight.shape[2:])
    window = F.conv2d(xd, ones, None, stride, padding, dilation, groups)  # (B, groups, Ho, Wo)
    window = window.repeat_interleave(weight.shape[0] // groups, dim=1)
    y = y - window * _zero_point_term(weight, weight_scale, weight_zero_point).view(1, -1, 1, 1)
    return _finish(y, post_op, output_scale, output_zero_point, output_dtype, one_pass=True)


def _linear_weight_only(x, weight, weight_scale, weight_zero_point, bias, bits, group_size):
    # Decoding's few rows: the C kernel that streams the int weight (deepseek.backends.cpu.
    # weightonly; compiled CPU plans call it directly). More rows: the weight de-quantized once
    # and cached, and a float GEMM (PyTorch's CPU weight-only GEMMs, _weight_int8pack_mm and
    # _weight_int4pack_mm_for_cpu, measured 5-100x slower than float32 here).
    if x.device.type == "cpu":
        from deepseek.backends.cpu import weightonly

        if weightonly.supports(x.numel() // max(x.shape[-1], 1), x.dtype, weight, weight_scale,
                               weight_zero_point, bits, group_size):
            stream = _cached(weight, ("stream", *_tensor_key(weight_scale),
                                      *_tensor_key(weight_zero_point), *_tensor_key(bias)),
                             lambda: weightonly.StreamingLinear(weight, weight_scale,
                                                                weight_zero_point, bias, bits,
                                                                group_size))
            return stream(x)
    return F.linear(x, _dequantized(weight, weight_scale, weight_zero_point, bits, group_size,
                                    x.dtype), bias if bias is None else bias.to(x.dtype))


# --- CUDA (hook: exercised on a GPU machine, never in CPU CI) ---------------------------
def _linear_int8_cuda(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias,
                      post_op, output_scale, output_zero_point, output_dtype):
    m = x.numel() // x.shape[-1]
    k, n = weight.shape[1], weight.shape[0]
    if not (m > 16 and k % 8 == 0 and n % 8 == 0 and weight.dtype == torch.int8
            and x.dtype in (torch.uint8, torch.int8) and weight_scale.numel() in (1, n)):
        return reference_linear_int8(x, x_scale, x_zero_point, weight, weight_scale,
                                     weight_zero_point, bias, post_op, output_scale,
                                     output_zero_point, output_dtype)
    x2 = x.reshape(m, k)
    zp = x_zero_point
    if x.dtype == torch.uint8:  # _int_mm takes int8: x - 128, with the zero point moved alike
        x2 = torch.bitwise_xor(x2, 128).view(torch.int8)
        zp = x_zero_point - 128
    wt = weight.t()  # (K, N), column-major: the layout cuBLASLt wants
    colsum = _cached(weight, ("colsum",), lambda: weight.sum(1, dtype=torch.int32).float())
    acc = torch._int_mm(x2, wt).float()  # (M, N) int32 -> float
    acc = acc - zp * colsum
    s = weight_scale.float().reshape(-1) * x_scale
    y = acc * s
    if weight_zero_point is not None:
        rowsum = ((x2.float() - zp)).sum(-1, keepdim=True)
        y = y - rowsum * x_scale * _zero_point_term(weight, weight_scale, weight_zero_point)
    if bias is not None:
        y = y + bias.float()
    y = y.reshape(*x.shape[:-1], n)
    return _finish(y, post_op, output_scale, output_zero_point, output_dtype)


def _linear_int8_dynamic_cuda(x, symmetric, weight, weight_scale, weight_zero_point, bias,
                               post_op):
    """The reference formula, its GEMM as ``torch._int_mm`` on the integer tensor cores."""
    m, k, n = x.numel() // x.shape[-1], x.shape[-1], weight.shape[0]
    if not (m > 16 and k % 8 == 0 and n % 8 == 0 and weight.dtype == torch.int8
            and weight_scale.numel() in (1, n)):
        return reference_linear_int8_dynamic(x, symmetric, weight, weight_scale,
                                             weight_zero_point, bias, post_op)
    q, scale, zero_point = quantize_per_row(x.float().reshape(m, k), symmetric)
    acc = torch._int_mm(q, weight.t()).float()
    colsum = _cached(weight, ("colsum",), lambda: weight.sum(1, dtype=torch.int32).float())
    acc = acc - zero_point.float() * colsum
    if weight_zero_point is not None:
        rowsum = (q.float() - zero_point.float()).sum(-1, keepdim=True)
        acc = acc - rowsum * weight_zero_point.float().reshape(-1)
    y = acc * (scale.float() * weight_scale.float().reshape(-1))
    if bias is not None:
        y = y + bias.float()
    return _finish(y.reshape(*x.shape[:-1], n), post_op, 1.0, 0, None)


def triton_conv2d_int8(weight, weight_scale, x_scale, bias, stride, padding, dilation):
    """The Triton int8 convolution of this weight (its packed operands), made once per
    weight and parameters: the op and the CUDA plans' fused calls share it."""
    from deepseek.backends.cuda.triton_int8 import Conv2dInt8  # Triton: on first use

    return _cached(weight, ("triton_conv", x_scale, tuple(stride), tuple(padding),
                            tuple(dilation), *_tensor_key(weight_scale), *_tensor_key(bias)),
                   lambda: Conv2dInt8(weight, weight_scale, x_scale, bias, stride, padding,
                                      dilation))


def _conv2d_int8_cuda(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias,
                      stride, padding, dilation, groups, post_op, output_scale, output_zero_point,
                      output_dtype):
    """One Triton implicit-GEMM kernel on the integer tensor cores, its epilogue inside
    (``deepseek.backends.cuda.triton_int8``); grouped convolutions and weights with
    a zero point run the reference formula."""
    from deepseek.backends.cuda.triton_int8 import Conv2dInt8  # Triton: on first use

    args = (x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias, stride,
            padding, dilation, groups, post_op, output_scale, output_zero_point, output_dtype)
    if x.dim() != 4 or not Conv2dInt8.supported(x.dtype, weight, weight_scale,
                                                weight_zero_point, groups):
        return reference_conv2d_int8(*args, _dequantized)
    conv = triton_conv2d_int8(weight, weight_scale, x_scale, bias, stride, padding, dilation)
    if output_dtype is None or output_dtype == torch.float32:
        return conv(x, x_zero_point, post_op, float_dtype=torch.float32)[0]
    return conv(x, x_zero_point, post_op, quant=(output_scale, output_zero_point,
                                                 output_dtype))[1]


# --- shapes (meta) ---------------------------------------------------------------------
def _linear_meta(x, x_scale, x_zero_point, weight, *rest):
    output_dtype = rest[-1]
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=output_dtype or torch.float32)


def _conv_meta(x, x_scale, x_zero_point, weight, weight_scale, weight_zero_point, bias, stride,
               padding, dilation, groups, post_op, output_scale, output_zero_point, output_dtype):
    out = F.conv2d(torch.empty(x.shape, device="meta"), torch.empty(weight.shape, device="meta"),
                   None, stride, padding, dilation, groups)
    return x.new_empty(out.shape, dtype=output_dtype or torch.float32)


def _dynamic_meta(x, symmetric, weight, *rest):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


def _weight_only_meta(x, weight, weight_scale, weight_zero_point, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_LIB.impl("linear_int8", _linear_int8_cpu, "CPU")
_LIB.impl("linear_int8", _linear_int8_cuda, "CUDA")
_LIB.impl("linear_int8", _linear_meta, "Meta")
_LIB.impl("conv2d_int8", _conv2d_int8_cpu, "CPU")
_LIB.impl("conv2d_int8", _conv2d_int8_cuda, "CUDA")
_LIB.impl("conv2d_int8", _conv_meta, "Meta")
_LIB.impl("linear_int8_dynamic", _linear_int8_dynamic_cpu, "CPU")
_LIB.impl("linear_int8_dynamic", _linear_int8_dynamic_cuda, "CUDA")
_LIB.impl("linear_int8_dynamic", _dynamic_meta, "Meta")
_LIB.impl("linear_weight_only", _linear_weight_only, "CPU")
_LIB.impl("linear_weight_only", _linear_weight_only, "CUDA")
_LIB.impl("linear_weight_only", _weight_only_meta, "Meta")

OPS = ("linear_int8", "conv2d_int8", "linear_int8_dynamic", "linear_weight_only")
