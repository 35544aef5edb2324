"""Small emitters shared by the ONNX op handlers."""

from __future__ import annotations

import math

import torch

from deepseek.ir.graph import Value
from deepseek.ir.ops import Op

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def cast(n, v: Value, dtype: torch.dtype) -> Value:
    if v.spec.dtype == dtype:
        return v
    return n.emit(Op.TO_COPY, [v], {"dtype": dtype})


def reshape(n, v: Value, shape: list) -> Value:
    if list(n.shape(v)) == list(shape) and all(isinstance(d, int) for d in shape):
        return v
    return n.emit(Op.RESHAPE, [v], {"shape": list(shape)})


def scalar(n, value, dtype: torch.dtype) -> Value:
    """A 0-d constant of ``dtype`` (exact dtype, so ATen's type promotion keeps ours)."""
    return n.const(torch.tensor(value, dtype=dtype))


def prod(xs) -> int:
    out = 1
    for x in xs:
        out = out * x
    return out


def axes_list(n, axes, rank: int) -> list[int]:
    return sorted({n.axis(int(a), rank) for a in axes})


def unsqueeze_axes(n, v: Value, axes: list[int]) -> Value:
    """Insert size-1 dims at ``axes`` (positions in the output)."""
    out_rank = n.rank(v) + len(axes)
    for a in sorted(n.axis(int(x), out_rank) for x in axes):
        v = n.emit(Op.UNSQUEEZE, [v], {"dim": a})
    return v


def broadcast_to_rank(n, v: Value, rank: int) -> Value:
    r = n.rank(v)
    if r >= rank:
        return v
    return reshape(n, v, [1] * (rank - r) + n.shape(v))


def channel_shape(rank: int, axis: int, size) -> list:
    """[1, ..., size, ..., 1]: a per-channel vector shaped to broadcast along ``axis``."""
    shape = [1] * rank
    shape[axis] = size
    return shape


def dtype_min(dtype: torch.dtype):
    return -math.inf if dtype.is_floating_point else torch.iinfo(dtype).min


def dtype_max(dtype: torch.dtype):
    return math.inf if dtype.is_floating_point else torch.iinfo(dtype).max


def pads_pairs(pads: list[int], r: int) -> list[tuple[int, int]]:
    """ONNX pads [b1..br, e1..er] as [(b1, e1), ...]."""
    if not pads:
        return [(0, 0)] * r
    return [(int(pads[i]), int(pads[i + r])) for i in range(r)]


def torch_pad(pairs: list[tuple[int, int]]) -> list[int]:
    """constant_pad_nd's order: last dim first, (begin, end) each."""
    out: list[int] = []
    for b, e in reversed(pairs):
        out += [b, e]
    return out


def auto_pads(n, in_sizes, kernel, strides, dilations, mode: str) -> list[tuple[int, int]]:
    """Explicit (begin, end) pads for auto_pad SAME_UPPER / SAME_LOWER / VALID."""
    pairs = []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        if mode == "VALID":
            pairs.append((0, 0))
            continue
        if not isinstance(size, int):
            raise n.fail(f"auto_pad={mode} on a symbolic spatial dim is not supported")
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        pairs.append((small, total - small) if mode == "SAME_UPPER" else (total - small, small))
    return pairs
