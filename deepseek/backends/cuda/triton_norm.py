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
def _lo_scale(hi):
    """The step of a split value's low byte: 2^(e-14) for a bf16 ``hi`` of exponent e
    (128 steps per bf16 ulp, whatever rounding made ``hi``); 0 for zero and denormals,
    finite for infinities."""
    bits = tl.minimum(hi.to(tl.int32, bitcast=True) & 0x7F800000, 0x7F000000)
    return bits.to(tl.float32, bitcast=True) * (1.0 / 16384.0)


@triton.jit
def _store_split(HI, LO, offs, mask, v):
    """``v`` as a bf16 high part and an int8 low part (see ``AddLayerNorm``)."""
    hi = v.to(tl.bfloat16)
    h = hi.to(tl.float32)
    scale = _lo_scale(h)
    t = tl.where(scale > 0, (v - h) / tl.where(scale > 0, scale, 1.0), 0.0)
    t = tl.where(t == t, t, 0.0)  # NaN and infinite rows: the high part says it all
    t = tl.minimum(tl.maximum(t, -127.0), 127.0)
    tl.store(HI + offs, hi, mask=mask)
    tl.store(LO + offs, tl.where(t >= 0, t + 0.5, t - 0.5).to(tl.int8), mask=mask)


@triton.jit
def _add_layer_norm(X, R, RLO, W, B, S, SLO, Y, YLO, Y2, N, eps, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, HAS_Y2: tl.constexpr, HAS_S: tl.constexpr,
                    R_SPLIT: tl.constexpr, S_SPLIT: tl.constexpr, Y_SPLIT: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    offs = row * N + cols
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    if R_SPLIT:
        r = r + tl.load(RLO + offs, mask=mask, other=0).to(tl.float32) * _lo_scale(r)
    s = x + r
    if S_SPLIT:
        _store_split(S, SLO, offs, mask, s)
    else:
        s = s.to(S.dtype.element_ty)  # rounded as PyTorch's add rounds it, stored or not
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
    if Y_SPLIT:
        _store_split(Y, YLO, offs, mask, y)
    else:
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if HAS_Y2:  # the normalized row once more, in another dtype (a GEMM's bf16 input)
        tl.store(Y2 + offs, y.to(Y2.dtype.element_ty), mask=mask)


def _or(t: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """A kernel argument that the kernel does not touch when ``t`` is None."""
    return other if t is None else t


class AddLayerNorm:
    """``(x + r, layer_norm(x + r))`` over rows of ``n`` elements, as one kernel launch.

    A float32 operand or result can be kept *split*: a bf16 high part (the value
    rounded to bf16) and an int8 low part holding the remainder in steps of 1/128 of
    the high part's bf16 ulp. That is 3 bytes an element instead of 4 with 15-16
    significant bits instead of 24, and the high part is exactly the bf16 copy a GEMM
    reads. A split value travels as a ``(high, low)`` pair. bf16 plans keep the
    transformer residual stream in float32 for accuracy; split, each of its norms
    moves 8-10 bytes an element instead of 12 (``CUDAEmitter.split_residual``).
    """

    def __init__(self, n: int, eps: float):
        self.n, self.eps = n, float(eps)
        self.block = triton.next_power_of_2(n)
        self.warps = min(16, max(1, self.block // 256))

    @staticmethod
    def supported(n: int, dtypes) -> bool:
        return 0 < n <= _MAX_ROW and all(d in _FLOAT_DTYPES for d in dtypes)

    def __call__(self, x, r, w: torch.Tensor | None, b: torch.Tensor | None,
                 y_dtype: torch.dtype | None = None, also: torch.dtype | None = None,
                 keep_sum: bool = True, split: str | None = None) -> tuple:
        """(sum, normalized) and, with ``also``, the normalized rows in that dtype too.
        ``y_dtype`` overrides the normalized rows' dtype (default: the sum's). Without
        ``keep_sum`` the sum is not written (None in its place): a post-norm block (BERT)
        reads only the normalized rows, and the sum was a third of the kernel's traffic.
        ``x`` or ``r`` may be a split pair; ``split="sum"`` or ``"y"`` returns that
        float32 result split (with ``also=torch.bfloat16``, the bf16 rows are its high
        part)."""
        if isinstance(x, tuple):
            x, r = r, x
        r_hi, r_lo = r if isinstance(r, tuple) else (r, None)
        x, r_hi = x.contiguous(), r_hi.contiguous()
        # a bf16 output into a float32 residual: the sum is float32 (a split one is)
        dtype = torch.promote_types(x.dtype, torch.float32 if r_lo is not None else r_hi.dtype)
        y_dtype = y_dtype or dtype
        kept = dtype if split == "sum" else y_dtype
        if split is not None and (kept != torch.float32 or also not in (None, torch.bfloat16)
                                  or (split == "sum" and not keep_sum)):
            raise ValueError(f"split={split!r} needs a kept float32 result and bf16 copies")

        def out(dtype, parted):  # a result tensor, or a split pair's two parts
            if parted:
                return (torch.empty_like(x, dtype=torch.bfloat16),
                        torch.empty_like(x, dtype=torch.int8))
            return torch.empty_like(x, dtype=dtype)

        s = out(dtype, split == "sum") if keep_sum else self._scratch(dtype, x.device)
        y = out(y_dtype, split == "y")
        y2 = None if also is None or split == "y" else torch.empty_like(x, dtype=also)
        s_hi, s_lo = s if split == "sum" else (s, None)
        y_hi, y_lo = y if split == "y" else (y, None)
        rows = x.numel() // self.n
        if rows:
            _add_layer_norm[(rows,)](
                x, r_hi, _or(r_lo, x), _or(w, x), _or(b, x), s_hi, _or(s_lo, x), y_hi,
                _or(y_lo, x), _or(y2, x), self.n, self.eps, HAS_W=w is not None,
                HAS_B=b is not None, HAS_Y2=y2 is not None, HAS_S=keep_sum,
                R_SPLIT=r_lo is not None, S_SPLIT=split == "sum", Y_SPLIT=split == "y",
                BLOCK=self.block, num_warps=self.warps)
        s = s if keep_sum else None
        if also is None:
            return s, y
        return s, y, y_hi if split == "y" else y2

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
