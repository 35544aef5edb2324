"""3x3 float32 convolutions through Winograd's minimal filtering: F(4x4, 3x3) does 4x
fewer multiplications than the direct convolution (36 per 4x4 output tile and channel
pair instead of 144), F(2x2, 3x3) 2.25x fewer (16 instead of 36) with smaller
transformed weights, which suits small images whose convolutions stream their weights.

The input and output transforms are C kernels (``winograd.c``, NHWC memory, the
padding read as zeros, bias and ReLU applied as the output is written); between them
one batched GEMM (MKL) over the transform points multiplies the tiles by the weight,
transformed once in float64. Against a float64 reference the error stays that of
float32 arithmetic: 1-2e-6 relative for F(4x4, 3x3) on ResNet-50's layer shapes, where
the direct convolution's is 0.5-1.4e-6.
"""

from __future__ import annotations

import ctypes

import torch

from deepseek.backends.cpu import native

# the weight transforms G (Lavin & Gray, 2015; F(4x4, 3x3) with points 0, +-1, +-2)
_G = {4: torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                       [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
                      dtype=torch.float64),
      2: torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
                      dtype=torch.float64)}
TILES = tuple(_G)


def library() -> ctypes.CDLL | None:
    """The compiled transforms, or None where they cannot be built (no C compiler)."""
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    return native.library("winograd", {"ds_wino_input": ([i, p, p, n] + [i] * 9, None),
                                       "ds_wino_output": ([i, p, n, p, p] + [i] * 9, None)})


class WinogradConv:
    """``conv2d(x, weight, bias, padding=padding)`` (then ReLU with ``relu``) for inputs of
    ``in_shape`` (N, C, H, W) through F(``tile`` x ``tile``, 3x3): stride 1, dilation 1,
    one group; with ``pool``, a 2x2 stride-2 max pool (floor) after; the result in
    channels-last memory. A call takes its scratch: ``v`` of
    ``v_shape`` (the transformed input) and ``m`` of ``m_shape`` (the GEMM's result),
    float32 and contiguous."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, padding, in_shape,
                 relu: bool = False, tile: int = 4, pool: bool = False):
        self.lib = library()
        n, c, h, w = in_shape
        k = weight.shape[0]
        self.tile, self.pad = tile, tuple(padding)
        self.out_hw = (h + 2 * self.pad[0] - 2, w + 2 * self.pad[1] - 2)
        self.tiles = (-(-self.out_hw[0] // tile), -(-self.out_hw[1] // tile))
        t, points = n * self.tiles[0] * self.tiles[1], (tile + 2) ** 2
        self.dims = (n, c, h, w, k)
        self.v_shape, self.m_shape = (points, t, c), (points, t, k)
        g = _G[tile]
        u = torch.einsum("ai,kcij,bj->abck", g, weight.detach().double(), g)
        self.weight = u.reshape(points, c, k).float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.relu, self.pool = int(relu), int(pool)
        self.shape = (n, k) + ((self.out_hw[0] // 2, self.out_hw[1] // 2) if pool else self.out_hw)

    def scratch_bytes(self) -> int:
        points, t, c = self.v_shape
        return 4 * points * t * (c + self.m_shape[2])

    def __call__(self, x: torch.Tensor, v: torch.Tensor, m: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of ``x``, written into ``out`` (channels-last, of the output's
        shape) where given, else into a new tensor."""
        n, c, h, w, k = self.dims
        threads = torch.get_num_threads()
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op on channels-last input
        y = torch.empty(self.shape, memory_format=torch.channels_last) if out is None else out
        self.lib.ds_wino_input(self.tile, x.data_ptr(), v.data_ptr(), v.stride(0), n, h, w, c,
                               self.pad[0], self.pad[1], self.tiles[0], self.tiles[1], threads)
        torch.bmm(v, self.weight, out=m)
        self.lib.ds_wino_output(self.tile, m.data_ptr(), m.stride(0),
                                0 if self.bias is None else self.bias.data_ptr(),
                                y.data_ptr(), n, self.out_hw[0], self.out_hw[1], k,
                                self.tiles[0], self.tiles[1], self.relu, self.pool, threads)
        return y
