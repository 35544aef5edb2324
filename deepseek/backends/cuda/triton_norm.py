"""Triton kernels for the normalization nodes: ``deepseek::add_layer_norm`` (residual add
and layer norm in one pass) and ``deepseek::fused_rms_norm``.

One program per row: the row is loaded once and normalized from registers with
float32 statistics; intermediate values are rounded to the tensor's dtype
exactly where PyTorch's op-by-op reference rounds them (the residual sum; the
normalized row before the RMS weight). Runs under Triton's interpreter too
(``TRITON_INTERPRET=1``), on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_ROW = 16384  # longer rows fall back to PyTorch (one row must fit in registers)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _add_layer_norm(X, R, W, B, S, Y, Y2, N, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    HAS_Y2: tl.constexpr, HAS_S: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    offs = row * N + cols
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(S.dtype.element_ty)  # rounded as PyTorch's add rounds it, stored or not
    if HAS_S:
        tl.store(S + offs, s, mask=mask)
    s = s.to(tl.float32)
    mean = tl.sum(s, axis=0) / N
    d = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
    y = d * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=1.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if HAS_Y2:  # the normalized row once more, in another dtype (a GEMM's bf16 input)
        tl.store(Y2 + offs, y.to(Y2.dtype.element_ty), mask=mask)


class AddLayerNorm:
    """``(x + r, layer_norm(x + r))`` over rows of ``n`` elements, as one kernel launch."""

    def __init__(self, n: int, eps: float):
        self.n, self.eps = n, float(eps)
        self.block = triton.next_power_of_2(n)
        self.warps = min(16, max(1, self.block // 256))

    @staticmethod
    def supported(n: int, dtypes) -> bool:
        return 0 < n <= _MAX_ROW and all(d in _FLOAT_DTYPES for d in dtypes)

    def __call__(self, x: torch.Tensor, r: torch.Tensor, w: torch.Tensor | None,
                 b: torch.Tensor | None, y_dtype: torch.dtype | None = None,
                 also: torch.dtype | None = None, keep_sum: bool = True) -> tuple:
        """(sum, normalized) and, with ``also``, the normalized rows in that dtype too.
        ``y_dtype`` overrides the normalized rows' dtype (default: the sum's). Without
        ``keep_sum`` the sum is not written (None in its place): a post-norm block (BERT)
        reads only the normalized rows, and the sum was a third of the kernel's traffic."""
        x, r = x.contiguous(), r.contiguous()
        dtype = torch.promote_types(x.dtype, r.dtype)  # a bf16 output into a float32 residual
        s = torch.empty_like(x, dtype=dtype) if keep_sum else self._scratch(dtype, x.device)
        y = torch.empty_like(x, dtype=y_dtype or dtype)
        y2 = torch.empty_like(x, dtype=also) if also is not None else None
        rows = x.numel() // self.n
        if rows:
            _add_layer_norm[(rows,)](x, r, w if w is not None else x, b if b is not None else x,
                                     s, y, y2 if y2 is not None else y, self.n, self.eps,
                                     HAS_W=w is not None, HAS_B=b is not None,
                                     HAS_Y2=y2 is not None, HAS_S=keep_sum, BLOCK=self.block,
                                     num_warps=self.warps)
        s = s if keep_sum else None
        return (s, y) if y2 is None else (s, y, y2)

    def _scratch(self, dtype: torch.dtype, device) -> torch.Tensor:
        """A one-element stand-in for an unwritten sum: the kernel reads its dtype only."""
        key = (dtype, str(device))
        cache = self.__dict__.setdefault("_scratches", {})
        if key not in cache:
            cache[key] = torch.empty(1, dtype=dtype, device=device)
        return cache[key]


@triton.jit
def _rms_norm(X, W, Y, N, eps, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    offs = row * N + cols
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    h = (x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)).to(Y.dtype.element_ty)
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=1.0).to(tl.float32)
        h = (w * h.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + offs, h, mask=mask)


class RMSNorm:
    """``deepseek::fused_rms_norm`` over rows of ``n`` elements, as one kernel launch."""

    def __init__(self, n: int, eps: float):
        self.n, self.eps = n, float(eps)
        self.block = triton.next_power_of_2(n)
        self.warps = min(16, max(1, self.block // 256))

    supported = staticmethod(AddLayerNorm.supported)

    def __call__(self, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        rows = x.numel() // self.n
        if rows:
            _rms_norm[(rows,)](x, w if w is not None else x, y, self.n, self.eps,
                               HAS_W=w is not None, BLOCK=self.block, num_warps=self.warps)
        return y
