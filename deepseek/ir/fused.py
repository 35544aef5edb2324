"""Fused kernels made by the optimizer: element-wise chains, and add + layer norm.

A fused node is ``deepseek::fused_pointwise(Tensor?[] inputs, str program)``:
``program`` is JSON, a list of steps ``[op, args, attrs]`` where ``op`` is an
IR op name (``"mul.Tensor"``), each arg is ``"$i"`` (fused input i), ``"#j"``
(the result of step j) or a literal number, and the last step is the
output. It is plain data (printable, serializable); its reference kernel
runs the steps with the ops' own reference kernels, so its semantics are
exactly those of the ops it replaced. Backends compile it as one kernel
(a Triton kernel on CUDA); the CPU backend runs it as an in-place chain.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch

_LIB = torch.library.Library("deepseek", "DEF")  # noqa: TOR901  (our op namespace)
_LIB.define("fused_pointwise(Tensor?[] inputs, str program) -> Tensor")

Step = tuple[str, list, dict]


def parse_program(program: str) -> list[Step]:
    steps = json.loads(program)
    if not isinstance(steps, list) or not steps:
        raise ValueError("a fused program is a non-empty list of steps")
    return [(str(op), list(args), dict(attrs)) for op, args, attrs in steps]


def dump_program(steps: Sequence[Step]) -> str:
    return json.dumps([[op, list(args), dict(attrs)] for op, args, attrs in steps],
                      separators=(",", ":"))


def run_steps(inputs: Sequence[Any], program: str) -> list[Any]:
    """Every step's result (on meta tensors: their dtypes and shapes)."""
    from deepseek.ir.ops import op_from_name, opdef
    from deepseek.ir.serialize import decode_attr

    results: list[Any] = []

    def arg(a):
        if isinstance(a, str) and a[:1] == "$":
            return inputs[int(a[1:])]
        if isinstance(a, str) and a[:1] == "#":
            return results[int(a[1:])]
        return a

    for op, args, attrs in parse_program(program):
        d = opdef(op_from_name(op))
        results.append(d.reference([arg(a) for a in args],
                                   {k: decode_attr(v) for k, v in attrs.items()}))
    return results


def run_program(inputs: Sequence[Any], program: str) -> torch.Tensor:
    """The reference semantics: each step through its op's reference kernel."""
    return run_steps(inputs, program)[-1]


_LIB.impl("fused_pointwise", run_program, "CompositeExplicitAutograd")
_LIB.impl("fused_pointwise", run_program, "Meta")

# A residual add and the layer norm that reads it, as one kernel: (x + residual,
# layer_norm(x + residual)). Transformer blocks end every sub-block with this pair.
_LIB.define("add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, "
            "SymInt[] normalized_shape, float eps) -> (Tensor, Tensor)")


def add_layer_norm(x, residual, weight, bias, normalized_shape, eps):
    """The reference semantics: PyTorch's add, then its layer norm of the sum."""
    s = torch.add(x, residual)
    return s, torch.layer_norm(s, list(normalized_shape), weight, bias, eps)


_LIB.impl("add_layer_norm", add_layer_norm, "CompositeExplicitAutograd")
_LIB.impl("add_layer_norm", add_layer_norm, "Meta")

# RMS normalization (Llama's RMSNorm) as one kernel: statistics in float32, the normalized
# value cast back to x's dtype, then scaled by the weight
_LIB.define("fused_rms_norm(Tensor x, Tensor? weight, float eps) -> Tensor")


def fused_rms_norm(x, weight, eps):
    """The reference semantics: what transformers' RMSNorm computes, op by op."""
    h = x.to(torch.float32)
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h if weight is None else weight * h


_LIB.impl("fused_rms_norm", fused_rms_norm, "CompositeExplicitAutograd")
_LIB.impl("fused_rms_norm", fused_rms_norm, "Meta")

# A GEMM in fp8 (e4m3) on tensor cores: the weight quantized once with a scale per output
# channel, the activation per row at run time (amax / 448), one scaled GEMM with the bias
# in its epilogue, the result in the activation's dtype. precision="fp8" makes these.
_LIB.define("fp8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor")
FP8_MAX = 448.0  # the largest float8_e4m3fn value


def fp8_linear(x, weight, weight_scale, bias):
    """``x @ dequant(weight).T + bias`` with x quantized per row to float8_e4m3fn:
    ``weight`` is (N, K) float8_e4m3fn, ``weight_scale`` (N,) float32, ``x`` (..., K)."""
    rows = x.reshape(-1, x.shape[-1])
    scale = rows.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    q = (rows.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if x.is_cuda:  # fp8 tensor cores
        y = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.float()[None, :],
                             bias=bias, out_dtype=x.dtype)
    else:  # CPU _scaled_mm takes per-row scales only from torch 2.13: the same products in fp32
        y = (q.float() @ weight.float().t()) * scale * weight_scale.float()
        y = (y if bias is None else y + bias.float()).to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _fp8_linear_meta(x, weight, weight_scale, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_LIB.impl("fp8_linear", fp8_linear, "CompositeExplicitAutograd")
_LIB.impl("fp8_linear", _fp8_linear_meta, "Meta")
