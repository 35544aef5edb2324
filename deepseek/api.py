"""The front door: compile(), load(), capture(), optimize_graph()."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Iterable, Mapping

import torch

from deepseek.backends.hal import get_backend
from deepseek.errors import DeepseekError, DeepseekWarning
from deepseek.frontend.torch_export import capture
from deepseek.ir.graph import Graph
from deepseek.ir.interpreter import bind_inputs
from deepseek.ir.verify import verify
from deepseek.passes import PRECISIONS, optimize_graph, pipeline, run_passes
from deepseek.passes.precision import PRECISION_DTYPES
from deepseek.quantization.lowering import has_qdq, int8_kernels_off_native
from deepseek.runtime.artifact import load_artifact
from deepseek.runtime.engine import Engine, Report
from deepseek.runtime.plan import bytes_moved, plan_memory
from deepseek.runtime.structure import flatten_inputs

log = logging.getLogger(__name__)



def _copy_graph(graph: Graph) -> Graph:
    """A structural copy sharing constants' tensors (passes rewrite node lists)."""
    import copy

    g = copy.copy(graph)
    g.nodes = [copy.copy(n) for n in graph.nodes]
    for n in g.nodes:
        n.inputs, n.attrs = list(n.inputs), dict(n.attrs)
    g.inputs, g.outputs = list(graph.inputs), list(graph.outputs)
    g.constants, g.const_values = dict(graph.constants), dict(graph.const_values)
    g._taken = set(graph._taken)
    return g


def _example_env(graph: Graph, example: list | None) -> dict[str, int]:
    if example is not None:
        return bind_inputs(graph, example)
    return {}


def compile(model: Any, example_inputs: Any = None, *, backend: str = "auto",
            precision: str = "fp32", dynamic_dims: Mapping[int, Mapping[int, str]] | None = None,
            opt_level: int = 2, strict: bool = False, disable_passes: Iterable[str] = (),
            example_kwargs: dict | None = None) -> Engine:
    """Compile a model (an nn.Module, or a captured Graph) into an Engine.

    Example::

        engine = ds.compile(model, (torch.randn(8, 3, 224, 224),),
                            dynamic_dims={0: {0: "batch"}}, backend="cpu")
        out = engine(torch.randn(3, 3, 224, 224))   # any batch size
        print(engine.report())
    """
    if precision not in PRECISIONS:
        raise DeepseekError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(model, (str, os.PathLike)):
        if not str(model).endswith(".onnx"):
            raise DeepseekError(f"cannot compile {model}: give an nn.Module, a Graph or a .onnx file "
                                "(a .dsk file is loaded with ds.load)")
        from deepseek.frontend.onnx_import import import_onnx

        model = import_onnx(str(model), dynamic_dims=dynamic_dims)
    if isinstance(model, Graph):
        graph = model
        example = None
        verify(graph)
    else:
        if example_inputs is None:
            raise DeepseekError("ds.compile(model, example_inputs): example inputs are needed to "
                                "capture an nn.Module")
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        graph = capture(model, example_inputs, dynamic_dims=dynamic_dims, strict=strict,
                        example_kwargs=example_kwargs)
        leaves = flatten_inputs(tuple(example_inputs), dict(example_kwargs or {}))
        example = [x for x in leaves if isinstance(x, torch.Tensor)]
    if precision == "int8":
        if not has_qdq(graph):
            raise DeepseekError("precision='int8' needs a quantized model (quantize/dequantize "
                                "nodes): quantize it first with deepseek.quantization.Quantizer"
                                "(config).quantize(model, calibration_data), or give a QDQ ONNX file")
    return _build_engine(graph, backend, opt_level, disable_passes, example, precision)


def _device_type(backend, precision: str) -> str:
    """The device type stage 3 maps the graph to: the backend's ("cpu", "cuda"). A plug-in
    need not describe itself for fp32 or int8 (no precision to lower): "cpu" then."""
    try:
        return backend.capabilities().device.split(":")[0]
    except NotImplementedError:
        if precision in PRECISION_DTYPES or precision == "fp8":
            raise
        return "cpu"


def _build_engine(graph: Graph, backend: str, opt_level: int, disable_passes, example,
                  precision: str = "fp32") -> Engine:
    env = _example_env(graph, example)
    concrete = not graph.inputs or env or all(v.spec.is_static for v in graph.inputs)
    b = get_backend(backend)
    notes = []
    native = b.capabilities().precisions if precision in PRECISION_DTYPES else None
    if native is not None and precision not in native:
        notes.append(f"precision={precision!r} compiled as fp32: backend {b.name!r} has no native "
                     f"{precision} kernels on this machine (it would convert element by element, "
                     "many times slower than float32); int8 quantization (deepseek.quantization) "
                     "is the way to lower precision here")
        warnings.warn(notes[-1], DeepseekWarning, stacklevel=3)
        precision = "fp32"
    target = _device_type(b, precision)
    passes = pipeline(opt_level, graph, target, precision)
    optimized, records = run_passes(_copy_graph(graph), passes, disable_passes)
    native = b.capabilities().precisions if has_qdq(graph) else None
    off, kernels = int8_kernels_off_native(optimized) if native is not None \
        and "int8" not in native else (0, 0)
    if off:
        notes.append(f"{off} of {kernels} int8 convolutions/GEMMs have 8-bit weights, for "
                     f"which backend {b.name!r} has no native int8 kernels on this machine (no "
                     "VNNI: oneDNN adds pairs of products in int16, which 8-bit weights can "
                     "saturate); they run their float32 formula, slower than the float32 model "
                     "(ResNet-50 0.76x, BERT-base 0.81x on an AVX2 EPYC). Quantize with "
                     "QuantConfig(weight_bits=7): 7-bit weights run as int8 here, exactly")
        warnings.warn(notes[-1], DeepseekWarning, stacklevel=3)
    report = Report(passes=[r.to_dict() for r in records], backend="", opt_level=opt_level,
                    nodes={"unoptimized": len(graph.nodes), "optimized": len(optimized.nodes)},
                    notes=notes)
    if concrete:  # accounting needs sizes: the example's, for symbolic graphs
        before, after = plan_memory(graph, env), plan_memory(optimized, env)
        report.bytes_moved = {"unoptimized": bytes_moved(graph, env),
                              "optimized": bytes_moved(optimized, env)}
        report.peak_memory_bytes = {"unoptimized": before.peak_live_bytes,
                                    "optimized": after.peak_live_bytes}
        report.arena_bytes = after.arena_bytes
        report.memory = {"unoptimized": before.to_dict(), "optimized": after.to_dict()}
    report.backend = b.name
    return Engine(optimized, b, report, precision)


def load(path: str, backend: str = "auto") -> Engine:
    """Load a .dsk artifact written by ``engine.save`` for ``backend``."""
    graph, saved = load_artifact(path)
    report = Report(**{k: v for k, v in saved.items() if k in Report.__dataclass_fields__})
    b = get_backend(backend)
    report.backend = b.name
    return Engine(graph, b, report, report.precision)


__all__ = ["compile", "load", "capture", "optimize_graph"]
