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
from deepseek.ir.graph import Graph, Value
from deepseek.ir.interpreter import bind_inputs
from deepseek.ir.ops import Op
from deepseek.runtime.buckets import ShapeBuckets

log = logging.getLogger(__name__)


def _pure_cast(node) -> bool:
    """A dtype cast and nothing else (no device, layout or memory-format change)."""
    return node.op is Op.TO_COPY and all(v is None or v is False or v == torch.preserve_format
                                         for k, v in node.attrs.items() if k != "dtype")


def strip_boundary_casts(graph: Graph) -> tuple[Graph, list, list]:
    """``graph`` less the dtype casts of its inputs (read by nothing else) and of its
    outputs (of values nothing else reads): a replayed CUDA graph copies every input
    into its static buffer and every output out of one anyway, and those copies cast
    for free. Returns the graph and, per input and output, the dtype the copy casts to
    (None: none). A bf16 engine called with float32 saves two kernels a call."""
    users, producers = graph.users(), graph.producers()
    outputs = list(graph.outputs)
    inputs, in_dtypes, dropped = list(graph.inputs), [None] * len(graph.inputs), set()
    for i, v in enumerate(graph.inputs):
        readers = users.get(v, [])
        if len(readers) == 1 and _pure_cast(readers[0]) and v not in outputs:
            inputs[i] = readers[0].outputs[0]
            in_dtypes[i] = inputs[i].spec.dtype
            dropped.add(id(readers[0]))
    out_dtypes = [None] * len(outputs)
    for j, v in enumerate(graph.outputs):
        node = producers.get(v)
        if node is None or not _pure_cast(node) or id(node) in dropped or v in users \
                or outputs.count(v) > 1:
            continue
        src = node.inputs[0]
        if isinstance(src, Value) and not graph.is_constant(src) and src not in inputs \
                and len(users.get(src, [])) == 1 and src not in outputs:
            outputs[j], out_dtypes[j] = src, v.spec.dtype
            dropped.add(id(node))
    if not dropped:
        return graph, in_dtypes, out_dtypes
    stripped = copy.copy(graph)  # nodes are shared, not changed
    stripped.inputs, stripped.outputs = inputs, outputs
    stripped.nodes = [n for n in graph.nodes if id(n) not in dropped]
    return stripped, in_dtypes, out_dtypes


def _key(inputs: Sequence[torch.Tensor]) -> tuple:
    """The (shape, dtype) signature a plan or a captured graph is kept under."""
    return tuple([(t.shape, t.dtype) for t in inputs])


class _GraphReplay:
    """One captured CUDA graph: static inputs in, static outputs out; the copies in and
    out cast where the graph's boundary casts were stripped (``strip_boundary_casts``).
    Its intermediates live in ``pool``, the memory pool that every graph captured for one
    executable shares (see ``CUDAExecutable``)."""

    def __init__(self, plan, static_in: list[torch.Tensor], out_dtypes: Sequence, pool):
        self.plan = plan
        self.static_in = static_in
        self.out_dtypes = out_dtypes
        self.pool = pool
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton/cuBLAS pick kernels, allocate workspaces
            for _ in range(2):
                plan(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.static_out = plan(self.static_in)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for dst, src in zip(self.static_in, inputs):
            # detached: a copy into a static buffer is no step of the caller's autograd graph
            dst.copy_(src.detach() if src.requires_grad else src, non_blocking=True)
        self.graph.replay()
        # the next replay overwrites the static outputs: hand out copies
        return [t.to(d or t.dtype, copy=True) for t, d in zip(self.static_out, self.out_dtypes)]


class CUDAExecutable:
    """A compiled partition: weights on the device, a plan and a CUDA graph per shape.

    The graphs captured for its shapes (shape buckets: 1, 2, 4, ... 128 for a dynamic
    batch) share one memory pool, the executable's arena: a graph's intermediates are
    dead once its replay ends, so the next shape's graph may reuse their memory, and
    the pool grows to the largest graph's working set rather than the sum of all of
    them. Static inputs and outputs stay each graph's own; outputs are copied out in
    stream order before any later replay. Calls of one executable do not overlap (as
    before: one shape's static buffers are shared by its calls)."""

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
        self.pool = None  # the captured graphs' memory pool (made at the first capture)
        # what a captured graph runs: the graph less its boundary casts
        self.replayed, self.in_dtypes, self.out_dtypes = strip_boundary_casts(graph)
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
        key = _key(inputs)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self._generate(self.graph, inputs)
        return plan

    def _generate(self, graph: Graph, inputs: Sequence[torch.Tensor]):
        return generate_plan(graph, bind_inputs(graph, inputs), str(self.device),
                             constants=self.constants, instrument=self.hook, tuner=self.tuner)

    def _capture(self, inputs: Sequence[torch.Tensor]) -> "_GraphReplay":
        static_in = [t.to(d or t.dtype, copy=True) for t, d in zip(inputs, self.in_dtypes)]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return _GraphReplay(self._generate(self.replayed, static_in), static_in,
                            self.out_dtypes, self.pool)

    def _runner(self, inputs: Sequence[torch.Tensor]):
        key = _key(inputs)
        runner = self.runners.get(key)
        if runner is None:
            if self.cuda_graphs:
                try:
                    runner = self._capture(inputs)
                except RuntimeError as e:  # e.g. an op that synchronizes with the host
                    log.warning("CUDA graph capture failed (%s); running kernel by kernel", e)
            if runner is None:
                runner = self.plan_for(inputs)
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
        # a captured graph of these shapes replays without the settings below (its kernels
        # are fixed; autograd sees nothing): the context costs ~9 us of a 70 us MNIST call
        runner = self.runners.get(_key(inputs))
        if type(runner) is _GraphReplay and torch.cuda.current_device() == self.device.index:
            return runner(inputs)
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
