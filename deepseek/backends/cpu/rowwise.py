"""One-pass float32 kernels in C (``rowwise.c``) for what PyTorch does in several passes:
the tanh GELU and a transformer's residual add + layer norm.

Against float64: the GELU's error is ATen's (5e-7 absolute), the layer norm's 6e-8
relative (ATen's 5e-8); the residual sum is bitwise ATen's. 128 x 3072 GELU on an
AVX2 EPYC, 2 threads: 0.27 ms against 0.36 for four ATen passes and 0.70 for ATen's
tanh GELU; 128 x 768 add + layer norm 0.030 ms against 0.040.
"""

from __future__ import annotations

import ctypes

import torch

from deepseek.backends.cpu import native


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (no C compiler)."""
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    return native.library("rowwise", {
        "ds_gelu_tanh": ([p, p, n, i], None),
        "ds_add_layer_norm": ([p, p, p, p, p, p, n, i, ctypes.c_float, i], None)})


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU of a contiguous float32 tensor, in one pass (a new tensor)."""
    y = torch.empty_like(x)
    library().ds_gelu_tanh(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
    return y


def add_layer_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + r, layer_norm(x + r) over the last dim) of contiguous float32 tensors."""
    s, y = torch.empty_like(x), torch.empty_like(x)
    cols = x.shape[-1]
    library().ds_add_layer_norm(x.data_ptr(), r.data_ptr(),
                                0 if weight is None else weight.data_ptr(),
                                0 if bias is None else bias.data_ptr(), s.data_ptr(),
                                y.data_ptr(), x.numel() // cols, cols, eps,
                                torch.get_num_threads())
    return s, y
