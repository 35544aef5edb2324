"""The CPU backend: straight-line generated code over PyTorch/oneDNN kernels."""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch

from deepseek.backends.cpu.codegen import generate_plan, native_precisions
from deepseek.backends.hal import Backend, Capabilities
from deepseek.ir.graph import Graph
from deepseek.ir.interpreter import bind_inputs


class CPUExecutable:
    """A compiled CPU partition: one generated plan per concrete input shape, cached."""

    def __init__(self, graph: Graph, threads: int | None):
        self.graph = graph
        self.threads = threads
        self.plans: dict[tuple, object] = {}

    def plan_for(self, inputs: Sequence[torch.Tensor]):
        key = tuple([t.shape for t in inputs])  # torch.Size: hashes and compares as a tuple
        plan = self.plans.get(key)
        if plan is None:
            env = bind_inputs(self.graph, inputs)
            plan = self.plans[key] = generate_plan(self.graph, env, "cpu")
        return plan

    @contextlib.contextmanager
    def running(self):
        """This executable's settings (thread count, no autograd) while plans run."""
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.no_grad():
            yield

    def instrumented(self, hook) -> "CPUExecutable":
        """A twin running this executable's plans (same kernels and weights) that calls
        ``hook(i)`` just before node i and ``hook(len(graph.nodes))`` at the end."""
        return _InstrumentedExecutable(self, hook)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # the per-call path: a few hundred nanoseconds around the plan (models of a few
        # tiny kernels, like the MNIST CNN at batch 1, are that sensitive to it)
        threads = self.threads
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        grad = torch.is_grad_enabled()
        if grad:  # the raw switch: torch.set_grad_enabled builds a context manager object
            torch._C._set_grad_enabled(False)
        try:
            plan = self.plans.get((inputs[0].shape,) if len(inputs) == 1 else
                                  tuple([t.shape for t in inputs]))
            if plan is None:
                plan = self.plan_for(inputs)
            return plan(inputs)
        finally:
            if grad:
                torch._C._set_grad_enabled(True)


class _InstrumentedExecutable(CPUExecutable):
    """The profiler's view of a CPUExecutable: each plan gets a ``hook(i)`` per node."""

    def __init__(self, base: CPUExecutable, hook):
        super().__init__(base.graph, base.threads)
        self.base, self.hook = base, hook

    def plan_for(self, inputs: Sequence[torch.Tensor]):
        key = tuple([t.shape for t in inputs])  # torch.Size: hashes and compares as a tuple
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self.base.plan_for(inputs).instrumented(self.hook)
        return plan


class CPUBackend(Backend):
    """Runs every op of the IR on the host CPU.

    ``threads`` (or ``DEEPSEEK_CPU_THREADS``) sets PyTorch's intra-op thread
    count while this backend executes; unset, PyTorch's setting is kept.
    """

    name = "cpu"

    def __init__(self, threads: int | None = None):
        env = os.environ.get("DEEPSEEK_CPU_THREADS")
        self.threads = threads or (int(env) if env else None)

    def capabilities(self) -> Capabilities:
        return Capabilities(device="cpu", priority=10,
                            dtypes=frozenset({torch.float32, torch.float64, torch.bfloat16,
                                              torch.float16, torch.int8, torch.uint8, torch.int32,
                                              torch.int64, torch.bool}),
                            precisions=native_precisions())

    def supports(self, node) -> bool:
        return node.fallback is None

    def compile(self, graph: Graph, target: str | None = None) -> CPUExecutable:
        return CPUExecutable(graph, self.threads)
