"""IR -> ONNX for GEMM, convolution, attention, pooling, resampling, padding, normalization."""

from __future__ import annotations

import math

import torch
from onnx import TensorProto, helper

from deepseek.errors import UnsupportedOpError
from deepseek.frontend.onnx_export import exports
from deepseek.frontend.onnx_export_ops import I64, X, out_dtype, reduce
from deepseek.ir.graph import Value
from deepseek.ir.ops import Op


def _used(ctx, v: Value) -> bool:
    if not hasattr(ctx, "_used"):
        ctx._used = {id(x) for n in ctx.graph.nodes for x in n.input_values()} | \
            {id(x) for x in ctx.graph.outputs}
    return id(v) in ctx._used


@exports(Op.MM, Op.BMM, Op.MATMUL, Op.DOT, Op.MV)
def matmul(ctx, node):
    dt = out_dtype(node)
    return [ctx.one("MatMul", [ctx.operand(node.inputs[0], dt), ctx.operand(node.inputs[1], dt)])]


@exports(Op.ADDMM)
def addmm(ctx, node):
    dt = out_dtype(node)
    c, a, b = (ctx.operand(x, dt) for x in node.inputs)
    beta, alpha = node.attrs.get("beta", 1), node.attrs.get("alpha", 1)
    if dt.is_floating_point:
        return [ctx.one("Gemm", [a, b, c], alpha=float(alpha), beta=float(beta))]
    y = ctx.one("MatMul", [a, b])
    if alpha != 1:
        y = ctx.one("Mul", [y, ctx.const(alpha, dt)])
    if beta != 0:
        cc = c if beta == 1 else ctx.one("Mul", [c, ctx.const(beta, dt)])
        y = ctx.one("Add", [y, cc])
    return [y]


@exports(Op.BADDBMM)
def baddbmm(ctx, node):
    dt = out_dtype(node)
    c, a, b = (ctx.operand(x, dt) for x in node.inputs)
    beta, alpha = node.attrs.get("beta", 1), node.attrs.get("alpha", 1)
    y = ctx.one("MatMul", [a, b])
    if alpha != 1:
        y = ctx.one("Mul", [y, ctx.const(alpha, dt)])
    if beta != 0:
        y = ctx.one("Add", [y, c if beta == 1 else ctx.one("Mul", [c, ctx.const(beta, dt)])])
    return [y]


@exports(Op.LINEAR)
def linear(ctx, node):
    dt = out_dtype(node)
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if x.spec.rank == 2 and b is not None and dt.is_floating_point:
        return [ctx.one("Gemm", [ctx.operand(x, dt), ctx.operand(w, dt), ctx.operand(b, dt)], transB=1)]
    y = ctx.one("MatMul", [ctx.operand(x, dt), ctx.one("Transpose", [ctx.operand(w, dt)], perm=[1, 0])])
    if b is not None:
        y = ctx.one("Add", [y, ctx.operand(b, dt)])
    return [y]


@exports(Op.CONVOLUTION)
def convolution(ctx, node):
    w = node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    a = node.attrs
    r = w.spec.rank - 2
    stride, pad, dil = list(a["stride"]), list(a["padding"]), list(a["dilation"])
    if isinstance(pad, str) or any(isinstance(p, str) for p in pad):
        raise UnsupportedOpError("string padding")
    stride = stride * r if len(stride) == 1 else stride
    pad = pad * r if len(pad) == 1 else pad
    dil = dil * r if len(dil) == 1 else dil
    ins = [X(ctx, node, 0), X(ctx, node, 1)] + ([ctx.name(b)] if isinstance(b, Value) else [])
    kernel = [d for d in w.spec.shape[2:]]
    if not all(isinstance(k, int) for k in kernel):
        raise UnsupportedOpError("convolution with a symbolic kernel size")
    common = dict(strides=stride, pads=pad + pad, dilations=dil, group=int(a.get("groups", 1)),
                  kernel_shape=kernel)
    if a.get("transposed"):
        op_ = list(a.get("output_padding") or [0] * r)
        op_ = op_ * r if len(op_) == 1 else op_
        return [ctx.one("ConvTranspose", ins, output_padding=op_ if any(op_) else None, **common)]
    return [ctx.one("Conv", ins, **common)]


def _pool_attrs(node, r):
    a = node.attrs
    k = list(a["kernel_size"])
    k = k * r if len(k) == 1 else k
    s = list(a.get("stride") or k)
    s = s * r if len(s) == 1 else s
    p = a.get("padding", 0)
    p = [p] * r if isinstance(p, int) else list(p)
    p = p * r if len(p) == 1 else p
    return k, s, p


