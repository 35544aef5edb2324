"""Bias correction for static PTQ: quantization shifts the mean of a layer's output
(rounding errors do not average out per channel, and clipped activations lose their
tails); adding the shift back to the bias removes it.

Layer by layer in the model's order, the mean output of each quantized layer over the
calibration data is measured in the float model and in the quantized one (whose earlier
layers are already corrected), and the per-channel difference is added to the quantized
layer's bias. Afterwards every corrected layer's mean output on the calibration data is
the float model's. One pass of the float model, and per layer one of the quantized
model up to that layer.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn as nn

from deepseek.quantization.modules import QuantizedConv2d, QuantizedLinear

log = logging.getLogger(__name__)


def _channel_mean(y: torch.Tensor, conv: bool) -> torch.Tensor:
    """Mean over everything but the output channels (dim 1 of a convolution's output,
    the last dim of a linear's), in float64."""
    y = y.detach().double()
    if conv:
        return y.transpose(0, 1).reshape(y.shape[1], -1).mean(1)
    return y.reshape(-1, y.shape[-1]).mean(0)


class _Reached(Exception):
    """Raised by the hook of the only layer measured: the rest of the forward is not needed."""


def _output_means(model: nn.Module, names: list[str], data: list, call) -> dict:
    """{name: mean output per channel of module ``name`` over ``data``}. For one name,
    each forward stops at that module (its outputs are all that is read)."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:
        conv = isinstance(model.get_submodule(n), (nn.Conv2d, QuantizedConv2d))

        def hook(module, args, out, n=n, conv=conv):
            m = _channel_mean(out, conv)
            sums[n] = sums[n] + m if n in sums else m
            if len(names) == 1:
                raise _Reached
        hooks.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in data:
                try:
                    call(model, batch)
                except _Reached:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return {n: s / len(data) for n, s in sums.items()}


def correct_biases(float_model: nn.Module, qmodel: nn.Module, names: list[str],
                   data: Iterable, call) -> dict[str, float]:
    """Correct the biases of ``qmodel``'s quantized layers ``names`` (in place, in the
    model's order) against ``float_model`` over the batches ``data``; ``call(model,
    batch)`` runs one batch. Returns {name: largest absolute shift}."""
    data = list(data)
    order = [n for n, m in qmodel.named_modules() if n in names
             and isinstance(m, (QuantizedConv2d, QuantizedLinear))]
    target = _output_means(float_model, order, data, call)
    shifts = {}
    for n in order:
        layer = qmodel.get_submodule(n)
        if n not in target:  # not reached by the calibration data
            continue
        shift = (target[n] - _output_means(qmodel, [n], data, call)[n]).float()
        layer.bias = shift if layer.bias is None else layer.bias + shift
        shifts[n] = float(shift.abs().max())
    log.info("bias correction: %d layers, largest shift %.3g", len(shifts),
             max(shifts.values(), default=0.0))
    return shifts
