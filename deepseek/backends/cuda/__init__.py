"""The CUDA backend: generated straight-line plans over cuBLAS/cuDNN (through PyTorch)
and Triton kernels for fused element-wise chains, replayed as one CUDA graph per shape.

AMD GPUs run the same code on PyTorch's ROCm build (device type "cuda",
Triton's AMD target); that path is untested here.

A graph with one symbolic dim (a dynamic batch) runs each batch size on the
graph of the next power of two (``deepseek.runtime.buckets``): padded inputs,
sliced outputs, one captured graph per bucket rather than per size.

Settings (environment): ``DEEPSEEK_CUDA_GRAPHS=0`` turns graph capture off
(plans then launch kernel by kernel), ``DEEPSEEK_SHAPE_BUCKETS=0`` shape
buckets; ``precision="tf32"`` in ``ds.compile`` enables TF32 matmuls and
convolutions while this backend executes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Sequence

import torch

from deepseek.backends.cpu.codegen import generate_plan
from deepseek.backends.cuda.autotune import Autotuner
from deepseek.backends.hal import Backend, Capabilities
from deepseek.ir.graph import Graph
from deepseek.ir.interpreter import bind_inputs
from deepseek.runtime.buckets import ShapeBuckets

log = logging.getLogger(__name__)


class _GraphReplay:
    """One captured CUDA graph: static inputs in, static outputs out."""

    def __init__(self, plan, inputs: Sequence[torch.Tensor]):
        self.plan = plan
        self.static_in = [t.clone() for t in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton/cuBLAS pick kernels, allocate workspaces
            for _ in range(2):
                plan(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = plan(self.static_in)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for dst, src in zip(self.static_in, inputs):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        # the next replay overwrites the static outputs: hand out copies
        return [t.clone() for t in self.static_out]


class CUDAExecutable:
    """A compiled partition: weights on the device, a plan and a CUDA graph per shape."""

    def __init__(self, graph: Graph, device: torch.device, tf32: bool, cuda_graphs: bool):
        self.graph = graph
        self.device = device
        self.tf32 = tf32
        self.cuda_graphs = cuda_graphs
        self.constants = {n: t.to(device) for n, t in graph.constants.items()}
        self.runners: dict[tuple, object] = {}
        self.plans: dict[tuple, object] = {}
        self.hook = None  # the profiler's per-node hook
        self.tuner = Autotuner(device)  # measures when the engine asks (opt_level=3)
        self.buckets = ShapeBuckets(graph) if cuda_graphs and \
            os.environ.get("DEEPSEEK_SHAPE_BUCKETS", "1") != "0" else None

    def instrumented(self, hook) -> "CUDAExecutable":
        """Profiler twin: same weights; plans run kernel by kernel (no CUDA graph)."""
        twin = copy.copy(self)
        twin.cuda_graphs, twin.runners, twin.plans, twin.hook = False, {}, {}, hook
        twin.buckets = None  # the profiler times the exact shape
        return twin

    def plan_for(self, inputs: Sequence[torch.Tensor]):
        """The kernel-by-kernel plan for these input shapes (no CUDA graph), cached."""
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        plan = self.plans.get(key)
        if plan is None:
            env = bind_inputs(self.graph, inputs)
            plan = self.plans[key] = generate_plan(self.graph, env, str(self.device),
                                                   constants=self.constants, instrument=self.hook,
                                                   tuner=self.tuner)
        return plan

    def _runner(self, inputs: Sequence[torch.Tensor]):
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        runner = self.runners.get(key)
        if runner is None:
            plan = runner = self.plan_for(inputs)
            if self.cuda_graphs:
                try:
                    runner = _GraphReplay(plan, inputs)
                except RuntimeError as e:  # e.g. an op that synchronizes with the host
                    log.warning("CUDA graph capture failed (%s); running kernel by kernel", e)
            self.runners[key] = runner
        return runner

    @contextlib.contextmanager
    def running(self):
        """This executable's settings (tf32, no autograd, its device) while plans run."""
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        try:
            with torch.no_grad(), torch.cuda.device(self.device):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with self.running():
            if self.buckets is None or not self.buckets.enabled:
                return self._runner(inputs)(inputs)
            return self.buckets(lambda xs: self._runner(xs)(xs),
                                lambda xs: self.plan_for(xs)(xs), inputs)


class CUDABackend(Backend):
    """NVIDIA (and, through ROCm builds, AMD) GPUs."""

    name = "cuda"

    def __init__(self, device: int | None = None, tf32: bool = False):
        self.index = device if device is not None else 0
        self.tf32 = tf32
        self.cuda_graphs = os.environ.get("DEEPSEEK_CUDA_GRAPHS", "1") != "0"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def capabilities(self) -> Capabilities:
        return Capabilities(device=f"cuda:{self.index}", priority=20,
                            dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16,
                                              torch.int8, torch.int32, torch.int64, torch.bool}))

    def supports(self, node) -> bool:
        return node.fallback is None

    def compile(self, graph: Graph, target: str | None = None) -> CUDAExecutable:
        return CUDAExecutable(graph, torch.device(f"cuda:{self.index}"),
                              tf32=self.tf32 or target == "tf32", cuda_graphs=self.cuda_graphs)
