"""``deepseek::fp8_linear`` on fp8 tensor cores: one Triton kernel quantizes the
activation rows (per-row amax / 448, float8_e4m3fn), then one ``torch._scaled_mm``.

Unfused, the row quantization is five PyTorch kernels (abs, amax, divide, clamp,
cast), each a pass over the activation; here it is one pass. Values are rounded
to the nearest float8_e4m3fn (ties away from zero, where PyTorch's cast rounds
ties to even). Runs under Triton's interpreter too (``TRITON_INTERPRET=1``), on
CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek.ir.fused import FP8_MAX

_MAX_ROW = 16384  # one row in registers, as in the norm kernels


@triton.jit
def _quantize_rows(X, Q, S, N, FMAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / FMAX
    # round to e4m3's grid here (3 mantissa bits; below 2**-6, steps of 2**-9), so that
    # the cast below is exact: Triton's interpreter loses the carry when a value rounds
    # up into the next power of two (124.3 -> 64); halves round up, not to even
    v = x / scale
    a = tl.abs(v)
    step = tl.exp2(tl.floor(tl.log2(tl.maximum(a, 0.015625))) - 3.0)
    r = tl.minimum(tl.floor(a / step + 0.5) * step, FMAX)
    q = tl.where(v < 0, -r, r)
    tl.store(Q + row * N + cols, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn rows, float32 scales (M, 1)) of a 2-D ``x``: ``x ~ q * scale``."""
    x = x.contiguous()
    m, n = x.shape
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(n)
        _quantize_rows[(m,)](x, q, s, n, FMAX=FP8_MAX, BLOCK=block,
                             num_warps=min(16, max(1, block // 256)))
    return q, s


class FP8Linear:
    """``fp8_linear(x, weight, weight_scale, bias)`` for 2-D ``x``: the weight laid out
    once as the column-major (K, N) operand ``_scaled_mm`` takes, its scales as (1, N)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        self.weight_t = weight.t()  # (K, N), column-major: a view of the (N, K) rows
        self.scale = weight_scale.float().reshape(1, -1).contiguous()

    @staticmethod
    def supported(k: int) -> bool:
        return 0 < k <= _MAX_ROW

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q, s = quantize_rows(x)
        return torch._scaled_mm(q, self.weight_t, s, self.scale, bias=bias, out_dtype=x.dtype)
