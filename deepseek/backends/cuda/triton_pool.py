"""2-D max pooling as one Triton kernel on channels-last memory: for int8/uint8 tensors
(CUDA's ATen pools floats only; an int8 ResNet's stem pools its quantized output) and for
floats (a candidate against ATen's kernel, which ran bf16 ResNet-50's stem pool at 21% of
an H100's memory bandwidth). Each program takes BLOCK outputs, channels innermost, so
loads and stores are contiguous. Runs under Triton's interpreter too
(``TRITON_INTERPRET=1``), on CPU tensors."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek.ir.ops import pool2d_attrs


@triton.jit
def _max_pool(X, Y, N, C, H, W, OH, OW, SH, SW, PH, PW, DH, DW, LOWEST: tl.constexpr,
              ACC: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    c = offs % C
    t = offs // C
    ow = t % OW
    t = t // OW
    oh = t % OH
    nb = t // OH
    best = tl.full([BLOCK], LOWEST, ACC)
    for kh in tl.static_range(KH):
        ih = oh * SH - PH + kh * DH
        for kw in tl.static_range(KW):
            iw = ow * SW - PW + kw * DW
            ok = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            v = tl.load(X + ((nb * H + ih) * W + iw) * C + c, mask=ok, other=LOWEST).to(ACC)
            best = tl.where((v > best) | (v != v), v, best)  # a NaN wins and stays
    tl.store(Y + offs, best.to(Y.dtype.element_ty), mask=mask)


def max_pool2d(x: torch.Tensor, kernel_size, stride, padding=0, dilation=1,
               ceil_mode: bool = False) -> torch.Tensor:
    """2-D max pooling of an int8/uint8 or float tensor, on and into channels-last
    memory; a window's padded positions never win and a NaN propagates, as in PyTorch."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pool2d_attrs(kernel_size, stride, padding, dilation)
    n, c, h, w = x.shape
    meta = torch.nn.functional.max_pool2d(torch.empty(x.shape, device="meta"), (kh, kw),
                                          (sh, sw), (ph, pw), (dh, dw), ceil_mode)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.empty(meta.shape, dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    floating = x.dtype.is_floating_point
    total = y.numel()
    if total:
        _max_pool[(triton.cdiv(total, 1024),)](
            x, y, total, c, h, w, y.shape[2], y.shape[3], sh, sw, ph, pw, dh, dw,
            LOWEST=float("-inf") if floating else torch.iinfo(x.dtype).min,
            ACC=tl.float32 if floating else tl.int32, KH=kh, KW=kw, BLOCK=1024, num_warps=4)
    return y
