"""Quantizer: post-training quantization (static or weight-only), QAT, mixed precision.

    quantizer = Quantizer(QuantConfig(method="symmetric", calibration="entropy"))
    qmodel = quantizer.quantize(model, calibration_batches)       # static W8A8 PTQ
    print(quantizer.report)                                         # what was quantized, how

The model is copied, batch norms are folded into the convolutions before them,
and every Linear / Conv2d not matched by ``config.skip`` is replaced by its
quantized module (see :mod:`.modules`).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from deepseek.quantization.config import QuantConfig, QuantizationError
from deepseek.quantization.modules import (DynamicQuantizedActivation, QuantizedActivation,
                                           QuantizedEmbedding, QuantizedWeight, is_quantizable,
                                           is_quantizable_embedding, layer_names, quantized_module)
from deepseek.quantization.observers import Calibrator, make_calibrator, qrange

log = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], float]


@dataclass
class QuantReport:
    """What :meth:`Quantizer.quantize` did."""

    mode: str = ""  # "static" | "dynamic" | "weight_only"
    quantized: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)  # skipped by pattern or mixed precision
    mixed_precision: list[str] = field(default_factory=list)  # kept float to hold the budget
    metric_float: float | None = None
    metric_quantized: float | None = None
    sensitivity: Any = None  # a SensitivityReport when mixed precision ran
    bias_shifts: dict[str, float] = field(default_factory=dict)  # bias correction: largest
    # shift per layer

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "sensitivity"}
        d["sensitivity"] = self.sensitivity.to_dict() if self.sensitivity is not None else None
        return d

    def __str__(self) -> str:
        lines = [f"{self.mode} quantization: {len(self.quantized)} layers quantized, "
                 f"{len(self.kept_float)} kept in float"]
        if self.mixed_precision:
            lines.append("  kept in float for the accuracy budget: "
                         + ", ".join(self.mixed_precision))
        if self.bias_shifts:
            lines.append(f"  bias correction on {len(self.bias_shifts)} layers (largest shift "
                         f"{max(self.bias_shifts.values()):.3g})")
        if self.metric_float is not None and self.metric_quantized is not None:
            lines.append(f"  metric: float {self.metric_float:.4f} -> quantized "
                         f"{self.metric_quantized:.4f}")
        return "\n".join(lines)


def call_batch(model: nn.Module, batch) -> Any:
    """Run ``model`` on one calibration batch: a tensor, a tuple/list of positional
    inputs, or a dict of keyword inputs."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise QuantizationError(f"a calibration batch must be a tensor, a tuple/list of inputs or a "
                            f"dict of keyword inputs, got {type(batch).__name__}")


