"""Sensitivity analysis and mixed precision.

A layer's sensitivity is the damage done when only that layer is quantized:
the drop of an eval metric when one is given, else the relative error of the
model's outputs on calibration batches. Mixed precision keeps the most
sensitive layers in float until the metric drop of the whole model is within
the accuracy budget.

    report = sensitivity_analysis(model, QuantConfig(), calibration_batches, eval_fn=accuracy)
    print(report)                     # one line per layer, most sensitive first
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

from deepseek.quantization.config import QuantConfig
from deepseek.quantization.modules import layer_names

log = logging.getLogger(__name__)


@dataclass
class LayerSensitivity:
    name: str
    kind: str  # "Linear" | "Conv2d"
    params: int
    output_error: float | None = None  # relative L2 error of the model outputs
    metric_drop: float | None = None  # eval_fn(float) - eval_fn(only this layer quantized)


@dataclass
class SensitivityReport:
    layers: list[LayerSensitivity] = field(default_factory=list)
    metric_float: float | None = None

    def ranked(self) -> list[LayerSensitivity]:
        """Most sensitive first (by metric drop when measured, else output error)."""
        def key(s: LayerSensitivity) -> float:
            v = s.metric_drop if s.metric_drop is not None else s.output_error
            return -(v if v is not None else 0.0)
        return sorted(self.layers, key=key)

    def to_dict(self) -> dict:
        return {"metric_float": self.metric_float,
                "layers": [dict(s.__dict__) for s in self.ranked()]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def __str__(self) -> str:
        lines = [f"{'layer':<40} {'kind':<7} {'params':>9} {'out.err':>9} {'metric drop':>12}"]
        for s in self.ranked():
            err = f"{s.output_error:9.4f}" if s.output_error is not None else f"{'-':>9}"
            drop = f"{s.metric_drop:12.4f}" if s.metric_drop is not None else f"{'-':>12}"
            lines.append(f"{s.name:<40} {s.kind:<7} {s.params:>9} {err} {drop}")
        return "\n".join(lines)


def _swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    from deepseek.quantization.quantizer import set_submodule

    old = model.get_submodule(name)
    set_submodule(model, name, module)
    return old


def _outputs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    from deepseek.quantization.quantizer import call_batch

    with torch.no_grad():
        return [t.detach().double() for b in batches for t in tree_leaves(call_batch(model, b))
                if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _rel_error(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(out, ref))
    den = sum(float(b.pow(2).sum()) for b in ref)
    return (num / max(den, 1e-30)) ** 0.5


def measure(float_model: nn.Module, layers: dict[str, nn.Module], batches: list | None = None,
            eval_fn: Callable[[nn.Module], float] | None = None) -> SensitivityReport:
    """Per layer, the error when only that layer is replaced by ``layers[name]``."""
    report = SensitivityReport()
    ref = _outputs(float_model, batches) if batches else None
    if eval_fn is not None:
        report.metric_float = float(eval_fn(float_model))
    for name, qlayer in layers.items():
        orig = float_model.get_submodule(name)
        s = LayerSensitivity(name, type(orig).__name__, sum(p.numel() for p in orig.parameters()))
        _swap(float_model, name, qlayer)
        try:
            if ref is not None:
                s.output_error = _rel_error(_outputs(float_model, batches), ref)
            if eval_fn is not None:
                s.metric_drop = report.metric_float - float(eval_fn(float_model))
        finally:
            _swap(float_model, name, orig)
        report.layers.append(s)
        log.info("sensitivity %s: output error %s, metric drop %s", name, s.output_error,
                 s.metric_drop)
    return report


def choose_float_layers(float_model: nn.Module, layers: dict[str, nn.Module],
                        eval_fn: Callable[[nn.Module], float], budget: float):
    """Greedy mixed precision: quantize everything; while the metric drop exceeds
    ``budget``, keep the next most sensitive layer in float.

    Returns (layers kept in float, SensitivityReport, metric float, metric quantized).
    """
    originals = {n: float_model.get_submodule(n) for n in layers}
    metric_f = float(eval_fn(float_model))
    for n, q in layers.items():
        _swap(float_model, n, q)
    try:
        metric_q = float(eval_fn(float_model))
    finally:
        for n, m in originals.items():
            _swap(float_model, n, m)
    if metric_f - metric_q <= budget:
        return [], None, metric_f, metric_q
    report = measure(float_model, layers, eval_fn=eval_fn)
    keep: list[str] = []
    for s in report.ranked():
        keep.append(s.name)
        for n, q in layers.items():
            _swap(float_model, n, originals[n] if n in keep else q)
        try:
            metric_q = float(eval_fn(float_model))
        finally:
            for n, m in originals.items():
                _swap(float_model, n, m)
        log.info("mixed precision: %d layer(s) in float, metric %.4f (float %.4f)", len(keep),
                 metric_q, metric_f)
        if metric_f - metric_q <= budget:
            break
    return keep, report, metric_f, metric_q


def sensitivity_analysis(model: nn.Module, config: QuantConfig, calibration_data: Iterable,
                         eval_fn: Callable[[nn.Module], float] | None = None,
                         error_batches: int = 4) -> SensitivityReport:
    """Quantize each target layer of ``model`` alone (by ``config``, activations
    calibrated on ``calibration_data``) and report the damage, most sensitive
    first: output error on the first ``error_batches`` batches, and the metric
    drop when ``eval_fn`` is given."""
    from deepseek.quantization.quantizer import Quantizer

    q = Quantizer(config)
    float_model = q.prepare(model)
    batches = list(calibration_data)
    names = q.targets(float_model)
    static = config.activation_bits is not None
    calibrators = q.calibrate(float_model, layer_names(float_model, names), batches) \
        if static else {}
    layers = {n: q.quantized_layer(float_model.get_submodule(n), calibrators.get(n)) for n in names}
    return measure(float_model, layers, batches[:error_batches], eval_fn)
