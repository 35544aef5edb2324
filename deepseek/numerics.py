"""Comparing outputs and making fresh inputs: shared by the CLI, benchmarks and tests."""

from __future__ import annotations

from typing import Sequence

import torch


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b`` (in float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def fresh_like(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """New random inputs of the same shapes and dtypes.

    Floats are drawn fresh; 0/1 integer tensors (attention masks) are kept;
    other integers (token ids) are redrawn in [2, their max].
    """
    out = []
    for t in inputs:
        if t.is_floating_point():
            out.append(torch.randn_like(t))
        elif t.max() <= 1 and t.min() >= 0:
            out.append(t.clone())
        else:
            out.append(torch.randint(2, int(t.max()) + 1, t.shape, dtype=t.dtype))
    return tuple(out)
