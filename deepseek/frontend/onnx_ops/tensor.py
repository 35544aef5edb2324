"""Layout and data-movement ONNX ops: reshapes, slicing, gather/scatter, padding, creation."""

from __future__ import annotations

import numpy as np
import torch

from deepseek.frontend.onnx_import import SymArray, onnx_op
from deepseek.frontend.onnx_ops.common import cast, prod, reshape, scalar, torch_pad, unsqueeze_axes
from deepseek.frontend.onnx_types import torch_dtype
from deepseek.ir.ops import Op


def _opt_ints(n, i: int, attr: str, since: int):
    """An int-list parameter that moved from an attribute to input ``i`` at opset ``since``."""
    if n.opset >= since:
        return n.ints(i, attr) if n.has(i) else None
    return n.attr(attr)


@onnx_op("Constant")
def constant(n):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        v = n.attr(key)
        if v is None:
            continue
        if key == "value":
            return [n.const(v)]
        dtype = torch.float32 if "float" in key else torch.int64
        return [n.const(torch.tensor(v, dtype=dtype))]
    raise n.fail("only numeric Constant values are supported (not strings or sparse tensors)")


@onnx_op("Reshape")
def reshape_op(n):
    x = n.x(0)
    shape = n.ints(1, "shape") if n.opset >= 5 else n.attr("shape")
    in_shape = n.shape(x)
    allowzero = n.attr("allowzero", 0)
    out = []
    for i, s in enumerate(shape):
        if s == 0 and not allowzero:
            if i >= len(in_shape):
                raise n.bad(f"shape {shape} copies dim {i}, but the input has rank {len(in_shape)}")
            out.append(in_shape[i])
        else:
            out.append(s)
    return [n.emit(Op.RESHAPE, [x], {"shape": out})]