def progress(iterable: Iterable, enabled: bool, desc: str) -> Iterable:
    """A tqdm progress bar on a terminal (stderr), plain iteration otherwise."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, unit="batch", leave=False)


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm2d whose only input is a Conv2d's output (and the
    convolution's only reader) into that convolution; the BN becomes Identity. Pairs
    are found in the module's traced call graph (torch.fx), or, where the model does
    not trace, between neighbours of an ``nn.Sequential``. In place."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def foldable(conv, bn) -> bool:
        return (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats and bn.running_mean is not None)

    pairs: list[tuple[str, str]] = []
    try:
        graph = torch.fx.symbolic_trace(model).graph
        calls: dict[str, int] = {}  # a module called from two places is left alone
        for node in graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        for node in graph.nodes:
            src = node.args[0] if node.op == "call_module" and node.args else None
            if isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1 \
                    and calls[str(src.target)] == 1 and calls[str(node.target)] == 1:
                pairs.append((str(src.target), str(node.target)))
    except Exception:  # not traceable (data-dependent Python): neighbours in a Sequential
        for seq_name, seq in model.named_modules():
            if isinstance(seq, nn.Sequential):
                names = [f"{seq_name}.{n}" if seq_name else n for n in seq._modules]
                pairs.extend(zip(names, names[1:]))
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if foldable(conv, bn):
            set_submodule(model, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
            set_submodule(model, bn_name, nn.Identity())
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class Quantizer:
    """Quantizes models by a :class:`QuantConfig`; ``report`` describes the last result."""

    def __init__(self, config: QuantConfig | None = None):
        self.config = config or QuantConfig()
        self.report = QuantReport()

    # --- the pieces ------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """An eval-mode copy of ``model`` with batch norms folded (per the config)."""
        if not isinstance(model, nn.Module):
            raise QuantizationError(f"Quantizer needs an nn.Module, got {type(model).__name__}")
        model = copy.deepcopy(model).eval()
        if self.config.fold_batch_norm:
            fold_batch_norms(model)
        return model

    def targets(self, model: nn.Module) -> list[str]:
        """Names of the modules to quantize: Linear / Conv2d (and Embedding with
        ``config.embeddings``) not matched by ``skip``. A skip pattern that matches no
        module is an error: it is a typo or a model other than the one meant."""
        c = self.config
        all_names = [n for n, _ in model.named_modules() if n]
        unmatched = [p for p in c.skip if not any(fnmatch.fnmatchcase(n, p) for n in all_names)]
        if unmatched:
            raise QuantizationError(
                f"skip patterns {unmatched} match no module of {type(model).__name__}; module "
                f"names look like {all_names[:6]} (fnmatch patterns, e.g. 'classifier.*')")
        names = [n for n, m in model.named_modules() if n and (
            is_quantizable(m) and not (c.dynamic and isinstance(m, nn.Conv2d))
            or c.embeddings and is_quantizable_embedding(m))]
        return [n for n in names if not c.skips(n)]

    def calibrate(self, model: nn.Module, names: list[str], calibration_data: Iterable) -> dict:
        """Observe the input of each named module over ``calibration_data``;
        returns ``{name: Calibrator}``."""
        c = self.config
        r = qrange(c.activation_bits, c.symmetric, weight=False)
        calibrators = {n: make_calibrator(c.calibration, r, c.symmetric, c.percentile)
                       for n in names}
        hooks = []
        for n in names:
            def hook(module, args, cal=calibrators[n]):
                if args and isinstance(args[0], torch.Tensor):
                    cal.observe(args[0])
            hooks.append(model.get_submodule(n).register_forward_pre_hook(hook))
        seen = 0
        try:
            with torch.no_grad():
                for batch in progress(calibration_data, c.progress, "calibrating"):
                    call_batch(model, batch)
                    seen += 1
        finally:
            for h in hooks:
                h.remove()
        if seen == 0:
            raise QuantizationError("calibration_data gave no batches; pass an iterable of input "
                                    "batches (or None for weight-only quantization)")
        log.info("calibrated %d activations on %d batches", len(names), seen)
        return calibrators

    def quantized_layer(self, module: nn.Module, calibrator: Calibrator | None) -> nn.Module:
        """The quantized replacement of one float layer."""
        c = self.config
        if isinstance(module, nn.Embedding):  # one scale per row (token), weight only
            rows = "per_tensor" if c.granularity == "per_tensor" else "per_channel"
            return QuantizedEmbedding(module, QuantizedWeight(
                module.weight, c.weight_bits, c.weight_symmetric, rows, c.group_size,
                c.weight_search))
        granularity = c.granularity
        if granularity == "per_group" and (calibrator is not None or c.dynamic):
            granularity = "per_channel"  # int8 kernels take per-channel weight scales
        weight = QuantizedWeight(module.weight, c.weight_bits, c.weight_symmetric, granularity,
                                 c.group_size, c.weight_search)
        act = None
        if c.dynamic:
            act = DynamicQuantizedActivation(c.symmetric)
        elif calibrator is not None:
            scale, zp = calibrator.qparams()
            act = QuantizedActivation(scale, zp, calibrator.r, c.activation_bits)
        return quantized_module(module, weight, act)

    # --- the verb ----------------------------------------------------------------
    def quantize(self, model: nn.Module, calibration_data: Iterable | None = None,
                 eval_fn: EvalFn | None = None) -> nn.Module:
        """A quantized copy of ``model`` (an nn.Module that runs eagerly and compiles
        with ``ds.compile(..., precision="int8")`` into integer kernels).

        With ``calibration_data`` (an iterable of input batches) and
        ``activation_bits`` set, weights and activations are quantized (static
        PTQ); without, weights only. ``calibration="dynamic"`` quantizes the
        Linear layers' activations per row at run time and needs no data (given,
        it is read by ``bias_correction`` only). With ``config.accuracy_budget``, ``eval_fn``
        (model -> metric, higher is better) is required: the most sensitive
        layers are kept in float until the metric drop is within the budget.
        """
        c = self.config
        if c.accuracy_budget is not None and eval_fn is None:
            raise QuantizationError("accuracy_budget needs eval_fn (model -> metric, higher is "
                                    "better) to measure the drop")
        float_model = self.prepare(model)
        names = self.targets(float_model)
        all_layers = [n for n, m in float_model.named_modules() if n and is_quantizable(m)]
        if c.dynamic and not any(isinstance(float_model.get_submodule(n), nn.Linear)
                                 for n in names):
            raise QuantizationError(
                f"calibration='dynamic' quantizes Linear layers only, and {type(model).__name__} "
                f"has none to quantize (after skip): its convolutions need static PTQ, i.e. a "
                f"calibrator such as 'minmax' and calibration_data")
        static = calibration_data is not None and c.activation_bits is not None \
            and not c.dynamic
        if calibration_data is None and c.activation_bits is not None and not c.dynamic:
            log.info("no calibration data: weight-only quantization")
        correct = c.bias_correction and (static or c.dynamic)
        if correct and calibration_data is None:
            raise QuantizationError("bias_correction measures each layer's output shift on "
                                    "calibration_data: pass some batches, or set "
                                    "bias_correction=False")
        if correct:  # read twice: calibration, then the correction
            calibration_data = list(calibration_data)
        calibrators = self.calibrate(float_model, layer_names(float_model, names),
                                     calibration_data) if static else {}
        layers = {n: self.quantized_layer(float_model.get_submodule(n), calibrators.get(n))
                  for n in names}
        report = QuantReport(mode="static" if static else "dynamic" if c.dynamic
                             else "weight_only")
        keep: list[str] = []
        if c.accuracy_budget is not None:
            from deepseek.quantization.sensitivity import choose_float_layers

            keep, sens, metric_f, metric_q = choose_float_layers(
                float_model, layers, eval_fn, c.accuracy_budget)
            report.sensitivity, report.mixed_precision = sens, keep
            report.metric_float, report.metric_quantized = metric_f, metric_q
        qmodel = copy.deepcopy(float_model)
        for n, layer in layers.items():
            if n not in keep:
                set_submodule(qmodel, n, layer)
        report.quantized = [n for n in names if n not in keep]
        if correct:
            from deepseek.quantization.bias_correction import correct_biases

            report.bias_shifts = correct_biases(float_model, qmodel, report.quantized,
                                                calibration_data, call_batch)
        report.kept_float = [n for n in all_layers if n not in report.quantized]
        self.report = report
        return qmodel.eval()

    # --- QAT -------------------------------------------------------------------------
    def prepare_qat(self, model: nn.Module, calibration_data: Iterable | None = None,
                    learnable_scales: bool = False) -> nn.Module:
        """A training-mode copy of ``model`` with fake quantization (straight-through
        estimator) on the weights and inputs of every target layer; train it with
        any loop, then :meth:`convert`. See :mod:`.qat`."""
        from deepseek.quantization.qat import prepare_qat

        return prepare_qat(self, model, calibration_data, learnable_scales)

    def convert(self, model: nn.Module) -> nn.Module:
        """The quantized model (int8 weights, QDQ activations) of a QAT-trained model."""
        from deepseek.quantization.qat import convert

        return convert(self, model)
