"""Neural-network ONNX ops: GEMM, convolution, pooling, normalization, softmax."""

from __future__ import annotations

import torch

from deepseek.frontend.onnx_import import onnx_op
from deepseek.frontend.onnx_ops.common import (FLOATS, auto_pads, cast, channel_shape, pads_pairs,
                                               prod, reshape, scalar, torch_pad)
from deepseek.ir.ops import Op


@onnx_op("MatMul")
def matmul(n):
    a, b = n.x(0), n.x(1)
    if n.rank(a) == 0 or n.rank(b) == 0:
        raise n.bad("MatMul inputs must have rank 1 or more")
    return [n.emit(Op.MATMUL, [a, b])]


def _t(n, v):
    return n.emit(Op.PERMUTE, [v], {"dims": [1, 0]})


@onnx_op("Gemm")
def gemm(n):
    a, b, c = n.x(0), n.x(1), n.opt(2)
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    if n.attr("transA", 0):
        a = _t(n, a)
    if n.attr("transB", 0):
        b = _t(n, b)
    if n.rank(a) != 2 or n.rank(b) != 2:
        raise n.bad("Gemm needs 2-D inputs")
    integer = not a.spec.dtype.is_floating_point
    if integer:
        alpha, beta = int(alpha), int(beta)
    if c is not None and beta != 0:
        return [n.emit(Op.ADDMM, [c, a, b], {"beta": beta, "alpha": alpha})]
    y = n.emit(Op.MM, [a, b])
    if alpha != 1:
        y = n.emit(Op.MUL_TENSOR, [y, scalar(n, alpha, y.spec.dtype)])
    return [y]


def _conv_params(n, x, w_shape, transposed=False):
    r = n.rank(x) - 2
    if r < 1:
        raise n.bad("needs an input of rank 3 or more (N, C, spatial...)")
    kernel = n.attr("kernel_shape") or list(w_shape[2:])
    strides = n.attr("strides") or [1] * r
    dil = n.attr("dilations") or [1] * r
    if not (len(kernel) == len(strides) == len(dil) == r):
        raise n.bad(f"kernel_shape/strides/dilations must have {r} entries")
    if any(s <= 0 for s in strides) or any(d <= 0 for d in dil):
        raise n.bad("strides and dilations must be positive")
    mode = n.attr("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER", "VALID") and not transposed:
        pairs = auto_pads(n, n.shape(x)[2:], kernel, strides, dil, mode)
    elif mode in ("NOTSET", "") or transposed:
        pairs = pads_pairs(n.attr("pads") or [], r)
    else:
        raise n.bad(f"unknown auto_pad {mode!r}")
    return r, list(kernel), list(strides), list(dil), pairs, mode


def _symmetric(n, x, pairs, value=0.0):
    """Pad the asymmetric part explicitly; return (x, per-dim symmetric padding)."""
    if all(b == e for b, e in pairs):
        return x, [b for b, _ in pairs]
    sym = [min(b, e) for b, e in pairs]
    extra = [(b - s, e - s) for (b, e), s in zip(pairs, sym)]
    x = n.emit(Op.CONSTANT_PAD_ND, [x], {"pad": torch_pad(extra), "value": value})
    return x, sym


@onnx_op("Conv")
def conv(n):
    x, w, b = n.x(0), n.x(1), n.opt(2)
    r, kernel, strides, dil, pairs, _ = _conv_params(n, x, n.shape(w))
    x, pad = _symmetric(n, x, pairs)
    attrs = {"stride": strides, "padding": pad, "dilation": dil, "transposed": False,
             "output_padding": [0] * r, "groups": n.attr("group", 1)}
    return [n.emit(Op.CONVOLUTION, [x, w, b], attrs)]


