"""Deepseek: capture, optimize, compile, serve and profile trained models.

    import deepseek as ds
    engine = ds.compile(model, example_inputs, backend="cpu")
    outputs = engine(*inputs)
"""

from deepseek.api import capture, compile, load, optimize_graph
from deepseek.errors import (ArtifactError, BackendError, CaptureError, DeepseekError, InputError,
                             IRError, UnsupportedOpError)
from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.types import Sym, TensorSpec

__version__ = "0.1.0"

__all__ = ["compile", "load", "capture", "optimize_graph", "Graph", "Node", "Value", "TensorSpec",
           "Sym", "DeepseekError", "ArtifactError", "BackendError", "CaptureError", "InputError",
           "IRError", "UnsupportedOpError", "__version__"]