@onnx_op("Flatten")
def flatten(n):
    x = n.x(0)
    shape = n.shape(x)
    axis = n.attr("axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    if not 0 <= axis <= len(shape):
        raise n.bad(f"axis {axis} is out of range for rank {len(shape)}")
    return [reshape(n, x, [prod(shape[:axis]), prod(shape[axis:])])]


@onnx_op("Squeeze")
def squeeze(n):
    x = n.x(0)
    axes = _opt_ints(n, 1, "axes", 13)
    shape = n.shape(x)
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    axes = sorted({n.axis(a, len(shape)) for a in axes})
    if not axes:
        return [x]
    return [n.emit(Op.SQUEEZE_DIMS, [x], {"dim": axes})]


@onnx_op("Unsqueeze")
def unsqueeze(n):
    x = n.x(0)
    axes = _opt_ints(n, 1, "axes", 13)
    if not axes:
        raise n.bad("needs axes")
    return [unsqueeze_axes(n, x, axes)]


@onnx_op("Transpose")
def transpose(n):
    x = n.x(0)
    perm = n.attr("perm") or list(range(n.rank(x)))[::-1]
    if sorted(perm) != list(range(n.rank(x))):
        raise n.bad(f"perm {perm} is not a permutation of the input's {n.rank(x)} dims")
    if perm == list(range(n.rank(x))):
        return [x]
    return [n.emit(Op.PERMUTE, [x], {"dims": list(perm)})]


@onnx_op("Concat")
def concat(n):
    xs = [n.x(i) for i in range(n.n_inputs) if n.has(i)]
    rank = n.rank(xs[0])
    axis = n.axis(n.attr("axis", 0), rank)
    if len(xs) == 1:
        return [xs[0]]
    return [n.emit(Op.CAT, xs, {"dim": axis})]


@onnx_op("Split")
def split(n):
    x = n.x(0)
    shape = n.shape(x)
    axis = n.axis(n.attr("axis", 0), len(shape))
    sizes = n.ints(1, "split") if n.opset >= 13 and n.has(1) else n.attr("split")
    if not sizes:
        parts = n.attr("num_outputs") or n.n_outputs
        if not 1 <= parts <= max(n.n_outputs, 1):
            raise n.bad(f"num_outputs {parts} does not match the node's {n.n_outputs} outputs")
        dim = shape[axis]
        if not isinstance(dim, int):
            raise n.fail("splitting a symbolic dim into equal parts is not supported")
        if n.attr("num_outputs") is None:
            if dim % parts:
                raise n.bad(f"dim {dim} does not split into {parts} equal parts")
            sizes = [dim // parts] * parts
        else:
            chunk = -(-dim // parts)
            sizes = [min(chunk, dim - i * chunk) for i in range(parts)]
    outs = n.emit(Op.SPLIT_WITH_SIZES, [x], {"split_sizes": list(sizes), "dim": axis})
    return list(outs)


def _slice_indices(start: int, end: int, step: int, dim: int) -> list[int]:
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, -1), dim - 1), min(max(end, -1), dim - 1)
    return list(range(start, end, step))


@onnx_op("Slice")
def slice_op(n):
    x = n.x(0)
    if n.opset < 10:
        starts, ends, axes, steps = n.attr("starts"), n.attr("ends"), n.attr("axes"), None
    else:
        starts, ends = n.ints(1, "starts"), n.ints(2, "ends")
        axes = n.ints(3, "axes") if n.has(3) else None
        steps = n.ints(4, "steps") if n.has(4) else None
    shape = n.shape(x)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise n.bad("starts, ends, axes and steps must have the same length")
    big = 1 << 62
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = n.axis(a, len(shape))
        dim = shape[a]
        if st == 0:
            raise n.bad("a slice step of 0 is not allowed")
        if st > 0:
            s = min(max(s, -big), big) if isinstance(s, int) else s
            e = min(max(e, -big), big) if isinstance(e, int) else e
            if s == 0 and isinstance(e, int) and isinstance(dim, int) and e >= dim and st == 1:
                continue
            x = n.emit(Op.SLICE_TENSOR, [x], {"dim": a, "start": s, "end": e, "step": st})
        else:
            if not all(isinstance(v, int) for v in (s, e, dim)):
                raise n.fail("a negative slice step over a symbolic dim is not supported")
            n.budget(dim, what="a slice index")
            idx = _slice_indices(s, e, st, dim)
            x = n.emit(Op.INDEX_SELECT, [x, n.const(torch.tensor(idx, dtype=torch.int64))], {"dim": a})
    return [x]


def _fix_negative(n, idx, dim):
    """Indices with negatives wrapped (constant indices are fixed at import)."""
    idx = cast(n, idx, torch.int64)
    if n.imp.graph.is_constant(idx):
        t = n.imp.graph.constants[idx.name]
        if isinstance(dim, int) and bool((t < 0).any()):
            return n.const(torch.where(t < 0, t + dim, t))
        return idx
    dim_v = scalar(n, dim, torch.int64) if isinstance(dim, int) else \
        n.emit(Op.FULL, [], {"size": [], "fill_value": dim, "dtype": torch.int64})
    neg = n.emit(Op.LT_TENSOR, [idx, scalar(n, 0, torch.int64)])
    return n.emit(Op.WHERE_SELF, [neg, n.emit(Op.ADD_TENSOR, [idx, dim_v]), idx])


@onnx_op("Gather")
def gather(n):
    x, idx = n.x(0), n.x(1)
    shape = n.shape(x)
    axis = n.axis(n.attr("axis", 0), len(shape))
    idx = _fix_negative(n, idx, shape[axis])
    ishape = n.shape(idx)
    if not ishape and n.imp.graph.is_constant(idx):
        i = int(n.imp.graph.constants[idx.name].item())
        return [n.emit(Op.SELECT_INT, [x], {"dim": axis, "index": i})]
    flat = reshape(n, idx, [prod(ishape)]) if len(ishape) != 1 else idx
    out = n.emit(Op.INDEX_SELECT, [x, flat], {"dim": axis})
    return [reshape(n, out, shape[:axis] + ishape + shape[axis + 1:])]


@onnx_op("GatherElements")
def gather_elements(n):
    x, idx = n.x(0), n.x(1)
    shape = n.shape(x)
    axis = n.axis(n.attr("axis", 0), len(shape))
    idx = _fix_negative(n, idx, shape[axis])
    return [n.emit(Op.GATHER, [x, idx], {"dim": axis})]


def _nd_index_list(n, data_shape, idx, batch_dims: int):
    """index.Tensor's index list for GatherND/ScatterND-style indices [..., k]."""
    ishape = n.shape(idx)
    k = ishape[-1]
    if not isinstance(k, int):
        raise n.fail("the last dim of the indices must be static")
    idx = cast(n, idx, torch.int64)
    lead = ishape[:-1]
    indices = []
    for b in range(batch_dims):
        ar = n.emit(Op.ARANGE_START_STEP, [], {"start": 0, "end": data_shape[b], "step": 1,
                                               "dtype": torch.int64})
        shape = [1] * len(lead)
        shape[b] = data_shape[b]
        indices.append(reshape(n, ar, shape))
    for j in range(k):
        indices.append(n.emit(Op.SELECT_INT, [idx], {"dim": len(ishape) - 1, "index": j}))
    return indices


@onnx_op("GatherND")
def gather_nd(n):
    x, idx = n.x(0), n.x(1)
    b = n.attr("batch_dims", 0)
    indices = _nd_index_list(n, n.shape(x), idx, b)
    if not indices:
        raise n.fail("GatherND with an empty index dim is not supported")
    return [n.emit(Op.INDEX_TENSOR, [x, *indices])]


_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@onnx_op("ScatterElements", "Scatter")
def scatter_elements(n):
    x, idx, upd = n.x(0), n.x(1), n.x(2)
    shape = n.shape(x)
    axis = n.axis(n.attr("axis", 0), len(shape))
    idx = _fix_negative(n, idx, shape[axis])
    red = n.attr("reduction", "none")
    if red == "none":
        return [n.emit(Op.SCATTER_SRC, [x, idx, upd], {"dim": axis})]
    if red not in _REDUCE:
        raise n.fail(f"reduction {red!r} is not supported")
    return [n.emit(Op.SCATTER_REDUCE_TWO, [x, idx, upd], {"dim": axis, "reduce": _REDUCE[red],
                                                           "include_self": True})]


@onnx_op("ScatterND")
def scatter_nd(n):
    x, idx, upd = n.x(0), n.x(1), n.x(2)
    red = n.attr("reduction", "none")
    indices = _nd_index_list(n, n.shape(x), idx, 0)
    if red in ("none", "add"):
        return [n.emit(Op.INDEX_PUT, [x, *indices, upd], {"accumulate": red == "add"})]
    if red not in _REDUCE:
        raise n.fail(f"reduction {red!r} is not supported")
    # the other reductions: scatter_reduce over the flattened leading k dims
    shape = n.shape(x)
    k = len(indices)
    strides = [prod(shape[i + 1:k]) for i in range(k)]
    lin = None
    for i, s in zip(indices, strides):
        term = n.emit(Op.MUL_TENSOR, [i, scalar(n, s, torch.int64)])
        lin = term if lin is None else n.emit(Op.ADD_TENSOR, [lin, term])
    rest = shape[k:]
    flat_x = reshape(n, x, [prod(shape[:k])] + rest)
    m = prod(n.shape(lin))
    flat_u = reshape(n, upd, [m] + rest)
    lin = reshape(n, lin, [m] + [1] * len(rest))
    lin = n.emit(Op.EXPAND, [lin], {"size": [m] + rest})
    out = n.emit(Op.SCATTER_REDUCE_TWO, [flat_x, lin, flat_u], {"dim": 0, "reduce": _REDUCE[red],
                                                                 "include_self": True})
    return [reshape(n, out, shape)]


def broadcast_shapes(n, a: list, b: list) -> list:
    r = max(len(a), len(b))
    a = [1] * (r - len(a)) + list(a)
    b = [1] * (r - len(b)) + list(b)
    out = []
    for x, y in zip(a, b):
        if isinstance(y, int) and y == 1:
            out.append(x)
        elif isinstance(x, int) and x == 1:
            out.append(y)
        elif isinstance(x, int) and isinstance(y, int) and x != y:
            raise n.bad(f"shapes {a} and {b} do not broadcast")
        else:
            out.append(y)
    return out


@onnx_op("Expand")
def expand(n):
    x = n.x(0)
    target = broadcast_shapes(n, n.shape(x), n.ints(1, "shape"))
    if target == n.shape(x):
        return [x]
    return [n.emit(Op.EXPAND, [x], {"size": target})]


@onnx_op("Tile")
def tile(n):
    x = n.x(0)
    reps = n.ints(1, "repeats")
    if len(reps) != n.rank(x):
        raise n.bad(f"repeats {reps} must have one entry per input dim ({n.rank(x)})")
    return [n.emit(Op.REPEAT, [x], {"repeats": reps})]


@onnx_op("ConstantOfShape")
def constant_of_shape(n):
    shape = n.ints(0, "shape")
    value = n.attr("value")
    if value is None:
        value = torch.zeros(1, dtype=torch.float32)
    fill = value.reshape(-1)[0].item() if value.numel() else 0
    return [n.emit(Op.FULL, [], {"size": shape, "fill_value": fill, "dtype": value.dtype})]


@onnx_op("Range")
def range_op(n):
    vals = []
    for i in range(3):
        k = n.known(i)
        if isinstance(k, SymArray):
            vals.append(k.values.reshape(-1)[0])
        elif k is None:
            n.imp.needs_value(n.node.input[i])
            raise n.fail("Range needs start, limit and delta known at import")
        else:
            vals.append(k.reshape(-1)[0].item())
    dtype = n.x(0).spec.dtype if not isinstance(n.known(0), SymArray) else torch.int64
    start, limit, delta = vals
    if delta == 0:
        raise n.bad("delta must not be 0")
    if all(isinstance(v, (int, float)) for v in vals):
        if not all(np.isfinite(v) for v in vals):
            raise n.bad("start, limit and delta must be finite")
        count = max(int(np.ceil((limit - start) / delta)), 0)
        n.budget(count, what="a range")
        t = torch.arange(count, dtype=torch.float64) * delta + start if dtype.is_floating_point \
            else torch.arange(count, dtype=torch.int64) * int(delta) + int(start)
        if dtype.is_floating_point:  # ONNX accumulates start + i*delta in the input type
            t = torch.tensor([start + i * delta for i in range(count)], dtype=dtype) \
                if count < 1 << 16 else t.to(dtype)
        return [n.const(t.to(dtype))]
    return [n.emit(Op.ARANGE_START_STEP, [], {"start": start, "end": limit, "step": delta,
                                              "dtype": dtype})]


@onnx_op("OneHot")
def one_hot(n):
    idx, values = n.x(0), n.x(2)
    depth = n.scalar(1)
    depth = int(depth)
    rank = n.rank(idx) + 1
    axis = n.axis(n.attr("axis", -1), rank)
    idx = cast(n, idx, torch.int64) if idx.spec.dtype.is_floating_point is False else \
        cast(n, n.emit(Op.TRUNC, [idx]), torch.int64)
    neg = n.emit(Op.LT_TENSOR, [idx, scalar(n, 0, torch.int64)])
    idx = n.emit(Op.WHERE_SELF, [neg, n.emit(Op.ADD_TENSOR, [idx, scalar(n, depth, torch.int64)]), idx])
    n.budget(depth, what="a one-hot class index")
    classes = n.const(torch.arange(depth, dtype=torch.int64).reshape(
        [depth if d == axis else 1 for d in range(rank)]))
    mask = n.emit(Op.EQ_TENSOR, [unsqueeze_axes(n, idx, [axis]), classes])
    off = n.emit(Op.SELECT_INT, [values], {"dim": 0, "index": 0})
    on = n.emit(Op.SELECT_INT, [values], {"dim": 0, "index": 1})
    return [n.emit(Op.WHERE_SELF, [mask, on, off])]


@onnx_op("Trilu")
def trilu(n):
    x = n.x(0)
    k = int(n.scalar(1, 0))
    return [n.emit(Op.TRIU if n.attr("upper", 1) else Op.TRIL, [x], {"diagonal": k})]


def _pad_index(mode: str, i: int, dim: int) -> int:
    if mode == "edge":
        return min(max(i, 0), dim - 1)
    if mode == "wrap":
        return i % dim
    period = 2 * (dim - 1)  # reflect
    if period == 0:
        return 0
    i = abs(i) % period
    return period - i if i >= dim else i


@onnx_op("Pad")
def pad(n):
    x = n.x(0)
    r = n.rank(x)
    mode = n.attr("mode", "constant")
    if n.opset < 11:
        pads, value, axes = n.attr("pads") or n.attr("paddings"), n.attr("value", 0.0), None
    else:
        pads = n.ints(1, "pads")
        value = n.scalar(2, 0) if n.has(2) else 0
        axes = n.ints(3, "axes") if n.has(3) else None
    axes = [n.axis(a, r) for a in axes] if axes is not None else list(range(r))
    if len(pads) != 2 * len(axes):
        raise n.bad(f"pads {pads} must have 2 entries per padded axis ({len(axes)})")
    pairs = [(0, 0)] * r
    for j, a in enumerate(axes):
        pairs[a] = (pads[j], pads[j + len(axes)])
    if all(p == (0, 0) for p in pairs):
        return [x]
    if mode == "constant":
        if not x.spec.dtype.is_floating_point:
            value = int(value)
        return [n.emit(Op.CONSTANT_PAD_ND, [x], {"pad": torch_pad(pairs), "value": value})]
    if mode not in ("reflect", "edge", "wrap"):
        raise n.fail(f"pad mode {mode!r} is not supported")
    shape = n.shape(x)
    for a, (b, e) in enumerate(pairs):
        if (b, e) == (0, 0):
            continue
        dim = shape[a]
        if not isinstance(dim, int):
            raise n.fail(f"{mode} padding of a symbolic dim is not supported")
        if dim == 0:
            raise n.bad(f"cannot {mode}-pad an empty dim")
        n.budget(dim + b + e, what="a padding index")
        idx = [_pad_index(mode, i, dim) for i in range(-b, dim + e)]
        x = n.emit(Op.INDEX_SELECT, [x, n.const(torch.tensor(idx, dtype=torch.int64))], {"dim": a})
    return [x]


@onnx_op("DepthToSpace")
def depth_to_space(n):
    x = n.x(0)
    b = n.attr("blocksize")
    N, C, H, W = n.shape(x)
    if n.attr("mode", "DCR") == "DCR":
        y = reshape(n, x, [N, b, b, C // (b * b), H, W])
        y = n.emit(Op.PERMUTE, [y], {"dims": [0, 3, 4, 1, 5, 2]})
    else:
        y = reshape(n, x, [N, C // (b * b), b, b, H, W])
        y = n.emit(Op.PERMUTE, [y], {"dims": [0, 1, 4, 2, 5, 3]})
    return [reshape(n, y, [N, C // (b * b), H * b, W * b])]


@onnx_op("SpaceToDepth")
def space_to_depth(n):
    x = n.x(0)
    b = n.attr("blocksize")
    N, C, H, W = n.shape(x)
    y = reshape(n, x, [N, C, H // b, b, W // b, b])
    dims = [0, 1, 3, 5, 2, 4] if n.attr("mode", "DCR") == "CRD" else [0, 3, 5, 1, 2, 4]
    y = n.emit(Op.PERMUTE, [y], {"dims": dims})
    return [reshape(n, y, [N, C * b * b, H // b, W // b])]


def _scan(n, op: Op):
    x = n.x(0)
    shape = n.shape(x)
    axis = n.axis(int(n.scalar(1)), len(shape))
    y = x
    if n.attr("reverse", 0):
        y = n.emit(Op.FLIP, [y], {"dims": [axis]})
    y = n.emit(op, [y], {"dim": axis, "dtype": x.spec.dtype})
    if n.attr("exclusive", 0):
        pairs = [(0, 0)] * len(shape)
        pairs[axis] = (1, -1)
        fill = 1 if op is Op.CUMPROD else 0
        y = n.emit(Op.CONSTANT_PAD_ND, [y], {"pad": torch_pad(pairs), "value": fill})
    if n.attr("reverse", 0):
        y = n.emit(Op.FLIP, [y], {"dims": [axis]})
    return [y]


@onnx_op("CumSum")
def cumsum(n):
    return _scan(n, Op.CUMSUM)


@onnx_op("CumProd")
def cumprod(n):
    return _scan(n, Op.CUMPROD)


@onnx_op("TopK")
def topk(n):
    x = n.x(0)
    k = n.ints(1, "k")[0] if n.opset >= 10 else n.attr("k")
    axis = n.axis(n.attr("axis", -1), n.rank(x))
    # a stable sort: among equal values the lower index comes first, as ONNX requires
    values, indices = n.emit(Op.SORT_STABLE, [x], {"stable": True, "dim": axis,
                                                   "descending": bool(n.attr("largest", 1))})
    if not (isinstance(k, int) and isinstance(n.shape(x)[axis], int) and k == n.shape(x)[axis]):
        values = n.emit(Op.SLICE_TENSOR, [values], {"dim": axis, "start": 0, "end": k, "step": 1})
        indices = n.emit(Op.SLICE_TENSOR, [indices], {"dim": axis, "start": 0, "end": k, "step": 1})
    return [values, indices]


@onnx_op("Shape", "Size")
def shape_op(n):
    from deepseek.frontend.onnx_ops.symbolic import try_symbolic

    return try_symbolic(n)


@onnx_op("NonZero")
def nonzero(n):
    k = n.known(0)
    if not isinstance(k, torch.Tensor):
        raise n.fail("NonZero on a run-time tensor has a data-dependent shape, which the IR "
                     "does not support")
    return [n.const(torch.stack(torch.nonzero(k, as_tuple=True)) if k.dim() else
                    torch.zeros((0, int(bool(k))), dtype=torch.int64))]


@onnx_op("EyeLike")
def eye_like(n):
    x = n.x(0)
    shape = n.shape(x)
    if not all(isinstance(d, int) for d in shape) or len(shape) != 2:
        raise n.fail("EyeLike needs a static 2-D input")
    dt = n.attr("dtype")
    dtype = torch_dtype(dt) if dt is not None else x.spec.dtype
    k = n.attr("k", 0)
    n.budget(*shape, what="an identity matrix")
    eye = torch.zeros(shape, dtype=torch.float64)
    for i in range(shape[0]):
        j = i + k
        if 0 <= j < shape[1]:
            eye[i, j] = 1
    return [n.const(eye.to(dtype))]


@onnx_op("ReverseSequence")
def reverse_sequence(n):
    """out[t, b] = x[L[b] - 1 - t, b] for t < L[b], else x[t, b] (computed at run time)."""
    x, lens = n.x(0), cast(n, n.x(1), torch.int64)
    t_axis, b_axis = n.attr("time_axis", 0), n.attr("batch_axis", 1)
    shape = n.shape(x)
    r = len(shape)
    T = shape[t_axis]
    t_shape, b_shape = [1] * r, [1] * r
    t_shape[t_axis] = T
    b_shape[b_axis] = shape[b_axis]
    t = reshape(n, n.emit(Op.ARANGE_START_STEP, [], {"start": 0, "end": T, "step": 1,
                                                     "dtype": torch.int64}), t_shape)
    L = reshape(n, lens, b_shape)
    rev = n.emit(Op.SUB_TENSOR, [n.emit(Op.SUB_TENSOR, [L, scalar(n, 1, torch.int64)]), t])
    idx = n.emit(Op.WHERE_SELF, [n.emit(Op.LT_TENSOR, [t, L]), rev, t])
    idx = n.emit(Op.EXPAND, [idx], {"size": shape})
    return [n.emit(Op.GATHER, [x, idx], {"dim": t_axis})]


@onnx_op("BitCast")
def bitcast(n):
    x = n.x(0)
    dtype = torch_dtype(n.attr("to"))
    if dtype.itemsize != x.spec.dtype.itemsize:
        raise n.bad(f"BitCast between {x.spec.dtype} and {dtype} (different sizes)")
    return [n.emit(Op.VIEW_DTYPE, [x], {"dtype": dtype})]


@onnx_op("Det")
def det(n):
    return n.imp.emit_fallback("aten.linalg_det.default", [n.x(0)], {}, n.name, n.source)