_MAX_POOL = [getattr(Op, n) for n in ("MAX_POOL2D_WITH_INDICES", "MAX_POOL3D_WITH_INDICES", "MAX_POOL2D",
                                       "MAX_POOL3D") if hasattr(Op, n)]


@exports(*_MAX_POOL)
def max_pool(ctx, node):
    x = node.inputs[0]
    r = 3 if "3d" in node.op.value else 2
    if x.spec.rank != r + 2:
        raise UnsupportedOpError(f"{x.spec.rank}-D input of a {r}-D max pool (no batch dim)")
    k, s, p = _pool_attrs(node, r)
    d = node.attrs.get("dilation", 1)
    d = [d] * r if isinstance(d, int) else list(d)
    d = d * r if len(d) == 1 else d
    attrs = dict(kernel_shape=k, strides=s, pads=p + p, dilations=d if any(v != 1 for v in d) else None,
                 ceil_mode=int(bool(node.attrs.get("ceil_mode", False))))
    if len(node.outputs) == 1:
        return [ctx.one("MaxPool", [X(ctx, node)], **attrs)]
    if not _used(ctx, node.outputs[1]):
        return [ctx.one("MaxPool", [X(ctx, node)], **attrs), None]
    vals, idx = ctx.add("MaxPool", [X(ctx, node)], 2, **attrs)
    plane = 1
    for v in x.spec.shape[2:]:
        plane = plane * v if isinstance(v, int) and isinstance(plane, int) else None
    if plane is None:
        raise UnsupportedOpError("max-pool indices on a symbolic spatial size")
    return [vals, ctx.one("Mod", [idx, ctx.const(plane, I64)], fmod=0)]


@exports(Op.AVG_POOL1D, Op.AVG_POOL2D, Op.AVG_POOL3D)
def avg_pool(ctx, node):
    r = {Op.AVG_POOL1D: 1, Op.AVG_POOL2D: 2, Op.AVG_POOL3D: 3}[node.op]
    if node.attrs.get("divisor_override") is not None:
        raise UnsupportedOpError("avg_pool with divisor_override")
    x = node.inputs[0]
    if x.spec.rank != r + 2:
        raise UnsupportedOpError(f"{x.spec.rank}-D input of a {r}-D average pool (no batch dim)")
    k, s, p = _pool_attrs(node, r)
    return [ctx.one("AveragePool", [X(ctx, node)], kernel_shape=k, strides=s, pads=p + p,
                    ceil_mode=int(bool(node.attrs.get("ceil_mode", False))),
                    count_include_pad=int(bool(node.attrs.get("count_include_pad", True))))]


