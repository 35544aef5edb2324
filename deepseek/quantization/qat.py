"""Quantization-aware training: fake quantization with a straight-through estimator.

    q = Quantizer(QuantConfig(method="symmetric"))
    qat_model = q.prepare_qat(model, calibration_batches)   # training mode, fake-quantized
    ... train qat_model with any loop ...
    quantized = q.convert(qat_model)                         # int8 weights, QDQ activations

Fake quantization rounds in the forward pass and passes gradients straight
through inside the clipping range (zero outside). With learnable scales the
same expression gives LSQ's scale gradient (Esser et al., 2020), scaled by
``1 / sqrt(numel * qmax)``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from deepseek.quantization.config import QuantizationError
from deepseek.quantization.modules import (QuantizedActivation, QuantizedWeight,
                                           effective_granularity, is_quantizable, layer_names,
                                           quantized_module)
from deepseek.quantization.observers import QRange, choose_qparams, qrange, weight_qparams


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, r: QRange,
                      grad_scale: float = 1.0) -> torch.Tensor:
    """``(clamp(round(x / s) + z) - z) * s`` with a straight-through round."""
    s = scale if grad_scale == 1.0 else (scale - scale * grad_scale).detach() + scale * grad_scale
    xs = x / s
    q = torch.clamp(xs + (torch.round(xs) - xs).detach() + zero_point, r.qmin, r.qmax)
    return (q - zero_point) * s


class FakeQuantize(nn.Module):
    """Fake quantization of an activation (per tensor, ``EMA`` min/max observer while
    training, unless calibrated) or of a weight (per tensor / channel / group,
    qparams from the current weight), with optionally learnable scales."""

    def __init__(self, r: QRange, symmetric: bool, weight: bool, granularity: str = "per_tensor",
                 group_size: int = 128, learnable: bool = False, momentum: float = 0.01):
        super().__init__()
        self.r, self.symmetric, self.weight = r, symmetric, weight
        self.granularity, self.group_size = granularity, group_size
        self.learnable, self.momentum = learnable, momentum
        self.observing = True
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        if learnable:
            self.scale = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("scale", torch.ones(1))
        self.initialized = False

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        with torch.no_grad():
            if self.learnable:  # in place: an optimizer may already hold this parameter
                self.scale.data = scale.detach().float().clone()
            else:
                self.scale = scale.detach().float().clone()
            self.zero_point = zero_point.detach().to(torch.int32).clone()
        self.initialized = True

    def _observe(self, x: torch.Tensor) -> None:
        if self.weight:
            g = effective_granularity(x, self.granularity, self.group_size)
            self.set_qparams(*weight_qparams(x.detach(), self.r, self.symmetric, g,
                                             self.group_size))
            return
        lo, hi = x.detach().min(), x.detach().max()
        if not self.initialized:
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)
        self.set_qparams(*choose_qparams(self.min_val.reshape(1), self.max_val.reshape(1), self.r,
                                         self.symmetric))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weights: qparams follow the current weight; activations: observed while training
        if self.observing and (self.weight or self.training or not self.initialized) and \
                not (self.learnable and self.initialized):
            self._observe(x)
        s, z = self.scale, self.zero_point.float()
        g = 1.0 / math.sqrt(max(1, x.numel() // max(1, s.numel())) * self.r.qmax) \
            if self.learnable else 1.0
        if not self.weight or s.numel() == 1:
            return fake_quantize_ste(x, s.reshape(()) if s.numel() == 1 else s,
                                     z.reshape(()) if z.numel() == 1 else z, self.r, g)
        n = x.shape[0]
        if s.dim() == 2:  # per group
            y = fake_quantize_ste(x.reshape(-1, self.group_size), s.reshape(-1, 1),
                                  z.reshape(-1, 1), self.r, g)
            return y.reshape(x.shape)
        shape = (n,) + (1,) * (x.dim() - 1)
        return fake_quantize_ste(x, s.reshape(shape), z.reshape(shape), self.r, g)

    def extra_repr(self) -> str:
        return (f"{'weight' if self.weight else 'activation'}, [{self.r.qmin}, {self.r.qmax}], "
                f"{'learnable' if self.learnable else 'observed'}")


class QATLayer(nn.Module):
    """A float Linear or Conv2d with fake-quantized input and weight."""

    def __init__(self, module: nn.Module, weight_fq: FakeQuantize, input_fq: FakeQuantize | None):
        super().__init__()
        self.module = module
        self.weight_fq = weight_fq
        self.input_fq = input_fq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.input_fq is not None:
            x = self.input_fq(x)
        w = self.weight_fq(m.weight)
        if isinstance(m, nn.Conv2d):
            return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w, m.bias)


def prepare_qat(quantizer, model: nn.Module, calibration_data: Iterable | None,
                learnable_scales: bool) -> nn.Module:
    """See :meth:`Quantizer.prepare_qat`."""
    from deepseek.quantization.quantizer import set_submodule

    c = quantizer.config
    if c.dynamic:
        raise QuantizationError("QAT learns fixed activation ranges; calibration='dynamic' has "
                                "no QAT form: pick a static calibrator (e.g. 'minmax') for QAT")
    float_model = quantizer.prepare(model)
    names = layer_names(float_model, quantizer.targets(float_model))  # embeddings: PTQ only
    static = c.activation_bits is not None
    calibrators = quantizer.calibrate(float_model, names, calibration_data) \
        if static and calibration_data is not None else {}
    granularity = c.granularity if not static else (
        "per_channel" if c.granularity == "per_group" else c.granularity)
    for n in names:
        m = float_model.get_submodule(n)
        wfq = FakeQuantize(qrange(c.weight_bits, c.weight_symmetric, weight=True),
                           c.weight_symmetric, True,
                           granularity, c.group_size, learnable_scales)
        wfq(m.weight)  # initial qparams from the trained weight
        wfq.observing = not learnable_scales
        afq = None
        if static:
            afq = FakeQuantize(qrange(c.activation_bits, c.symmetric, weight=False), c.symmetric,
                               False, learnable=learnable_scales)
            if n in calibrators:
                afq.set_qparams(*calibrators[n].qparams())
                afq.observing = False  # calibrated: fixed, or learned
        set_submodule(float_model, n, QATLayer(m, wfq, afq))
    return float_model.train()


def convert(quantizer, model: nn.Module) -> nn.Module:
    """See :meth:`Quantizer.convert`: each QATLayer becomes its quantized module, with
    the scales the training ended with."""
    from deepseek.quantization.quantizer import set_submodule

    c = quantizer.config
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QATLayer)]
    if not layers:
        raise ValueError("convert() found no QAT layers: give the model prepare_qat returned")
    for name, layer in layers:
        m, wfq, afq = layer.module, layer.weight_fq, layer.input_fq
        if not is_quantizable(m):
            continue
        with torch.no_grad():
            if wfq.observing:
                wfq._observe(m.weight)
            g = effective_granularity(m.weight, wfq.granularity, wfq.group_size)
            weight = QuantizedWeight(m.weight, c.weight_bits, c.weight_symmetric, g, c.group_size,
                                     qparams=(wfq.scale.abs().clamp_min(1e-12), wfq.zero_point))
            act = None
            if afq is not None:
                act = QuantizedActivation(afq.scale.abs().clamp_min(1e-12), afq.zero_point, afq.r,
                                          c.activation_bits)
        set_submodule(model, name, quantized_module(m, weight, act))
    return model.eval()
