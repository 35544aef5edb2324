"""Deepseek: capture, optimize, compile, serve and profile trained models.

    import deepseek as ds
    engine = ds.compile(model, example_inputs, backend="cpu")
    outputs = engine(*inputs)
"""

from deepseek.api import capture, compile, load, optimize_graph
from deepseek.errors import (ArtifactError, BackendError, CaptureError, DeepseekError, DeepseekWarning,
                             InputError,
                             IRError, MemoryBudgetError, UnsupportedOpError)
from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.types import Sym, TensorSpec
from deepseek.runtime.decoder import compile_decoder

__version__ = "0.1.0"


def profile(engine, **options):
    """Profile an Engine while a ``with`` block runs; ``prof.report()`` explains the result.

        with ds.profile(engine) as prof:
            for _ in range(20):
                engine(x)
        prof.report().print()   # operators by time, hotspots on the roofline, suggestions

    Options (``warmup``, ``kernels``, ``peaks``, ``hotspot_share``): see
    :class:`deepseek.profiler.Profile`. The profiler is imported on first use.
    """
    from deepseek.profiler.trace import Profile

    return Profile(engine, **options)


__all__ = ["compile", "compile_decoder", "load", "capture", "optimize_graph", "profile", "Graph", "Node", "Value",
           "TensorSpec", "Sym", "DeepseekError", "DeepseekWarning", "ArtifactError", "BackendError", "CaptureError",
           "InputError", "IRError", "MemoryBudgetError", "UnsupportedOpError", "__version__"]