@exports(Op.ADAPTIVE_AVG_POOL2D, Op.ADAPTIVE_AVG_POOL3D, Op.ADAPTIVE_MAX_POOL2D)
def adaptive_pool(ctx, node):
    x = node.inputs[0]
    out = list(node.attrs["output_size"])
    spatial = list(x.spec.shape[-len(out):])
    avg = node.op is not Op.ADAPTIVE_MAX_POOL2D
    if all(o == 1 for o in out):
        y = ctx.one("GlobalAveragePool" if avg else "GlobalMaxPool", [X(ctx, node)])
    elif all(isinstance(i, int) and i % o == 0 for i, o in zip(spatial, out)):
        k = [i // o for i, o in zip(spatial, out)]
        y = ctx.one("AveragePool" if avg else "MaxPool", [X(ctx, node)], kernel_shape=k, strides=k)
    else:
        raise UnsupportedOpError(f"adaptive pooling {spatial} -> {out} (sizes not multiples)")
    if not avg:
        if _used(ctx, node.outputs[1]):
            raise UnsupportedOpError("adaptive max-pool indices")
        return [y, None]
    return [y]


_UPSAMPLE = {
    Op.UPSAMPLE_NEAREST1D_VEC: ("nearest", 1), Op.UPSAMPLE_NEAREST2D_VEC: ("nearest", 2),
    Op.UPSAMPLE_NEAREST3D_VEC: ("nearest", 3), Op.UPSAMPLE_NEAREST_EXACT2D_VEC: ("nearest_exact", 2),
    Op.UPSAMPLE_BILINEAR2D_VEC: ("linear", 2), Op.UPSAMPLE_LINEAR1D_VEC: ("linear", 1),
    Op.UPSAMPLE_BICUBIC2D_VEC: ("cubic", 2),
}


@exports(*_UPSAMPLE)
def upsample(ctx, node):
    mode, r = _UPSAMPLE[node.op]
    x = node.inputs[0]
    size, factors = node.attrs.get("output_size"), node.attrs.get("scale_factors")
    align = bool(node.attrs.get("align_corners", False))
    attrs = {}
    if mode == "nearest":
        attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    elif mode == "nearest_exact":
        attrs = dict(mode="nearest", coordinate_transformation_mode="half_pixel",
                     nearest_mode="round_prefer_ceil")
    else:
        attrs = dict(mode=mode, coordinate_transformation_mode="align_corners" if align else "half_pixel")
        if mode == "cubic":
            attrs["cubic_coeff_a"] = -0.75
    if size:
        lead = list(x.spec.shape[:-r])
        return [ctx.one("Resize", [X(ctx, node), "", "", ctx.i64(lead + list(size))], **attrs)]
    if not factors:
        raise UnsupportedOpError("upsample without output_size or scale_factors")
    scales = ctx.const([1.0] * (x.spec.rank - r) + [float(f) for f in factors], torch.float32)
    return [ctx.one("Resize", [X(ctx, node), "", scales], **attrs)]


def _pads(pad: list, rank: int) -> list:
    """PyTorch's pad list (last dim first, begin/end) as ONNX pads [begins..., ends...]."""
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        d = rank - 1 - i
        begins[d], ends[d] = pad[2 * i], pad[2 * i + 1]
    return begins + ends


@exports(Op.CONSTANT_PAD_ND)
def constant_pad(ctx, node):
    x = node.inputs[0]
    dt = x.spec.dtype
    value = node.attrs.get("value", 0)
    return [ctx.one("Pad", [X(ctx, node), ctx.i64(_pads(list(node.attrs["pad"]), x.spec.rank)),
                            ctx.const(value, dt)], mode="constant")]


@exports(Op.REFLECTION_PAD1D, Op.REFLECTION_PAD2D, Op.REPLICATION_PAD1D, Op.REPLICATION_PAD2D)
def mode_pad(ctx, node):
    x = node.inputs[0]
    mode = "reflect" if node.op in (Op.REFLECTION_PAD1D, Op.REFLECTION_PAD2D) else "edge"
    return [ctx.one("Pad", [X(ctx, node), ctx.i64(_pads(list(node.attrs["padding"]), x.spec.rank))],
                    mode=mode)]


@exports(Op.GRID_SAMPLER_2D)
def grid_sample(ctx, node):
    if ctx.opset < 16:
        raise UnsupportedOpError("GridSample needs opset 16")
    modes = ["bilinear", "nearest", "bicubic"] if ctx.opset < 20 else ["linear", "nearest", "cubic"]
    a = node.attrs
    return [ctx.one("GridSample", [X(ctx, node, 0), X(ctx, node, 1)],
                    mode=modes[a["interpolation_mode"]],
                    padding_mode=["zeros", "border", "reflection"][a["padding_mode"]],
                    align_corners=int(bool(a["align_corners"])))]


@exports(Op.PIXEL_SHUFFLE)
def pixel_shuffle(ctx, node):
    if node.inputs[0].spec.rank != 4:
        raise UnsupportedOpError("pixel_shuffle of a non-4-D tensor")
    return [ctx.one("DepthToSpace", [X(ctx, node)], blocksize=int(node.attrs["upscale_factor"]),
                    mode="CRD")]


def _ones_like_shape(ctx, shape, dt, value=1.0):
    if not all(isinstance(d, int) for d in shape):
        raise UnsupportedOpError("a missing weight on a symbolic shape")
    return ctx.const(torch.full(list(shape), value, dtype=dt), dt)


@exports(Op.NATIVE_LAYER_NORM)
def layer_norm(ctx, node):
    return _layer_norm(ctx, node, X(ctx, node), node.inputs[1:3])


@exports(Op.ADD_LAYER_NORM)
def add_layer_norm(ctx, node):
    s = ctx.one("Add", [X(ctx, node, 0), X(ctx, node, 1)])
    return [s, _layer_norm(ctx, node, s, node.inputs[2:4])[0]]


@exports(Op.FUSED_RMS_NORM)
def fused_rms_norm(ctx, node):
    """As the reference: float32 statistics, the row cast back, then the weight."""
    x, w = node.inputs
    dt = x.spec.dtype
    h = ctx.cast(X(ctx, node), dt, torch.float32)
    ms = reduce(ctx, "ReduceMean", ctx.one("Mul", [h, h]), [x.spec.rank - 1], True)
    std = ctx.one("Sqrt", [ctx.one("Add", [ms, ctx.const(float(node.attrs["eps"]),
                                                         torch.float32)])])
    y = ctx.cast(ctx.one("Mul", [h, ctx.one("Reciprocal", [std])]), torch.float32, dt)
    return [ctx.one("Mul", [ctx.name(w), y]) if isinstance(w, Value) else y]


def _layer_norm(ctx, node, xn: str, params) -> list[str]:
    """LayerNormalization of ``xn`` over the node's normalized_shape: [y, mean, rstd]."""
    x = node.inputs[0]
    w, b = (list(params) + [None, None])[:2]
    dt = x.spec.dtype
    ns = list(node.attrs["normalized_shape"])
    eps = float(node.attrs["eps"])
    axes = list(range(x.spec.rank - len(ns), x.spec.rank))
    scale = ctx.name(w) if isinstance(w, Value) else _ones_like_shape(ctx, ns, dt)
    bias = ctx.name(b) if isinstance(b, Value) else None
    if ctx.opset >= 17:
        return ctx.add("LayerNormalization", [xn, scale] + ([bias] if bias else []), 3,
                       axis=-len(ns), epsilon=eps)
    mean = reduce(ctx, "ReduceMean", xn, axes, True)
    d = ctx.one("Sub", [xn, mean])
    var = reduce(ctx, "ReduceMean", ctx.one("Mul", [d, d]), axes, True)
    rstd = ctx.one("Reciprocal", [ctx.one("Sqrt", [ctx.one("Add", [var, ctx.const(eps, dt)])])])
    y = ctx.one("Mul", [ctx.one("Mul", [d, rstd]), scale])
    if bias:
        y = ctx.one("Add", [y, bias])
    return [y, mean, rstd]


@exports(Op.NATIVE_GROUP_NORM)
def group_norm(ctx, node):
    x, w, b = node.inputs[0], node.inputs[1], node.inputs[2]
    dt = x.spec.dtype
    a = node.attrs
    N, C, G, eps = a["N"], a["C"], a["group"], float(a["eps"])
    xn = ctx.one("Reshape", [X(ctx, node), ctx.i64([N, G, -1])])
    mean = reduce(ctx, "ReduceMean", xn, [2], True)
    d = ctx.one("Sub", [xn, mean])
    var = reduce(ctx, "ReduceMean", ctx.one("Mul", [d, d]), [2], True)
    rstd = ctx.one("Reciprocal", [ctx.one("Sqrt", [ctx.one("Add", [var, ctx.const(eps, dt)])])])
    y = ctx.one("Reshape", [ctx.one("Mul", [d, rstd]), ctx.i64(list(x.spec.shape))])
    cshape = [C] + [1] * (x.spec.rank - 2)
    if isinstance(w, Value):
        y = ctx.one("Mul", [y, ctx.one("Reshape", [ctx.name(w), ctx.i64(cshape)])])
    if isinstance(b, Value):
        y = ctx.one("Add", [y, ctx.one("Reshape", [ctx.name(b), ctx.i64(cshape)])])
    return [y, ctx.one("Reshape", [mean, ctx.i64([N, G])]), ctx.one("Reshape", [rstd, ctx.i64([N, G])])]


@exports(Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING)
def batch_norm(ctx, node):
    x, w, b, mean, var = node.inputs[:5]
    dt = x.spec.dtype
    C = x.spec.shape[1]
    scale = ctx.name(w) if isinstance(w, Value) else _ones_like_shape(ctx, [C], dt)
    bias = ctx.name(b) if isinstance(b, Value) else _ones_like_shape(ctx, [C], dt, 0.0)
    y = ctx.one("BatchNormalization", [X(ctx, node), scale, bias, ctx.name(mean), ctx.name(var)],
                epsilon=float(node.attrs["eps"]), momentum=1.0 - float(node.attrs.get("momentum", 0.1)))
    stats = []  # inference batch norm saves no statistics: empty tensors, as PyTorch gives
    for o in node.outputs[1:]:
        if not _used(ctx, o):
            stats.append(None)
        else:
            stats.append(ctx.const(torch.empty(0, dtype=o.spec.dtype), o.spec.dtype))
    return [y] + stats


@exports(Op.RMS_NORM)
def rms_norm(ctx, node):
    x = node.inputs[0]
    w = node.inputs[1] if len(node.inputs) > 1 else None
    dt = x.spec.dtype
    ns = list(node.attrs["normalized_shape"])
    eps = node.attrs.get("eps")
    eps = torch.finfo(dt).eps if eps is None else float(eps)
    axes = list(range(x.spec.rank - len(ns), x.spec.rank))
    xn = X(ctx, node)
    ms = reduce(ctx, "ReduceMean", ctx.one("Mul", [xn, xn]), axes, True)
    y = ctx.one("Mul", [xn, ctx.one("Reciprocal", [ctx.one("Sqrt", [ctx.one("Add", [ms, ctx.const(eps, dt)])])])])
    if isinstance(w, Value):
        y = ctx.one("Mul", [y, ctx.name(w)])
    return [y]


@exports(Op.SCALED_DOT_PRODUCT_ATTENTION, Op.SCALED_DOT_PRODUCT_FLASH_ATTENTION_FOR_CPU)
def sdpa(ctx, node):
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    a = node.attrs
    if a.get("dropout_p", 0.0):
        raise UnsupportedOpError("attention dropout (training) is not exported")
    if node.op is Op.SCALED_DOT_PRODUCT_FLASH_ATTENTION_FOR_CPU and _used(ctx, node.outputs[1]):
        raise UnsupportedOpError("the logsumexp output of flash attention")
    dt = q.spec.dtype
    E = q.spec.shape[-1]
    scale = a.get("scale")
    if scale is None:
        if not isinstance(E, int):
            raise UnsupportedOpError("attention with a symbolic head size and no scale")
        scale = 1.0 / math.sqrt(E)
    qn, kn, vn = ctx.name(q), ctx.name(k), ctx.name(v)
    r = q.spec.rank
    hq, hk = (q.spec.shape[-3], k.spec.shape[-3]) if r >= 3 else (1, 1)
    if a.get("enable_gqa") and hq != hk:
        if not (isinstance(hq, int) and isinstance(hk, int)):
            raise UnsupportedOpError("grouped-query attention with symbolic head counts")
        rep = hq // hk

        def repeat_heads(t, val):
            shape = list(val.spec.shape)
            u = ctx.one("Unsqueeze", [t, ctx.i64([r - 2])])
            e = ctx.one("Expand", [u, ctx.i64(shape[:-3] + [hk, rep] + shape[-2:])])
            return ctx.one("Reshape", [e, ctx.i64(shape[:-3] + [hq] + shape[-2:])])
        kn, vn = repeat_heads(kn, k), repeat_heads(vn, v)
    perm = list(range(r - 2)) + [r - 1, r - 2]
    scores = ctx.one("MatMul", [qn, ctx.one("Transpose", [kn], perm=perm)])
    scores = ctx.one("Mul", [scores, ctx.const(scale, dt)])
    L, S = q.spec.shape[-2], k.spec.shape[-2]
    if a.get("is_causal"):
        if isinstance(L, int) and isinstance(S, int):
            tri = ctx.const(torch.ones(L, S, dtype=torch.bool).tril(), torch.bool)
        else:
            ones = ctx.one("ConstantOfShape", [ctx.i64([L, S])],
                           value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))
            tri = ctx.cast(ctx.one("Trilu", [ones, ctx.const(0, I64)], upper=0), I64, torch.bool)
        scores = ctx.one("Where", [tri, scores, ctx.const(float("-inf"), dt)])
    if isinstance(mask, Value):
        if mask.spec.dtype == torch.bool:
            scores = ctx.one("Where", [ctx.name(mask), scores, ctx.const(float("-inf"), dt)])
        else:
            scores = ctx.one("Add", [scores, ctx.operand(mask, dt)])
    probs = ctx.one("Softmax", [scores], axis=-1)
    out = ctx.one("MatMul", [probs, vn])
    if node.op is Op.SCALED_DOT_PRODUCT_FLASH_ATTENTION_FOR_CPU:
        return [out, None]
    return [out]


# nodes the ONNX importer leaves as PyTorch fallbacks export back to their ONNX op
def _fallback(target: str):
    def deco(fn):
        from deepseek.frontend.onnx_export import EXPORTERS

        EXPORTERS[("fallback", target)] = fn  # type: ignore[index]
        return fn
    return deco


@_fallback("aten.einsum.default")
def einsum(ctx, node):
    dt = out_dtype(node)
    return [ctx.one("Einsum", [ctx.operand(x, dt) for x in node.inputs],
                    equation=node.attrs["equation"])]


@_fallback("aten.linalg_det.default")
def det(ctx, node):
    return [ctx.one("Det", [X(ctx, node)])]


@_fallback("aten.grid_sampler_3d.default")
def grid_sample_3d(ctx, node):
    if ctx.opset < 20:
        raise UnsupportedOpError("volumetric GridSample needs opset 20")
    a = node.attrs
    return [ctx.one("GridSample", [X(ctx, node, 0), X(ctx, node, 1)],
                    mode=["linear", "nearest", "cubic"][a["interpolation_mode"]],
                    padding_mode=["zeros", "border", "reflection"][a["padding_mode"]],
                    align_corners=int(bool(a["align_corners"])))]
