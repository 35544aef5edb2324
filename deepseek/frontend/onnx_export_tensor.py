"""IR -> ONNX for views, data movement, creation, quantize/dequantize and fused kernels."""

from __future__ import annotations

import torch

from deepseek.errors import UnsupportedOpError
from deepseek.frontend.onnx_export import EXPORTERS, exports
from deepseek.frontend.onnx_export_ops import I64, X, out_dtype
from deepseek.frontend.onnx_types import onnx_elem_type
from deepseek.ir.graph import Node, Value
from deepseek.ir.ops import Op, op_from_name
from deepseek.ir.types import Sym, TensorSpec

INT64_MAX = 2 ** 63 - 1
INT64_MIN = -(2 ** 63)


def _norm(d: int, r: int) -> int:
    return d % r if r else 0


# --------------------------------------------------------------------------- #
# views and layout
# --------------------------------------------------------------------------- #
@exports(Op.VIEW, Op.UNSAFE_VIEW, Op.RESHAPE)
def reshape(ctx, node):
    shape = list(node.attrs.get("size", node.attrs.get("shape")))
    zero = any(isinstance(d, int) and d == 0 for d in shape)
    if zero and ctx.opset < 14:
        raise UnsupportedOpError("a reshape to a size-0 dim needs opset 14 (allowzero)")
    return [ctx.one("Reshape", [X(ctx, node), ctx.i64(shape)], allowzero=1 if zero else None)]


@exports(Op.PERMUTE)
def permute(ctx, node):
    r = node.inputs[0].spec.rank
    return [ctx.one("Transpose", [X(ctx, node)], perm=[_norm(d, r) for d in node.attrs["dims"]])]


@exports(Op.T, Op.TRANSPOSE_INT)
def transpose(ctx, node):
    r = node.inputs[0].spec.rank
    if r < 2:
        return [ctx.one("Identity", [X(ctx, node)])]
    perm = list(range(r))
    a, b = (node.attrs.get("dim0", 0), node.attrs.get("dim1", 1)) if node.op is Op.TRANSPOSE_INT \
        else (0, 1)
    a, b = _norm(a, r), _norm(b, r)
    perm[a], perm[b] = perm[b], perm[a]
    return [ctx.one("Transpose", [X(ctx, node)], perm=perm)]


@exports(Op.EXPAND)
def expand(ctx, node):
    x = node.inputs[0]
    size = list(node.attrs["size"])
    in_shape = x.spec.shape
    off = len(size) - len(in_shape)
    size = [in_shape[i - off] if isinstance(d, int) and d == -1 else d for i, d in enumerate(size)]
    return [ctx.one("Expand", [X(ctx, node), ctx.i64(size)])]


@exports(Op.SLICE_TENSOR)
def slice_(ctx, node):
    dim = node.attrs.get("dim", 0)
    start = node.attrs.get("start")
    end = node.attrs.get("end")
    step = node.attrs.get("step", 1) or 1
    start = 0 if start is None else start
    end = INT64_MAX if end is None else end
    if isinstance(end, int):
        end = max(min(end, INT64_MAX), INT64_MIN)
    return [ctx.one("Slice", [X(ctx, node), ctx.i64([start]), ctx.i64([end]), ctx.i64([dim]),
                              ctx.i64([step])])]


@exports(Op.SELECT_INT)
def select(ctx, node):
    idx = node.attrs["index"]
    return [ctx.one("Gather", [X(ctx, node), ctx.scalar_i64(idx)], axis=node.attrs["dim"])]


@exports(Op.UNSQUEEZE)
def unsqueeze(ctx, node):
    r = node.inputs[0].spec.rank + 1
    return [ctx.one("Unsqueeze", [X(ctx, node), ctx.i64([_norm(node.attrs["dim"], r)])])]


