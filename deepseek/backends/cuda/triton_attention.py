"""A Triton attention kernel for short sequences and few heads (batch-1 transformers).

``scaled_dot_product_attention(q, k, v, mask, is_causal, scale)`` in bf16/fp16:
one program per (batch, head, block of ``block_m`` queries), keys and values
streamed in blocks of ``block_n`` with an online softmax in float32 (the flash
attention recurrence). PyTorch's flash and cuDNN kernels tile 64-128 queries
per program: BERT-base at batch 1 (12 heads, 128 tokens) gives them 12-24
programs for 132 SMs. With 16 queries per program this kernel runs 96. Which
kernel runs is a measured choice (``autotune.py``).

The output is laid out (batch, seq, heads, dim) in memory, as flash attention
lays out its own, so the usual ``transpose(1, 2).reshape(b, s, h * d)`` that
follows is a view. Runs under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


@triton.jit
def _attention(Q, K, V, M, O, qk_scale, H, GROUP, SQ, SK,
               sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
               smb, smh, sms, smk, sob, soh, sos, sod,
               HEAD: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # MASK: 0 none, 1 additive (float), 2 boolean (True keeps)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP  # grouped-query attention: GROUP query heads share a key/value head
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    cols0 = tl.arange(0, BLOCK_N)
    row_ok = rows < SQ
    dim_ok = dims < HEAD
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :] * sqd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    end = SK
    if CAUSAL:  # key j is seen by query i when j <= i (PyTorch's top-left alignment)
        end = tl.minimum(SK, (pid_m + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        cols = start + cols0
        col_ok = cols < SK
        k = tl.load(K + b * skb + hk * skh + cols[None, :] * sks + dims[:, None] * skd,
                    mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
        s = tl.dot(q, k) * qk_scale  # log2 units: exp2 below
        keep = col_ok[None, :] & row_ok[:, None]
        if MASK == 1:
            s += tl.load(M + b * smb + h * smh + rows[:, None] * sms + cols[None, :] * smk,
                         mask=keep, other=0.0).to(tl.float32) * 1.4426950408889634
        if MASK == 2:
            keep = keep & (tl.load(M + b * smb + h * smh + rows[:, None] * sms
                                   + cols[None, :] * smk, mask=keep, other=0) != 0)
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + hk * svh + cols[:, None] * svs + dims[None, :] * svd,
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]  # a row that sees no key: 0/0, NaN, as PyTorch's kernels give
    tl.store(O + b * sob + h * soh + rows[:, None] * sos + dims[None, :] * sod,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


class Attention:
    """SDPA for one set of shapes with ``block_m`` queries and ``block_n`` keys a step."""

    def __init__(self, block_m: int = 16, block_n: int = 64, warps: int = 4, stages: int = 2):
        self.block_m, self.block_n, self.warps, self.stages = block_m, block_n, warps, stages

    def __repr__(self) -> str:
        return f"Attention(block_m={self.block_m}, block_n={self.block_n}, warps={self.warps})"

    @staticmethod
    def supported(q, k, v, mask, dropout_p: float = 0.0, enable_gqa: bool = False) -> bool:
        """q (B, H, Sq, D), k/v (B, Hk, Sk, D) in bf16/fp16 with H % Hk == 0 (Hk < H only
        with ``enable_gqa``), D <= 256, a mask broadcastable to (B, H, Sq, Sk), no dropout."""
        if dropout_p or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            return False
        b, h, sq, d = q.shape
        hk = k.shape[1]
        if not (q.dtype in _DTYPES and k.dtype == v.dtype == q.dtype and d <= 256
                and k.shape[0] == v.shape[0] == b and v.shape[1] == hk and k.shape[3] == d
                and v.shape[3] == d and k.shape[2] == v.shape[2] and h % hk == 0
                and (hk == h or enable_gqa)):
            return False
        if mask is not None:
            try:
                torch.broadcast_shapes(mask.shape, (b, h, sq, k.shape[2]))
            except RuntimeError:
                return False
            return mask.dim() <= 4 and (mask.dtype == torch.bool or mask.dtype in
                                        (torch.float32, *_DTYPES))
        return True

    def __call__(self, q, k, v, mask=None, is_causal: bool = False,
                 scale: float | None = None) -> torch.Tensor:
        b, h, sq, d = q.shape
        sk = k.shape[2]
        out = torch.empty(b, sq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        kind = 0 if mask is None else (2 if mask.dtype == torch.bool else 1)
        m = mask.expand(b, h, sq, sk) if mask is not None else q  # q: an unread placeholder
        ms = m.stride() if mask is not None else (0, 0, 0, 0)
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        grid = (triton.cdiv(sq, self.block_m), b * h)
        _attention[grid](q, k, v, m, out, scale * _LOG2E, h, h // k.shape[1], sq, sk,
                         *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
                         HEAD=d, MASK=kind, CAUSAL=bool(is_causal), BLOCK_M=self.block_m,
                         BLOCK_N=self.block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
                         num_warps=self.warps, num_stages=self.stages)
        return out
