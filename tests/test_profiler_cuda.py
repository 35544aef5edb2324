"""The profiler on a GPU: kernels per node through torch.profiler/CUPTI, device time,
the fallback warning inside a GPU graph and host synchronization.

This version has no CUDA backend, so the test brings a small one: it runs the
reference kernels on CUDA tensors, node by node, and offers the profiler's
``instrumented(hook)`` protocol (or not, for the per-partition path). Skipped
without a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import deepseek as ds
from deepseek.backends import Backend, Capabilities, hal, register_backend
from deepseek.ir.graph import Value
from deepseek.ir.interpreter import bind_inputs, run_node
from tests.conftest import rel_l2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _CudaExecutable:
    def __init__(self, graph, consts=None, hook=None):
        self.graph, self.hook = graph, hook
        self.consts = consts or {n: t.cuda() for n, t in graph.constants.items()}

    def __call__(self, inputs):
        g, hook = self.graph, self.hook
        env = bind_inputs(g, inputs)
        values = {id(v): t for v, t in zip(g.inputs, inputs)}
        values.update({id(v): self.consts[n] for n, v in g.const_values.items()})
        with torch.no_grad():
            for i, node in enumerate(g.nodes):
                if hook is not None:
                    hook(i)
                args = [values[id(x)] if isinstance(x, Value) else x for x in node.inputs]
                for o, t in zip(node.outputs, run_node(node, args, env)):
                    values[id(o)] = t
            if hook is not None:
                hook(len(g.nodes))
        return [values[id(v)] for v in g.outputs]


class _Hooked(_CudaExecutable):
    def instrumented(self, hook):
        return _Hooked(self.graph, self.consts, hook)


class TorchCUDA(Backend):
    hooked = True

    def capabilities(self):
        return Capabilities(device="cuda:0", priority=-5)

    def supports(self, node):
        return node.fallback is None

    def compile(self, graph, target=None):
        return (_Hooked if self.hooked else _CudaExecutable)(graph)

    def execute(self, executable, inputs, outputs=None):
        return executable(inputs)


class Opaque(TorchCUDA):
    hooked = False


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(256, 512)
        self.fc2 = nn.Linear(512, 64)

    def forward(self, x):
        h = torch.relu(self.fc1(x)) * 2.0
        h = torch.special.erfc(h)  # no Deepseek kernel: a CPU fallback inside the GPU graph
        return self.fc2(h).sum(-1)


@pytest.fixture
def backends():
    hal.discover()
    saved = dict(hal._FACTORIES), dict(hal._INSTANCES)
    register_backend("torch-cuda-test", TorchCUDA)
    register_backend("torch-cuda-opaque-test", Opaque)
    yield
    hal._FACTORIES.clear(), hal._FACTORIES.update(saved[0])
    hal._INSTANCES.clear(), hal._INSTANCES.update(saved[1])


def test_kernels_are_mapped_to_nodes_on_the_gpu(backends, tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(64, 256)
    engine = ds.compile(model, (x,), backend="torch-cuda-test")
    assert [p.device for p in engine._parts] == ["cuda:0", "cpu", "cuda:0"]
    with ds.profile(engine) as prof:  # kernels default to on: a partition is on the GPU
        for _ in range(4):
            out = engine(x)
    assert rel_l2(out.cpu(), model(x)) < 1e-4
    assert prof.kernels and prof.kernel_trace is not None
    report = prof.report()
    gpu_rows = [r for r in report.ops if r["device"] == "cuda:0" and r["flops"] > 0]
    assert gpu_rows
    for r in gpu_rows:  # device kernels, not the CPU ops that launched them
        assert r["kernels"] and not any(k["name"].startswith("aten::") for k in r["kernels"])
        assert r["time_ms"] > 0
    mm = next(r for r in gpu_rows if r["op"] == "addmm")
    assert any("gemm" in k["name"].lower() or "cutlass" in k["name"].lower()
               or "sm90" in k["name"].lower() for k in mm["kernels"]), mm["kernels"]
    kinds = {s["kind"]: s for s in report.suggestions}
    assert kinds["cpu_fallback"]["severity"] == "high"
    assert "inside a GPU graph" in kinds["cpu_fallback"]["detail"]
    assert kinds["host_sync"]["severity"] == "high"
    kernels = [e for e in report.trace["traceEvents"] if e.get("pid") == 2 and e["ph"] == "X"]
    assert kernels and any(e["cat"] == "kernel" for e in kernels)
    peaks = report.meta["peaks"]["cuda:0"]
    assert peaks["gflops"] > 1000 and peaks["gbps"] > 200
    report.save(str(tmp_path))


def test_a_gpu_backend_without_hooks_is_timed_per_partition(backends):
    model = Net().eval()
    x = torch.randn(64, 256)
    engine = ds.compile(model, (x,), backend="torch-cuda-opaque-test")
    with ds.profile(engine, kernels=False) as prof:
        for _ in range(3):
            engine(x)
    report = prof.report()
    names = sorted(r["name"] for r in report.ops)
    assert "partition_0" in names and "partition_2" in names
    assert abs(sum(r["share"] for r in report.ops) - 100) < 1


def test_the_cuda_backend_is_profiled(tmp_path):
    from deepseek.backends import available_backends

    if "cuda" not in available_backends():
        pytest.skip("this version has no 'cuda' backend")
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 64)).eval()
    x = torch.randn(64, 256)
    engine = ds.compile(model, (x,), backend="cuda")
    with ds.profile(engine) as prof:
        for _ in range(4):
            out = engine(x)
    assert rel_l2(out.cpu(), model(x)) < 1e-3
    report = prof.report()
    assert abs(sum(r["share"] for r in report.ops) - 100) < 1
    per_node = all(p.mode == "nodes" for p in prof.probes)
    events = [e for e in report.trace["traceEvents"] if e.get("cat") in ("node", "partition")]
    units = len(engine.graph.nodes) if per_node else len(engine._parts)
    assert len(events) == 3 * units  # 4 calls, the first one warm-up
    kernels = [e for e in report.trace["traceEvents"] if e.get("pid") == 2 and e["ph"] == "X"]
    assert kernels, "no GPU kernel was attributed to a node or partition"
    assert not [s for s in report.suggestions if s["kind"] == "cpu_fallback"]
    report.save(str(tmp_path))