@exports(Op.SQUEEZE_DIMS, Op.SQUEEZE_DIM, Op.SQUEEZE)
def squeeze(ctx, node):
    x = node.inputs[0]
    r = x.spec.rank
    dims = node.attrs.get("dim")
    dims = list(range(r)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    dims = sorted({_norm(d, r) for d in dims if isinstance(x.spec.shape[_norm(d, r)], int)
                   and x.spec.shape[_norm(d, r)] == 1})
    if not dims:
        return [ctx.one("Identity", [X(ctx, node)])]
    return [ctx.one("Squeeze", [X(ctx, node), ctx.i64(dims)])]


@exports(Op.SPLIT_WITH_SIZES, Op.SPLIT_TENSOR)
def split(ctx, node):
    x = node.inputs[0]
    dim = _norm(node.attrs.get("dim", 0), x.spec.rank)
    if node.op is Op.SPLIT_WITH_SIZES:
        sizes = list(node.attrs["split_sizes"])
    else:
        total, each = x.spec.shape[dim], node.attrs["split_size"]
        if not isinstance(total, int):
            raise UnsupportedOpError("split of a symbolic dim")
        sizes = [min(each, total - i) for i in range(0, total, each)] or [0]
    if len(sizes) == 1:
        return [ctx.one("Identity", [X(ctx, node)])]
    return ctx.add("Split", [X(ctx, node), ctx.i64(sizes)], len(sizes), axis=dim)


@exports(Op.UNBIND_INT)
def unbind(ctx, node):
    x = node.inputs[0]
    dim = _norm(node.attrs.get("dim", 0), x.spec.rank)
    n = len(node.outputs)
    parts = ctx.add("Split", [X(ctx, node), ctx.i64([1] * n)], n, axis=dim) if n > 1 else [X(ctx, node)]
    return [ctx.one("Squeeze", [p, ctx.i64([dim])]) for p in parts]


# --------------------------------------------------------------------------- #
# data movement
# --------------------------------------------------------------------------- #
@exports(Op.CAT)
def cat(ctx, node):
    dt = out_dtype(node)
    r = node.outputs[0].spec.rank
    xs = [x for x in node.inputs if isinstance(x, Value) and not (x.spec.rank == 1 and r != 1
                                                                 and x.spec.shape[0] == 0)]
    dim = _norm(node.attrs.get("dim", 0), r)
    if len(xs) == 1:
        return [ctx.one("Identity", [ctx.operand(xs[0], dt)])]
    return [ctx.one("Concat", [ctx.operand(x, dt) for x in xs], axis=dim)]


@exports(Op.STACK)
def stack(ctx, node):
    dt = out_dtype(node)
    r = node.outputs[0].spec.rank
    dim = _norm(node.attrs.get("dim", 0), r)
    parts = [ctx.one("Unsqueeze", [ctx.operand(x, dt), ctx.i64([dim])]) for x in node.inputs]
    return [ctx.one("Concat", parts, axis=dim) if len(parts) > 1 else parts[0]]


@exports(Op.GATHER)
def gather(ctx, node):
    return [ctx.one("GatherElements", [X(ctx, node), X(ctx, node, 1)], axis=node.attrs["dim"])]


@exports(Op.INDEX_SELECT)
def index_select(ctx, node):
    return [ctx.one("Gather", [X(ctx, node), X(ctx, node, 1)], axis=node.attrs["dim"])]


@exports(Op.EMBEDDING)
def embedding(ctx, node):
    return [ctx.one("Gather", [X(ctx, node, 0), X(ctx, node, 1)], axis=0)]


def _bcast(shapes):
    r = max(len(s) for s in shapes)
    out = []
    for i in range(r):
        dims = [s[i - (r - len(s))] for s in shapes if i - (r - len(s)) >= 0]
        pick = next((d for d in dims if not (isinstance(d, int) and d == 1)), 1)
        out.append(pick)
    return out


def _index_tuple(ctx, node):
    """(data, [(dim, Value)]) of an index.Tensor-like node's non-None index tensors."""
    x = node.inputs[0]
    idx = [(d, v) for d, v in enumerate(node.inputs[1:]) if v is not None]
    if any(v.spec.dtype == torch.bool for _, v in idx):
        raise UnsupportedOpError("boolean-mask indexing has a data-dependent shape")
    return x, idx


def _stacked(ctx, idx_values, shape):
    parts = []
    for v in idx_values:
        n = ctx.cast(ctx.name(v), v.spec.dtype, I64)
        n = ctx.one("Expand", [n, ctx.i64(shape)]) if list(v.spec.shape) != list(shape) else n
        parts.append(ctx.one("Unsqueeze", [n, ctx.i64([len(shape)])]))
    return ctx.one("Concat", parts, axis=-1) if len(parts) > 1 else parts[0]


@exports(Op.INDEX_TENSOR, Op.UNSAFE_INDEX_TENSOR)
def index(ctx, node):
    x, idx = _index_tuple(ctx, node)
    r = x.spec.rank
    dims = [d for d, _ in idx]
    if len(idx) == 1:
        d, v = idx[0]
        return [ctx.one("Gather", [X(ctx, node), ctx.name(v)], axis=d)]
    bshape = _bcast([list(v.spec.shape) for _, v in idx])
    adjacent = dims == list(range(dims[0], dims[0] + len(dims)))
    rest = [d for d in range(r) if d not in dims]
    perm = dims + rest
    data = X(ctx, node)
    if perm != list(range(r)):
        data = ctx.one("Transpose", [data], perm=perm)
    y = ctx.one("GatherND", [data, _stacked(ctx, [v for _, v in idx], bshape)], batch_dims=0)
    if adjacent and dims[0] > 0:  # PyTorch keeps the indexed block in place
        nb, before = len(bshape), dims[0]
        out_perm = list(range(nb, nb + before)) + list(range(nb)) + \
            list(range(nb + before, nb + len(rest)))
        y = ctx.one("Transpose", [y], perm=out_perm)
    return [y]


@exports(Op.INDEX_PUT)
def index_put(ctx, node):
    x = node.inputs[0]
    values = node.inputs[-1]
    idx = [(d, v) for d, v in enumerate(node.inputs[1:-1]) if v is not None]
    if any(v.spec.dtype == torch.bool for _, v in idx):
        raise UnsupportedOpError("boolean-mask index_put has a data-dependent shape")
    dims = [d for d, _ in idx]
    if dims != list(range(len(dims))):
        raise UnsupportedOpError("index_put with indices not on the leading dims")
    bshape = _bcast([list(v.spec.shape) for _, v in idx])
    target = bshape + list(x.spec.shape[len(dims):])
    upd = ctx.operand(values, x.spec.dtype)
    upd = ctx.one("Expand", [upd, ctx.i64(target)])
    red = "add" if node.attrs.get("accumulate") else None
    return [ctx.one("ScatterND", [X(ctx, node), _stacked(ctx, [v for _, v in idx], bshape), upd],
                    reduction=red)]


_SCATTER_RED = {"sum": "add", "prod": "mul", "amax": "max", "amin": "min"}


@exports(Op.SCATTER_SRC, Op.SCATTER_VALUE, Op.SCATTER_ADD, Op.SCATTER_REDUCE_TWO)
def scatter(ctx, node):
    dt = out_dtype(node)
    x, index = node.inputs[0], node.inputs[1]
    if node.op is Op.SCATTER_VALUE:
        src = ctx.one("Expand", [ctx.const(node.attrs["value"], dt), ctx.one("Shape", [ctx.name(index)])])
    else:
        src = ctx.operand(node.inputs[2], dt)
    red = None
    if node.op is Op.SCATTER_ADD:
        red = "add"
    elif node.op is Op.SCATTER_REDUCE_TWO:
        if not node.attrs.get("include_self", True) or node.attrs["reduce"] not in _SCATTER_RED:
            raise UnsupportedOpError(f"scatter_reduce {node.attrs['reduce']!r} "
                                     f"(include_self={node.attrs.get('include_self', True)})")
        red = _SCATTER_RED[node.attrs["reduce"]]
    return [ctx.one("ScatterElements", [ctx.operand(x, dt), ctx.name(index), src],
                    axis=node.attrs["dim"], reduction=red)]


def _positions(ctx, dim, positions, like: str, r: int) -> str:
    shape = [1] * r
    shape[dim] = len(positions)
    idx = ctx.const(torch.tensor(positions, dtype=I64).reshape(shape), I64)
    return ctx.one("Expand", [idx, ctx.one("Shape", [like])])


@exports(Op.SLICE_SCATTER, Op.SELECT_SCATTER)
def slice_scatter(ctx, node):
    x, src = node.inputs[0], node.inputs[1]
    r = x.spec.rank
    dim = _norm(node.attrs.get("dim", 0), r)
    size = x.spec.shape[dim]
    if not isinstance(size, int):
        raise UnsupportedOpError("slice_scatter on a symbolic dim")
    srcn = ctx.operand(src, x.spec.dtype)
    if node.op is Op.SELECT_SCATTER:
        positions = [node.attrs["index"] % size]
        srcn = ctx.one("Unsqueeze", [srcn, ctx.i64([dim])])
    else:
        start = node.attrs.get("start") or 0
        end = node.attrs.get("end")
        end = size if end is None else end
        positions = list(range(size))[slice(start, end, node.attrs.get("step", 1) or 1)]
    return [ctx.one("ScatterElements", [X(ctx, node), _positions(ctx, dim, positions, srcn, r), srcn],
                    axis=dim)]


@exports(Op.FLIP)
def flip(ctx, node):
    dims = [_norm(d, node.inputs[0].spec.rank) for d in node.attrs["dims"]]
    n = len(dims)
    return [ctx.one("Slice", [X(ctx, node), ctx.i64([-1] * n), ctx.i64([INT64_MIN] * n),
                              ctx.i64(dims), ctx.i64([-1] * n)])]


@exports(Op.ROLL)
def roll(ctx, node):
    x = node.inputs[0]
    shifts, dims = list(node.attrs["shifts"]), list(node.attrs.get("dims") or [])
    if not all(isinstance(d, int) for d in x.spec.shape):
        raise UnsupportedOpError("roll of a symbolic shape")
    y = X(ctx, node)
    flat = not dims
    if flat:
        total = 1
        for v in x.spec.shape:
            total *= v
        y = ctx.one("Reshape", [y, ctx.i64([-1])])
        dims, sizes = [0], [total]
    else:
        dims = [_norm(d, x.spec.rank) for d in dims]
        sizes = [x.spec.shape[d] for d in dims]
    for s, d, size in zip(shifts, dims, sizes):
        s = s % size if size else 0
        if s == 0:
            continue
        head = ctx.one("Slice", [y, ctx.i64([size - s]), ctx.i64([size]), ctx.i64([d])])
        tail = ctx.one("Slice", [y, ctx.i64([0]), ctx.i64([size - s]), ctx.i64([d])])
        y = ctx.one("Concat", [head, tail], axis=d)
    if flat:
        y = ctx.one("Reshape", [y, ctx.i64(list(x.spec.shape))])
    return [ctx.one("Identity", [y]) if y == X(ctx, node) else y]


@exports(Op.REPEAT, Op.TILE)
def repeat(ctx, node):
    x = node.inputs[0]
    reps = list(node.attrs.get("repeats", node.attrs.get("dims")))
    r = x.spec.rank
    y = X(ctx, node)
    if node.op is Op.TILE and len(reps) < r:
        reps = [1] * (r - len(reps)) + reps
    if len(reps) > r:
        y = ctx.one("Reshape", [y, ctx.i64([1] * (len(reps) - r) + list(x.spec.shape))])
    return [ctx.one("Tile", [y, ctx.i64(reps)])]


@exports(Op.TRIL, Op.TRIU)
def trilu(ctx, node):
    k = node.attrs.get("diagonal", 0)
    return [ctx.one("Trilu", [X(ctx, node), ctx.const(k, I64)], upper=int(node.op is Op.TRIU))]


@exports(Op.ONE_HOT)
def one_hot(ctx, node):
    n = node.attrs.get("num_classes", -1)
    if n is None or n < 0:
        raise UnsupportedOpError("one_hot needs num_classes")
    return [ctx.one("OneHot", [X(ctx, node), ctx.const(n, I64), ctx.const([0, 1], I64)], axis=-1)]


# --------------------------------------------------------------------------- #
# creation
# --------------------------------------------------------------------------- #
def _filled(ctx, shape: str, value, dtype) -> str:
    if isinstance(value, Sym):
        v = ctx.cast(ctx.scalar_i64(value), I64, dtype)
        return ctx.one("Expand", [v, shape])
    t = onnx_value(value, dtype)
    return ctx.one("ConstantOfShape", [shape], value=t)


def onnx_value(value, dtype):
    import onnx

    from deepseek.frontend.onnx_types import torch_to_numpy

    arr = torch_to_numpy(torch.tensor([value], dtype=dtype))
    t = onnx.numpy_helper.from_array(arr)
    if dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        t.data_type = onnx_elem_type(dtype)
    return t


@exports(Op.FULL, Op.ZEROS, Op.ONES, Op.EMPTY_MEMORY_FORMAT, Op.EMPTY_STRIDED)
def full(ctx, node):
    dt = out_dtype(node)
    size = list(node.attrs.get("size"))
    value = {Op.FULL: node.attrs.get("fill_value"), Op.ONES: 1}.get(node.op, 0)
    if all(isinstance(d, int) for d in size) and not isinstance(value, Sym):
        numel = 1
        for d in size:
            numel *= d
        if numel <= 16:
            return [ctx.one("Identity", [ctx.const(torch.full(size, value, dtype=dt), dt)])]
    return [_filled(ctx, ctx.i64(size), value, dt)]


@exports(Op.SCALAR_TENSOR)
def scalar_tensor(ctx, node):
    dt = out_dtype(node)
    s = node.attrs["s"]
    if isinstance(s, Sym):
        return [ctx.cast(ctx.scalar_i64(s), I64, dt)]
    return [ctx.one("Identity", [ctx.const(s, dt)])]


@exports(Op.FULL_LIKE, Op.ZEROS_LIKE, Op.ONES_LIKE, Op.EMPTY_LIKE)
def full_like(ctx, node):
    dt = out_dtype(node)
    value = {Op.FULL_LIKE: node.attrs.get("fill_value"), Op.ONES_LIKE: 1}.get(node.op, 0)
    return [_filled(ctx, ctx.one("Shape", [X(ctx, node)]), value, dt)]


@exports(Op.ARANGE_START_STEP, Op.ARANGE, Op.ARANGE_START)
def arange(ctx, node):
    dt = out_dtype(node)
    start = node.attrs.get("start", 0)
    end = node.attrs["end"]
    step = node.attrs.get("step", 1)
    if not any(isinstance(v, Sym) for v in (start, end, step)):
        return [ctx.one("Identity", [ctx.const(torch.arange(start, end, step, dtype=dt), dt)])]
    work = I64 if not dt.is_floating_point else dt
    parts = [ctx.cast(ctx.scalar_i64(v), I64, work) if isinstance(v, Sym) else ctx.const(v, work)
             for v in (start, end, step)]
    return [ctx.cast(ctx.one("Range", parts), work, dt)]


# --------------------------------------------------------------------------- #
# quantize / dequantize (QDQ)
# --------------------------------------------------------------------------- #
def _qparams(ctx, node, dtype):
    """(scale name, zero point name) of a per-tensor node, attrs or tensor inputs."""
    if node.op in (Op.QUANTIZE_PER_TENSOR_TENSOR, Op.DEQUANTIZE_PER_TENSOR_TENSOR):
        s = ctx.one("Reshape", [ctx.operand(node.inputs[1], torch.float32), ctx.i64([])])
        z = ctx.one("Reshape", [ctx.operand(node.inputs[2], dtype), ctx.i64([])])
        return s, z
    return ctx.const(float(node.attrs["scale"]), torch.float32), \
        ctx.const(int(node.attrs["zero_point"]), dtype)


def _clip_range(ctx, name: str, node, dtype) -> str:
    info = torch.iinfo(dtype)
    lo, hi = node.attrs.get("quant_min", info.min), node.attrs.get("quant_max", info.max)
    if (lo, hi) == (info.min, info.max):
        return name
    return ctx.one("Clip", [name, ctx.const(lo, dtype), ctx.const(hi, dtype)])


def _check_qdtype(ctx, dtype):
    if dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32):
        raise UnsupportedOpError(f"quantization to {dtype} has no ONNX QDQ form")
    if dtype in (torch.int16,) and ctx.opset < 21:
        raise UnsupportedOpError("int16 QuantizeLinear needs opset 21")
    if dtype == torch.int32:
        raise UnsupportedOpError("int32 QuantizeLinear is not in ONNX")