@onnx_op("ConvTranspose")
def conv_transpose(n):
    x, w, b = n.x(0), n.x(1), n.opt(2)
    r, kernel, strides, dil, pairs, mode = _conv_params(n, x, n.shape(w), transposed=True)
    groups = n.attr("group", 1)
    out_pad = n.attr("output_padding") or [0] * r
    in_sizes = n.shape(x)[2:]
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(in_sizes, strides, kernel, dil)]
    out_shape = n.attr("output_shape")
    if out_shape:
        out_shape = list(out_shape)[-r:]
        total = [f + op - o for f, op, o in zip(full, out_pad, out_shape)]
        pairs = [(t // 2, t - t // 2) if mode == "SAME_UPPER" else (t - t // 2, t // 2)
                 for t in total]
    elif mode in ("SAME_UPPER", "SAME_LOWER"):
        total = [f + op - i * s for f, op, i, s in zip(full, out_pad, in_sizes, strides)]
        pairs = [(t // 2, t - t // 2) if mode == "SAME_UPPER" else (t - t // 2, t // 2)
                 for t in total]
    elif mode == "VALID":
        pairs = [(0, 0)] * r
    simple = all(bp == ep >= 0 for bp, ep in pairs) and all(
        0 <= op < max(s, d) for op, s, d in zip(out_pad, strides, dil))
    if simple:
        attrs = {"stride": strides, "padding": [p for p, _ in pairs], "dilation": dil,
                 "transposed": True, "output_padding": list(out_pad), "groups": groups}
        return [n.emit(Op.CONVOLUTION, [x, w, b], attrs)]
    # general case: the full transposed convolution, then crop/extend each spatial dim
    attrs = {"stride": strides, "padding": [0] * r, "dilation": dil, "transposed": True,
             "output_padding": [0] * r, "groups": groups}
    y = n.emit(Op.CONVOLUTION, [x, w, None], attrs)
    crop = [(-bp, op - ep) for (bp, ep), op in zip(pairs, out_pad)]
    y = n.emit(Op.CONSTANT_PAD_ND, [y], {"pad": torch_pad(crop), "value": 0.0})
    if b is not None:
        y = n.emit(Op.ADD_TENSOR, [y, reshape(n, b, channel_shape(r + 1, 0, n.shape(b)[0]))])
    return [y]


def _pool_setup(n, x):
    r = n.rank(x) - 2
    kernel = n.attr("kernel_shape")
    if not kernel or len(kernel) != r:
        raise n.bad(f"kernel_shape must have {r} entries")
    strides = n.attr("strides") or [1] * r
    dil = n.attr("dilations") or [1] * r
    mode = n.attr("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        pairs = auto_pads(n, n.shape(x)[2:], kernel, strides, dil, mode)
    else:
        pairs = pads_pairs(n.attr("pads") or [], r)
    return r, list(kernel), list(strides), list(dil), pairs


def _ceil_out(size, k, s, d, b, e, ceil):
    eff = (k - 1) * d + 1
    num = size + b + e - eff
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + b:  # the last window may not start in the end padding
        out -= 1
    return out


@onnx_op("MaxPool")
def max_pool(n):
    x = n.x(0)
    r, kernel, strides, dil, pairs = _pool_setup(n, x)
    ceil = bool(n.attr("ceil_mode", 0))
    want_idx = n.n_outputs > 1 and n.node.output[1] != ""
    if r not in (1, 2, 3):
        raise n.fail(f"{r}-D max pooling is not supported")
    dt = x.spec.dtype
    if dt not in FLOATS:
        y = _max_pool_impl(n, cast(n, x, torch.float32), r, kernel, strides, dil, pairs, ceil, want_idx)
        return [cast(n, y[0], dt)] + y[1:]
    return _max_pool_impl(n, x, r, kernel, strides, dil, pairs, ceil, want_idx)


def _max_pool_impl(n, x, r, kernel, strides, dil, pairs, ceil, want_idx):
    torch_ok = all(b == e and b <= k // 2 for (b, e), k in zip(pairs, kernel))
    if not torch_ok:
        if want_idx:
            raise n.fail("MaxPool indices with asymmetric or large pads are not supported")
        sizes = n.shape(x)[2:]
        outs = [_ceil_out(sz, k, s, d, b, e, ceil)
                for sz, k, s, d, (b, e) in zip(sizes, kernel, strides, dil, pairs)]
        # pad with -inf, enough for every window, then pool without padding
        ext = [(b, max((o - 1) * s + (k - 1) * d + 1 - sz - b, 0))
               for o, s, k, d, sz, (b, _) in zip(outs, strides, kernel, dil, sizes, pairs)]
        x = n.emit(Op.CONSTANT_PAD_ND, [x], {"pad": torch_pad(ext), "value": float("-inf")})
        pad, ceil = [0] * r, False
    else:
        pad = [b for b, _ in pairs]
    y = x
    if r == 1:
        y = n.emit(Op.UNSQUEEZE, [x], {"dim": 2})
        kernel, strides, pad, dil = [1] + kernel, [1] + strides, [0] + pad, [1] + dil
    op = Op.MAX_POOL3D_WITH_INDICES if r == 3 else Op.MAX_POOL2D_WITH_INDICES
    vals, idx = n.emit(op, [y], {"kernel_size": kernel, "stride": strides, "padding": pad,
                                 "dilation": dil, "ceil_mode": ceil})
    if r == 1:
        vals = n.emit(Op.SQUEEZE_DIMS, [vals], {"dim": [2]})
        idx = n.emit(Op.SQUEEZE_DIMS, [idx], {"dim": [2]})
    if not want_idx:
        return [vals]
    shape = n.shape(x)
    N, C, spatial = shape[0], shape[1], shape[2:]
    plane = prod(spatial)
    if n.attr("storage_order", 0) == 1:  # column-major flat index within the plane
        if r != 2:
            raise n.fail("storage_order=1 is supported for 2-D pooling only")
        H, W = spatial
        h = n.emit(Op.DIV_TENSOR_MODE, [idx, scalar(n, W, torch.int64)], {"rounding_mode": "floor"})
        w = n.emit(Op.REMAINDER_TENSOR, [idx, scalar(n, W, torch.int64)])
        idx = n.emit(Op.ADD_TENSOR, [n.emit(Op.MUL_TENSOR, [w, scalar(n, H, torch.int64)]), h])
    offs = n.emit(Op.ARANGE_START_STEP, [], {"start": 0, "end": N * C, "step": 1, "dtype": torch.int64})
    offs = n.emit(Op.MUL_TENSOR, [reshape(n, offs, [N, C] + [1] * r), scalar(n, plane, torch.int64)])
    return [vals, n.emit(Op.ADD_TENSOR, [idx, offs])]


def _window_sum_conv(n, x, kernel, strides, dil, pairs, ceil):
    """Sum over each pooling window as a depthwise convolution with a ones kernel."""
    r = len(kernel)
    C = n.shape(x)[1]
    if not isinstance(C, int):
        raise n.fail("pooling with dilations or large pads needs a static channel count")
    sizes = n.shape(x)[2:]
    outs = [_ceil_out(sz, k, s, d, b, e, ceil)
            for sz, k, s, d, (b, e) in zip(sizes, kernel, strides, dil, pairs)]
    ext = [(b, max((o - 1) * s + (k - 1) * d + 1 - sz - b, 0))
           for o, s, k, d, sz, (b, _) in zip(outs, strides, kernel, dil, sizes, pairs)]
    n.budget(C, *kernel, what="a pooling kernel")
    n.budget(*sizes, what="a pooling mask")
    ones = n.const(torch.ones([C, 1] + kernel, dtype=x.spec.dtype))
    xp = n.emit(Op.CONSTANT_PAD_ND, [x], {"pad": torch_pad(ext), "value": 0.0})
    attrs = {"stride": strides, "padding": [0] * r, "dilation": dil, "transposed": False,
             "output_padding": [0] * r, "groups": C}
    return n.emit(Op.CONVOLUTION, [xp, ones, None], attrs), ext, outs


@onnx_op("AveragePool")
def avg_pool(n):
    x = n.x(0)
    r, kernel, strides, dil, pairs = _pool_setup(n, x)
    ceil = bool(n.attr("ceil_mode", 0))
    include = bool(n.attr("count_include_pad", 0))
    simple = all(b == e and b <= k // 2 for (b, e), k in zip(pairs, kernel)) and all(d == 1 for d in dil)
    if simple and r in (1, 2, 3) and not (ceil and include):
        op = {1: Op.AVG_POOL1D, 2: Op.AVG_POOL2D, 3: Op.AVG_POOL3D}[r]
        return [n.emit(op, [x], {"kernel_size": kernel, "stride": strides,
                                 "padding": [b for b, _ in pairs], "ceil_mode": ceil,
                                 "count_include_pad": include})]
    total, ext, outs = _window_sum_conv(n, x, kernel, strides, dil, pairs, ceil)
    # the divisor: window elements inside the input (or inside input+pads if count_include_pad)
    sizes = n.shape(x)[2:]
    mask = torch.ones([1, 1] + list(sizes), dtype=x.spec.dtype)
    if include:
        mask = torch.nn.functional.pad(mask, torch_pad(pairs), value=1.0)
        ext2 = [(0, e2 - e) for (b, e), (_, e2) in zip(pairs, ext)]
        mask = torch.nn.functional.pad(mask, torch_pad(ext2), value=0.0)
    else:
        mask = torch.nn.functional.pad(mask, torch_pad(ext), value=0.0)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
            3: torch.nn.functional.conv3d}.get(r)
    if conv is None:
        raise n.fail(f"{r}-D average pooling is not supported")
    count = conv(mask.double(), torch.ones([1, 1] + kernel, dtype=torch.float64), stride=strides,
                 dilation=dil).to(x.spec.dtype)
    return [n.emit(Op.DIV_TENSOR, [total, n.const(count)])]


@onnx_op("LpPool")
def lp_pool(n):
    x = n.x(0)
    r, kernel, strides, dil, pairs = _pool_setup(n, x)
    p = n.attr("p", 2)
    xp = n.emit(Op.POW_TENSOR_SCALAR, [n.emit(Op.ABS, [x])], {"exponent": float(p)})
    total, _, _ = _window_sum_conv(n, xp, kernel, strides, dil, pairs, bool(n.attr("ceil_mode", 0)))
    return [n.emit(Op.POW_TENSOR_SCALAR, [total], {"exponent": 1.0 / p})]


@onnx_op("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def global_pool(n):
    x = n.x(0)
    dims = list(range(2, n.rank(x)))
    if n.op_type == "GlobalAveragePool":
        return [n.emit(Op.MEAN_DIM, [x], {"dim": dims, "keepdim": True})]
    if n.op_type == "GlobalMaxPool":
        return [n.emit(Op.AMAX, [x], {"dim": dims, "keepdim": True})]
    p = float(n.attr("p", 2))
    return [n.emit(Op.LINALG_VECTOR_NORM, [x], {"ord": p, "dim": dims, "keepdim": True})]


@onnx_op("BatchNormalization")
def batch_norm(n):
    x, scale, bias, mean, var = (n.x(i) for i in range(5))
    if n.attr("training_mode", 0) and n.opset >= 14:
        return _batch_norm_training(n, x, scale, bias, mean, var)
    if n.attr("training_mode", 0) or (n.opset < 7 and not n.attr("is_test", 0)) or \
            (n.n_outputs > 1 and any(n.node.output[1:])):
        raise n.fail("BatchNormalization in training mode is supported from opset 14 only")
    y = n.emit(Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING, [x, scale, bias, mean, var],
               {"momentum": 0.1, "eps": n.attr("epsilon", 1e-5)})
    return [y[0]]


def _batch_norm_training(n, x, scale, bias, mean, var):
    """Normalize with the batch's statistics; running stats updated with ``momentum``."""
    r = n.rank(x)
    dims = [d for d in range(r) if d != 1]
    dt = x.spec.dtype
    momentum, eps = n.attr("momentum", 0.9), n.attr("epsilon", 1e-5)
    bmean = n.emit(Op.MEAN_DIM, [x], {"dim": dims, "keepdim": False})
    bvar = n.emit(Op.VAR_CORRECTION, [x], {"dim": dims, "correction": 0, "keepdim": False})
    y = n.emit(Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING, [x, scale, bias, bmean, bvar],
               {"momentum": 0.1, "eps": eps})[0]

    def running(old, new):
        return n.emit(Op.ADD_TENSOR, [n.emit(Op.MUL_TENSOR, [old, scalar(n, momentum, dt)]),
                                      n.emit(Op.MUL_TENSOR, [new, scalar(n, 1 - momentum, dt)])])
    return [y, running(mean, bmean), running(var, bvar)]


@onnx_op("InstanceNormalization")
def instance_norm(n):
    x, scale, bias = n.x(0), n.x(1), n.x(2)
    shape = n.shape(x)
    N, C = shape[0], shape[1]
    y = n.emit(Op.NATIVE_GROUP_NORM, [x, scale, bias], {"N": N, "C": C, "HxW": prod(shape[2:]),
                                                        "group": C, "eps": n.attr("epsilon", 1e-5)})
    return [y[0]]


@onnx_op("GroupNormalization")
def group_norm(n):
    x, scale, bias = n.x(0), n.x(1), n.x(2)
    shape = n.shape(x)
    N, C = shape[0], shape[1]
    G = n.attr("num_groups")
    if not isinstance(C, int) or G is None or C % G:
        raise n.bad(f"channels {C} must be a multiple of num_groups {G}")
    eps = n.attr("epsilon", 1e-5)
    if n.opset < 21:  # scale and bias per group: repeat them per channel
        n.budget(C, what="a channel index")
        idx = n.const(torch.arange(C, dtype=torch.int64) // (C // G))
        scale = n.emit(Op.INDEX_SELECT, [scale, idx], {"dim": 0})
        bias = n.emit(Op.INDEX_SELECT, [bias, idx], {"dim": 0})
    dt = x.spec.dtype
    stash = n.attr("stash_type", 1)
    xx = cast(n, x, torch.float32) if stash == 1 and dt in (torch.float16, torch.bfloat16) else x
    y = n.emit(Op.NATIVE_GROUP_NORM, [xx, cast(n, scale, xx.spec.dtype), cast(n, bias, xx.spec.dtype)],
               {"N": N, "C": C, "HxW": prod(shape[2:]), "group": G, "eps": eps})
    return [cast(n, y[0], dt)]


@onnx_op("LayerNormalization")
def layer_norm(n):
    x, scale, bias = n.x(0), n.x(1), n.opt(2)
    shape = n.shape(x)
    axis = n.axis(n.attr("axis", -1), len(shape))
    normalized = shape[axis:]
    dt = x.spec.dtype
    if n.shape(scale) != normalized:
        scale = n.emit(Op.EXPAND, [scale], {"size": normalized})
    if bias is not None and n.shape(bias) != normalized:
        bias = n.emit(Op.EXPAND, [bias], {"size": normalized})
    stash = n.attr("stash_type", 1)
    xx = cast(n, x, torch.float32) if stash == 1 and dt in (torch.float16, torch.bfloat16) else x
    scale = cast(n, scale, xx.spec.dtype)
    bias = cast(n, bias, xx.spec.dtype) if bias is not None else None
    y, mean, rstd = n.emit(Op.NATIVE_LAYER_NORM, [xx, scale, bias],
                           {"normalized_shape": normalized, "eps": n.attr("epsilon", 1e-5)})
    return [cast(n, y, dt), mean, rstd]


@onnx_op("RMSNormalization")
def rms_norm(n):
    x, scale = n.x(0), n.x(1)
    shape = n.shape(x)
    axis = n.axis(n.attr("axis", -1), len(shape))
    normalized = shape[axis:]
    dt = x.spec.dtype
    if n.shape(scale) != normalized:
        scale = n.emit(Op.EXPAND, [scale], {"size": normalized})
    stash = n.attr("stash_type", 1)
    xx = cast(n, x, torch.float32) if stash == 1 and dt in (torch.float16, torch.bfloat16) else x
    y = n.emit(Op.RMS_NORM, [xx, cast(n, scale, xx.spec.dtype)],
               {"normalized_shape": normalized, "eps": n.attr("epsilon", 1e-5)})
    return [cast(n, y, dt)]


@onnx_op("LpNormalization")
def lp_norm(n):
    x = n.x(0)
    axis = n.axis(n.attr("axis", -1), n.rank(x))
    p = n.attr("p", 2)
    norm = n.emit(Op.LINALG_VECTOR_NORM, [x], {"ord": float(p), "dim": [axis], "keepdim": True})
    zero = n.emit(Op.EQ_TENSOR, [norm, scalar(n, 0, x.spec.dtype)])
    safe = n.emit(Op.WHERE_SELF, [zero, scalar(n, 1, x.spec.dtype), norm])
    return [n.emit(Op.DIV_TENSOR, [x, safe])]


@onnx_op("MeanVarianceNormalization")
def mvn(n):
    x = n.x(0)
    axes = n.attr("axes") or [0, 2, 3]
    axes = sorted({n.axis(a, n.rank(x)) for a in axes})
    mean = n.emit(Op.MEAN_DIM, [x], {"dim": axes, "keepdim": True})
    d = n.emit(Op.SUB_TENSOR, [x, mean])
    var = n.emit(Op.MEAN_DIM, [n.emit(Op.MUL_TENSOR, [d, d])], {"dim": axes, "keepdim": True})
    std = n.emit(Op.SQRT, [var])
    return [n.emit(Op.DIV_TENSOR, [d, n.emit(Op.ADD_TENSOR, [std, scalar(n, 1e-9, x.spec.dtype)])])]


def _softmax_like(n, op: Op):
    x = n.x(0)
    shape = n.shape(x)
    rank = len(shape)
    if rank == 0:
        raise n.bad("needs an input of rank 1 or more")
    if n.opset >= 13:
        axis = n.axis(n.attr("axis", -1), rank)
        return [n.emit(op, [x], {"dim": axis, "half_to_float": False})]
    axis = n.axis(n.attr("axis", 1), rank)  # older opsets: coerce to 2-D at axis
    flat = reshape(n, x, [prod(shape[:axis]), prod(shape[axis:])])
    y = n.emit(op, [flat], {"dim": 1, "half_to_float": False})
    return [reshape(n, y, shape)]


@onnx_op("Softmax")
def softmax(n):
    return _softmax_like(n, Op.SOFTMAX)


@onnx_op("LogSoftmax")
def log_softmax(n):
    return _softmax_like(n, Op.LOG_SOFTMAX)


@onnx_op("Hardmax")
def hardmax(n):
    x = n.x(0)
    shape = n.shape(x)
    if n.opset >= 13:
        axis = n.axis(n.attr("axis", -1), len(shape))
        xx = x
    else:
        axis = 1
        xx = reshape(n, x, [prod(shape[:n.axis(n.attr("axis", 1), len(shape))]),
                            prod(shape[n.axis(n.attr("axis", 1), len(shape)):])])
    idx = n.emit(Op.ARGMAX, [xx], {"dim": axis, "keepdim": True})
    dim = n.shape(xx)[axis]
    n.budget(dim, what="a class index")
    classes = n.const(torch.arange(dim, dtype=torch.int64).reshape(
        [dim if i == axis else 1 for i in range(n.rank(xx))]))
    y = cast(n, n.emit(Op.EQ_TENSOR, [idx, classes]), x.spec.dtype)
    return [reshape(n, y, shape)]


@onnx_op("LRN")
def lrn(n):
    x = n.x(0)
    size = n.attr("size")
    alpha, beta, bias = n.attr("alpha", 1e-4), n.attr("beta", 0.75), n.attr("bias", 1.0)
    shape = n.shape(x)
    C = shape[1]
    sq = n.emit(Op.MUL_TENSOR, [x, x])
    flat = reshape(n, sq, [shape[0], 1, C, prod(shape[2:])])
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    padded = n.emit(Op.CONSTANT_PAD_ND, [flat], {"pad": [0, 0, lo, hi], "value": 0.0})
    n.budget(size, what="an LRN window")
    ones = n.const(torch.ones([1, 1, size, 1], dtype=x.spec.dtype))
    s = n.emit(Op.CONVOLUTION, [padded, ones, None], {"stride": [1, 1], "padding": [0, 0],
                                                       "dilation": [1, 1], "transposed": False,
                                                       "output_padding": [0, 0], "groups": 1})
    s = reshape(n, s, shape)
    dt = x.spec.dtype
    div = n.emit(Op.ADD_TENSOR, [n.emit(Op.MUL_TENSOR, [s, scalar(n, alpha / size, dt)]),
                                 scalar(n, bias, dt)])
    div = n.emit(Op.POW_TENSOR_SCALAR, [div], {"exponent": beta})
    return [n.emit(Op.DIV_TENSOR, [x, div])]


@onnx_op("Einsum")
def einsum(n):
    xs = [n.x(i) for i in range(n.n_inputs) if n.has(i)]
    eq = n.attr("equation", "").replace(" ", "")
    return n.imp.emit_fallback("aten.einsum.default", xs, {"equation": eq}, n.name, n.source)


@onnx_op("GridSample")
def grid_sample(n):
    x, grid = n.x(0), n.x(1)
    if n.rank(x) not in (4, 5):
        raise n.fail(f"GridSample of a rank-{n.rank(x)} input is not supported")
    mode = n.attr("mode", "linear" if n.opset >= 20 else "bilinear")
    modes = {"bilinear": 0, "linear": 0, "nearest": 1, "bicubic": 2, "cubic": 2}
    pads = {"zeros": 0, "border": 1, "reflection": 2}
    pm = n.attr("padding_mode", "zeros")
    if mode not in modes or pm not in pads:
        raise n.fail(f"mode {mode!r} / padding_mode {pm!r} is not supported")
    attrs = {"interpolation_mode": modes[mode], "padding_mode": pads[pm],
             "align_corners": bool(n.attr("align_corners", 0))}
    grid = cast(n, grid, x.spec.dtype)
    if n.rank(x) == 5:  # no IR op: PyTorch's 3-D kernel as a fallback node
        if modes[mode] == 2:
            raise n.fail("cubic 3-D GridSample is not supported")
        return n.imp.emit_fallback("aten.grid_sampler_3d.default", [x, grid], attrs, n.name, n.source)
    return [n.emit(Op.GRID_SAMPLER_2D, [x, grid], attrs)]
