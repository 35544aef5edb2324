"""Weight-only quantized linear layers in C (``weightonly.c``): int8 or int4 weights turned
into floats in registers as they stream from memory, for the few rows of decoding.

At one row a float32 linear is bound by reading its weight; this reads a quarter (int8)
or an eighth (int4) of those bytes. GPT-2's 768 x 50257 LM head on an AVX2 EPYC, 2
threads, one row: 1.7 ms in int8 and 3.2-3.5 ms in int4 (groups of 64-128) against
9.0 ms for float32.
"""

from __future__ import annotations

import ctypes

import torch

from deepseek.backends.cpu import native

# Rows up to which a weight-only linear streams its int weight: one decoding step's. A
# step reads every weight of the model once, more bytes than any cache holds, so those
# bytes bound it (BENCHMARKS.md: a 135M-parameter Llama); timing one layer alone would
# run it from cache and favour the float GEMV, so this is a rule, not a measurement.
MAX_ROWS = 4


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built (no C compiler)."""
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    return native.library("weightonly", {"ds_linear_wonly": ([p] * 7 + [n, n, n, i, n, n, i],
                                                             None)})


def columns(weight: torch.Tensor, bits: int) -> int:
    """K, the input columns of a stored weight (4-bit: two a byte)."""
    return weight.shape[-1] * (2 if bits == 4 else 1)


def supports(rows: int, x_dtype: torch.dtype, weight: torch.Tensor, scale: torch.Tensor,
             zero_point: torch.Tensor | None, bits: int, group_size: int) -> bool:
    """Whether a call of ``rows`` rows streams its weight: float32 x, an int8 weight (4-bit:
    uint8, two a byte), columns and groups in whole vectors of 8, zero points shaped as
    the scales, at most ``MAX_ROWS`` rows, and the kernel built."""
    k = columns(weight, bits)
    group = group_size or k
    stored = {8: torch.int8, 4: torch.uint8}.get(bits)
    return (rows <= MAX_ROWS and x_dtype == torch.float32 and weight.dtype == stored
            and weight.is_contiguous() and k % 8 == 0 and group % 8 == 0 and k % group == 0
            and (zero_point is None or zero_point.numel() == scale.numel())
            and library() is not None)


class StreamingLinear:
    """``x @ dequantize(weight).T + bias`` without forming the float weight, for one
    weight: scales, zero points and bias prepared once, each call one pass of the C kernel.
    ``scale`` and ``zero_point``: one value ([1] or []), one per output channel ([N]) or
    one per group of ``group_size`` columns ([N, K / group_size]); see ``supports``."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                 group_size: int):
        self.weight, self.bits = weight, bits
        self.n, self.k = weight.shape[0], columns(weight, bits)
        self.group = group_size or self.k
        self.groups = self.k // self.group
        self.row_stride = 0 if scale.numel() == 1 else self.groups
        self.scale = scale.float().contiguous()
        self.zero_point = zero_point.float().contiguous() if zero_point is not None else None
        self.bias = bias.float().contiguous() if bias is not None else None
        self.fn = library().ds_linear_wonly
        self._none = torch.zeros(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.k).contiguous()
        m = x2.shape[0]
        z = self.zero_point
        xsum = x2.view(m, self.groups, self.group).sum(-1) if z is not None else self._none
        y = torch.empty(m, self.n)
        self.fn(x2.data_ptr(), self.weight.data_ptr(), self.scale.data_ptr(),
                None if z is None else z.data_ptr(), xsum.data_ptr(),
                None if self.bias is None else self.bias.data_ptr(), y.data_ptr(), m, self.n,
                self.k, self.bits, self.group, self.row_stride, torch.get_num_threads())
        return y.view(*x.shape[:-1], self.n)