@exports(Op.QUANTIZE_PER_TENSOR, Op.QUANTIZE_PER_TENSOR_TENSOR)
def quantize_per_tensor(ctx, node):
    dtype = node.attrs["dtype"]
    _check_qdtype(ctx, dtype)
    s, z = _qparams(ctx, node, dtype)
    q = ctx.one("QuantizeLinear", [ctx.operand(node.inputs[0], torch.float32), s, z])
    return [_clip_range(ctx, q, node, dtype)]


@exports(Op.DEQUANTIZE_PER_TENSOR, Op.DEQUANTIZE_PER_TENSOR_TENSOR)
def dequantize_per_tensor(ctx, node):
    dtype = node.attrs["dtype"]
    if dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32):
        raise UnsupportedOpError(f"dequantization of {dtype} has no ONNX QDQ form")
    s, z = _qparams(ctx, node, dtype)
    y = ctx.one("DequantizeLinear", [X(ctx, node), s, z])
    return [ctx.cast(y, torch.float32, out_dtype(node))]


@exports(Op.QUANTIZE_PER_CHANNEL, Op.DEQUANTIZE_PER_CHANNEL)
def per_channel(ctx, node):
    dtype = node.attrs["dtype"]
    quant = node.op is Op.QUANTIZE_PER_CHANNEL
    if quant:
        _check_qdtype(ctx, dtype)
    x, scales, zps = node.inputs[0], node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    s = ctx.operand(scales, torch.float32)
    if zps is not None:
        z = ctx.operand(zps, dtype)
    else:
        zeros = torch.zeros(scales.spec.shape, dtype=dtype) if scales.spec.is_static else None
        if zeros is None:
            raise UnsupportedOpError("per-channel dequantize without zero points on a symbolic shape")
        z = ctx.const(zeros, dtype)
    axis = node.attrs["axis"]
    if quant:
        q = ctx.one("QuantizeLinear", [ctx.operand(x, torch.float32), s, z], axis=axis)
        return [_clip_range(ctx, q, node, dtype)]
    y = ctx.one("DequantizeLinear", [X(ctx, node), s, z], axis=axis)
    return [ctx.cast(y, torch.float32, out_dtype(node))]


