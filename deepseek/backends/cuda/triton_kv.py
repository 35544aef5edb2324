"""Triton kernel writing new keys and values into a KV cache in one launch.

A decoding step updates each layer's key and value caches at the same
positions: two ``index_put_`` kernels of a few microseconds each, mostly
launch latency. ``KVWrite`` does both in one kernel: one program per
(batch, head, new token) copies that token's key row and value row to
position ``idx[token]`` of the caches, shaped (batch, heads, length,
head_dim). Runs under Triton's interpreter too (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write(K, V, KN, VN, IDX, H, T, S, D,
              ks0, ks1, ks2, ks3, vs0, vs1, vs2, vs3, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    t = p % T
    bh = p // T
    h = bh % H
    b = bh // H
    pos = tl.load(IDX + t)
    pos = tl.where(pos < 0, pos + S, pos)
    d = tl.arange(0, BLOCK)
    inside = (pos >= 0) & (pos < S)  # an index out of range writes nothing
    ok = (d < D) & (tl.zeros([BLOCK], dtype=tl.int32) + inside.to(tl.int32) != 0)
    dst = (bh.to(tl.int64) * S + pos) * D + d
    k = tl.load(KN + b * ks0 + h * ks1 + t * ks2 + d * ks3, mask=ok)
    v = tl.load(VN + b * vs0 + h * vs1 + t * vs2 + d * vs3, mask=ok)
    tl.store(K + dst, k, mask=ok)
    tl.store(V + dst, v, mask=ok)


class KVWrite:
    """``k_cache[:, :, idx] = k_new; v_cache[:, :, idx] = v_new`` as one kernel launch."""

    @staticmethod
    def supported(cache_shape, new_shape, dtypes) -> bool:
        return (len(cache_shape) == 4 and len(new_shape) == 4
                and tuple(cache_shape[:2]) == tuple(new_shape[:2])
                and cache_shape[3] == new_shape[3] and cache_shape[3] <= 4096
                and len(set(dtypes)) == 1)

    def __call__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, idx: torch.Tensor,
                 k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):  # the general path
            torch.ops.aten.index_put_.default(k_cache, [None, None, idx], k_new)
            torch.ops.aten.index_put_.default(v_cache, [None, None, idx], v_new)
            return k_cache
        b, h, s, d = k_cache.shape
        t = k_new.shape[2]
        if b * h * t:
            _kv_write[(b * h * t,)](k_cache, v_cache, k_new, v_new, idx.contiguous(), h, t, s, d,
                                    *k_new.stride(), *v_new.stride(),
                                    BLOCK=triton.next_power_of_2(d))
        return k_cache
