"""A toy Deepseek backend, installed as a plug-in through the ``deepseek.backends`` entry point.

It claims the element-wise and matmul-class (GEMM, convolution, attention) ops
and leaves every other op to the reference backend, so a typical model is split
into several partitions. Its "kernels" are the ops' reference kernels run by
``deepseek.ir.interpreter.run_graph``; a real backend would generate or call
device code in ``compile``/``execute``. It counts what it ran so tests can
prove it ran.
"""

from __future__ import annotations

from typing import Sequence

import torch

from deepseek.backends import Backend, Capabilities
from deepseek.errors import BackendError
from deepseek.ir.graph import Graph
from deepseek.ir.interpreter import run_graph
from deepseek.ir.ops import Prop

__all__ = ["ToyBackend", "ToyExecutable"]

_DTYPES = frozenset({torch.float32, torch.float64})


class ToyExecutable:
    """What ``compile`` returns: here just the partition's subgraph."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.n_nodes = len(graph.nodes)


class ToyBackend(Backend):
    name = "toy"  # the registry overwrites it with the entry point's name

    def __init__(self) -> None:
        # Cheap and never raising: a factory that raises breaks backend="auto".
        self.nodes_executed = 0  # nodes run by execute(), summed over calls
        self.executions = 0  # execute() calls
        self.compiled_nodes = 0  # nodes compiled by compile()

    def capabilities(self) -> Capabilities:
        # Negative priority: backend="auto" never picks the toy over "cpu" (10).
        return Capabilities(device="cpu", dtypes=_DTYPES, priority=-5)

    def supports(self, node) -> bool:
        if node.fallback is not None:  # an ATen op outside Deepseek's op set
            return False
        if not node.opdef.has(Prop.ELEMENTWISE | Prop.MATMUL):
            return False
        # The partitioner does not read Capabilities.dtypes: check them here.
        return all(o.spec.dtype in _DTYPES for o in node.outputs)

    def compile(self, graph: Graph, target: str | None = None) -> ToyExecutable:
        bad = [n.kind for n in graph.nodes if not self.supports(n)]
        if bad:
            raise BackendError(f"backend {self.name!r} cannot compile ops {sorted(set(bad))}")
        self.compiled_nodes += len(graph.nodes)
        return ToyExecutable(graph)

    def execute(self, executable: ToyExecutable, inputs: Sequence[torch.Tensor],
                outputs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        with torch.no_grad():
            results = run_graph(executable.graph, inputs)
        self.executions += 1
        self.nodes_executed += executable.n_nodes
        if outputs is not None:
            for dst, src in zip(outputs, results):
                dst.copy_(src)
            return list(outputs)
        return results
