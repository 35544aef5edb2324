"""The reference backend: the op registry's PyTorch kernels, run by the interpreter.

It defines the semantics every other backend is tested against and runs the
nodes no other backend supports (fallback nodes included).
"""

from __future__ import annotations

import torch

from deepseek.backends.hal import Backend, Capabilities
from deepseek.ir.graph import Graph
from deepseek.ir.interpreter import run_graph


class ReferenceBackend(Backend):
    name = "reference"

    def capabilities(self) -> Capabilities:
        return Capabilities(device="cpu", priority=-1,
                            dtypes=frozenset({torch.float32, torch.float64}))

    def supports(self, node) -> bool:
        return True

    def compile(self, graph: Graph, target: str | None = None) -> Graph:
        return graph

    def execute(self, executable: Graph, inputs, outputs=None) -> list[torch.Tensor]:
        with torch.no_grad():
            results = run_graph(executable, inputs)
        if outputs is not None:
            for dst, src in zip(outputs, results):
                dst.copy_(src)
            return list(outputs)
        return results
