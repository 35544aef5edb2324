"""Quantized modules that run in eager PyTorch and capture as QDQ graphs.

Their forward is written with ``torch.ops.quantized_decomposed`` quantize /
dequantize ops around a float ``linear`` / ``conv2d``: eager evaluation shows
the quantized model's accuracy, and ``torch.export`` captures the same ops as
the IR's QDQ nodes, which lowering turns into integer kernels. Weights are
stored as int8 buffers (4-bit values too, one a byte; the compiled graph packs
them two a byte), scales as float32 and zero points as int32.
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines quantized_decomposed ops)
import torch.nn as nn
import torch.nn.functional as F

from deepseek.quantization.kernels import quantize_per_row
from deepseek.quantization.observers import QRange, quantize, qrange, weight_qparams

qd = torch.ops.quantized_decomposed


class QuantizedWeight(nn.Module):
    """An int8-stored weight with its scale/zero point; ``forward()`` returns the
    float weight through a dequantize op (per tensor, per channel or per group)."""

    def __init__(self, weight: torch.Tensor, bits: int, symmetric: bool, granularity: str,
                 group_size: int = 128, search: str = "minmax",
                 qparams: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        w = weight.detach().float()
        granularity = effective_granularity(w, granularity, group_size)
        r = qrange(bits, symmetric, weight=True)
        if qparams is None:  # else: given, e.g. learned by QAT
            qparams = weight_qparams(w, r, symmetric, granularity, group_size, search)
        shape = (w.shape[0], -1) if granularity == "per_group" else (-1,)
        scale, zp = (t.detach().reshape(shape) for t in qparams)
        if granularity == "per_group":
            q = quantize(w.reshape(-1, group_size), scale.reshape(-1, 1), zp.reshape(-1, 1), r)
        else:
            shape = (-1,) + (1,) * (w.dim() - 1) if granularity == "per_channel" else ()
            q = quantize(w, scale.reshape(shape), zp.reshape(shape), r)
        self.register_buffer("qweight", q.reshape(w.shape).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero_point", None if symmetric and granularity != "per_tensor"
                             else zp.to(torch.int32).contiguous())
        self.bits, self.symmetric = bits, symmetric
        self.granularity, self.group_size = granularity, group_size
        self.qmin, self.qmax = r.qmin, r.qmax

    def forward(self) -> torch.Tensor:
        q, s, z = self.qweight, self.scale, self.zero_point
        if self.granularity == "per_tensor":
            return qd.dequantize_per_tensor.tensor(q, s, z, self.qmin, self.qmax, torch.int8)
        if self.granularity == "per_channel":
            return qd.dequantize_per_channel(q, s, z, 0, self.qmin, self.qmax, torch.int8)
        q2 = q if q.dim() == 2 else q.reshape(q.shape[0], -1)
        w = qd.dequantize_per_channel_group(q2, s, z, self.qmin, self.qmax, torch.int8,
                                            self.group_size, torch.float32)
        return w if q.dim() == 2 else w.reshape(q.shape)

    def extra_repr(self) -> str:
        sym = "symmetric" if self.symmetric else "asymmetric"
        g = f", group_size={self.group_size}" if self.granularity == "per_group" else ""
        return f"int{self.bits} {sym} {self.granularity}{g}"


def effective_granularity(w: torch.Tensor, granularity: str, group_size: int) -> str:
    """``per_group`` becomes ``per_channel`` where a group would not split the row."""
    k = w[0].numel()
    if granularity == "per_group" and (k % group_size or k == group_size):
        return "per_channel"
    return granularity


class QuantizedActivation(nn.Module):
    """Quantize then dequantize an activation with a calibrated per-tensor scale."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, r: QRange, bits: int):
        super().__init__()
        self.register_buffer("scale", scale.float().reshape(1).clone())
        self.register_buffer("zero_point", zero_point.to(torch.int32).reshape(1).clone())
        self.qmin, self.qmax, self.dtype, self.bits = r.qmin, r.qmax, r.dtype, bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = qd.quantize_per_tensor.tensor(x, self.scale, self.zero_point, self.qmin, self.qmax,
                                          self.dtype)
        return qd.dequantize_per_tensor.tensor(q, self.scale, self.zero_point, self.qmin,
                                               self.qmax, self.dtype)

    def extra_repr(self) -> str:
        return (f"{'u' if self.dtype == torch.uint8 else ''}int{self.bits}, "
                f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}")


class DynamicQuantizedActivation(nn.Module):
    """Quantize then dequantize each row (the last dim: a token) with an int8 scale (and,
    not ``symmetric``, a zero point) chosen from that row at run time."""

    def __init__(self, symmetric: bool):
        super().__init__()
        self.symmetric = symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale, zero_point = quantize_per_row(x, self.symmetric)
        return qd.dequantize_per_token(q, scale, zero_point, -128, 127, torch.int8, x.dtype)

    def extra_repr(self) -> str:
        return f"int8 per row at run time, {'symmetric' if self.symmetric else 'asymmetric'}"


class QuantizedLinear(nn.Module):
    """``linear(dq(q(x)), dq(W_int), b)``; without ``input_quant``, weight-only."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None,
                 input_quant: QuantizedActivation | DynamicQuantizedActivation | None = None):
        super().__init__()
        self.input_quant = input_quant
        self.weight = weight
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.out_features, self.in_features = weight.qweight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.weight(), self.bias)


class QuantizedConv2d(nn.Module):
    """``conv2d(dq(q(x)), dq(W_int), b)`` with the float convolution's geometry."""

    def __init__(self, conv: nn.Conv2d, weight: QuantizedWeight,
                 input_quant: QuantizedActivation | None = None):
        super().__init__()
        self.input_quant = input_quant
        self.weight = weight
        bias = conv.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class QuantizedEmbedding(nn.Module):
    """An embedding table stored in int8 (or fewer bits) with one scale per row: the
    lookup gathers int8 rows and their scales, then dequantizes only those rows
    (``(q - zero_point) * scale``, the same numbers as dequantizing the table)."""

    def __init__(self, embedding: nn.Embedding, weight: QuantizedWeight):
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.qweight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        x = F.embedding(ids, w.qweight).float()
        if w.granularity == "per_tensor":
            return (x - w.zero_point.float()) * w.scale if w.zero_point is not None \
                else x * w.scale
        if w.zero_point is not None:
            x = x - F.embedding(ids, w.zero_point.reshape(-1, 1)).float()
        return x * F.embedding(ids, w.scale.reshape(-1, 1))


QUANTIZABLE = (nn.Linear, nn.Conv2d)


def is_quantizable_embedding(module: nn.Module) -> bool:
    """A plain lookup table (no max_norm renormalization, which rewrites the weights)."""
    return isinstance(module, nn.Embedding) and module.max_norm is None


def layer_names(model: nn.Module, names: list[str]) -> list[str]:
    """The names among ``names`` whose inputs are activations to calibrate (not embeddings,
    which read token ids)."""
    return [n for n in names if not isinstance(model.get_submodule(n), nn.Embedding)]


def is_quantizable(module: nn.Module) -> bool:
    """Linear, and 2-D convolutions with zero padding and numeric padding."""
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return isinstance(module, nn.Linear)


def quantized_module(module: nn.Module, weight: QuantizedWeight,
                     input_quant: QuantizedActivation | DynamicQuantizedActivation | None
                     ) -> nn.Module:
    """The quantized replacement of a Linear or Conv2d."""
    if isinstance(module, nn.Conv2d):
        return QuantizedConv2d(module, weight, input_quant)
    return QuantizedLinear(weight, module.bias, input_quant)
