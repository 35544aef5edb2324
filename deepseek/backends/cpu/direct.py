"""Direct float32 convolutions for layers with few input channels (a network's first
layer), with bias, ReLU and a following 2x2 max pool applied as the output is written
(``direct.c``: NHWC memory, two neighbouring pixels and 32 output channels at a time
in vector registers).

For one input channel oneDNN and ATen run at a few GFLOP/s (their kernels block over
input channels) and the gather + GEMM lowering copies each pixel nine times; this
kernel reads the input once per tap and writes only the pooled result.
"""

from __future__ import annotations

import ctypes

import torch

from deepseek.backends.cpu import native

MAX_IN_CHANNELS = 4  # beyond this, GEMM-based kernels win


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be built (no C compiler)."""
    p = ctypes.c_void_p
    return native.library("direct", {"ds_conv_direct": ([p, p, p, p, p, ctypes.c_int], None)})


class DirectConv:
    """``conv2d(x, weight, bias, stride, padding)`` for inputs of ``in_shape`` (N, C, H, W),
    dilation 1, one group; then ReLU with ``relu`` and a 2x2 stride-2 max pool (floor)
    with ``pool``. The result is channels-last."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                 in_shape, relu: bool = False, pool: bool = False):
        self.lib = library()
        n, c, h, w = in_shape
        k, _, kh, kw = weight.shape
        oh = (h + 2 * padding[0] - kh) // stride[0] + 1
        ow = (w + 2 * padding[1] - kw) // stride[1] + 1
        self.out_hw = (oh // 2, ow // 2) if pool else (oh, ow)
        self.params = torch.tensor([n, h, w, c, k, kh, kw, *stride, *padding, *self.out_hw,
                                    int(relu), int(pool)], dtype=torch.int32)
        kp = -(-k // 8) * 8
        wt = torch.zeros(kh, kw, c, kp)
        wt[..., :k] = weight.detach().float().permute(2, 3, 1, 0)
        self.weight = wt.contiguous()
        self.bias = None
        if bias is not None:
            self.bias = torch.zeros(kp)
            self.bias[:k] = bias.detach().float()
        self.shape = (n, k) + self.out_hw

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of ``x``, written into ``out`` (channels-last, of the result's
        shape) where given, else into a new tensor."""
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.empty(self.shape, memory_format=torch.channels_last) if out is None else out
        self.lib.ds_conv_direct(x.data_ptr(), self.weight.data_ptr(),
                                0 if self.bias is None else self.bias.data_ptr(), y.data_ptr(),
                                self.params.data_ptr(), torch.get_num_threads())
        return y