# --------------------------------------------------------------------------- #
# fused element-wise kernels: exported as the ops they fuse
# --------------------------------------------------------------------------- #
def _step_spec(op, args, attrs, env_hint) -> TensorSpec:
    from deepseek.ir.interpreter import infer_specs

    node = Node(op, args, attrs, [])
    shapes = [a.spec.shape for a in args if isinstance(a, Value)]
    shape = _bcast_specs(shapes) if shapes else []
    dtype = infer_specs(node, env_hint)[0].dtype
    return TensorSpec(tuple(shape), dtype)


def _bcast_specs(shapes):
    r = max(len(s) for s in shapes)
    out = []
    for i in range(r):
        dims = [s[i - (r - len(s))] for s in shapes if i - (r - len(s)) >= 0]
        out.append(next((d for d in dims if not (isinstance(d, int) and d == 1)), 1))
    return out


@exports(Op.FUSED_POINTWISE)
def fused(ctx, node):
    from deepseek.ir.fused import parse_program
    from deepseek.ir.serialize import decode_attr

    steps = parse_program(node.attrs["program"])
    syms = {s for v in node.inputs if isinstance(v, Value) for d in v.spec.shape
            if isinstance(d, Sym) for s in d.symbols()}
    env_hint = {s: 8 for s in syms}
    results: list[Value] = []
    outer = ctx.current
    name = None
    for j, (opname, args, attrs) in enumerate(steps):
        op = op_from_name(opname)

        def arg(a):
            if isinstance(a, str) and a[:1] == "$":
                return node.inputs[int(a[1:])]
            if isinstance(a, str) and a[:1] == "#":
                return results[int(a[1:])]
            return a

        ins = [arg(a) for a in args]
        attrs = {k: decode_attr(v) for k, v in attrs.items()}
        last = j == len(steps) - 1
        spec = node.outputs[0].spec if last else _step_spec(op, ins, attrs, env_hint)
        out = Value(f"{node.outputs[0].name}_s{j}", spec)
        step = Node(op, ins, attrs, [out], source=node.source)
        fn = EXPORTERS.get(op)
        if fn is None:
            raise UnsupportedOpError(f"fused step {opname} has no ONNX export")
        ctx.current = step
        name = fn(ctx, step)[0]
        ctx.names[id(out)] = name
        results.append(out)
    ctx.current = outer
    return [name]
