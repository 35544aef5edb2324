"""Quantization: post-training (PTQ) and quantization-aware training (QAT), calibration,
sensitivity analysis and mixed precision, and lowering of QDQ graphs to integer kernels.

    from deepseek.quantization import QuantConfig, Quantizer
    config = QuantConfig(weight_bits=8, activation_bits=8, method="asymmetric")
    quantized_model = Quantizer(config).quantize(model, calibration_data)   # still an nn.Module
    engine = ds.compile(quantized_model, example_inputs, precision="int8")  # int8 kernels

Names are imported on first use: the op registry imports :mod:`.kernels` while
``deepseek.ir`` is still initializing, so this package must not import it eagerly.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "QuantConfig": "config", "QuantizationError": "config",
    "Quantizer": "quantizer", "QuantReport": "quantizer",
    "sensitivity_analysis": "sensitivity", "SensitivityReport": "sensitivity",
    "QuantizedLinear": "modules", "QuantizedConv2d": "modules", "QuantizedEmbedding": "modules",
    "lower_quantized_ops": "lowering",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deepseek.quantization' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"deepseek.quantization.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS)
