"""Third-party backends: the registry, the HAL's errors, and a plug-in installed with pip.

The plug-in is ``tests/plugins/deepseek_toy_backend`` (the worked example of
docs/writing-a-backend.md). ``test_installed_plugin`` installs it for real into
a temporary directory (offline, no dependencies) and drives it from a fresh
interpreter, so discovery goes through the ``deepseek.backends`` entry point.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import deepseek as ds
from deepseek.backends import Backend, Capabilities, available_backends, get_backend, hal
from deepseek.backends import register_backend
from deepseek.ir.graph import Graph, Node
from deepseek.ir.interpreter import infer_specs
from deepseek.ir.ops import Op
from deepseek.ir.types import TensorSpec
from tests.conftest import rel_l2

PLUGIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins",
                          "deepseek_toy_backend")


@pytest.fixture
def clean_registry():
    """Undo register_backend calls so test backends never leak into other tests."""
    hal.discover()
    factories, instances = dict(hal._FACTORIES), dict(hal._INSTANCES)
    yield
    hal._FACTORIES.clear()
    hal._FACTORIES.update(factories)
    hal._INSTANCES.clear()
    hal._INSTANCES.update(instances)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)).sum(-1)


# --------------------------------------------------------------------------- #
# in-process: the registry and the base class's errors
# --------------------------------------------------------------------------- #
class _Mine(Backend):
    """A complete backend in a few lines: it claims everything and uses the reference kernels."""

    def __init__(self):
        self.calls = 0

    def capabilities(self):
        return Capabilities(device="cpu", priority=-100)

    def supports(self, node):
        return node.fallback is None

    def compile(self, graph, target=None):
        return graph

    def execute(self, executable, inputs, outputs=None):
        from deepseek.ir.interpreter import run_graph

        self.calls += 1
        with torch.no_grad():
            return run_graph(executable, inputs)


def test_register_backend(clean_registry):
    register_backend("mine", _Mine)
    assert "mine" in available_backends()
    b = get_backend("mine")
    assert isinstance(b, _Mine) and b.name == "mine"
    assert get_backend("mine") is b  # one shared instance
    assert get_backend("auto").name != "mine"  # priority -100 never wins "auto"

    model, x = _Tiny().eval(), torch.randn(3, 8)
    engine = ds.compile(model, (x,), backend="mine")
    assert engine.report().to_dict()["backend"] == "mine"
    assert [p["backend"] for p in engine.report().to_dict()["partitions"]] == ["mine"]
    assert rel_l2(engine(x), model(x)) < 1e-5
    assert b.calls == 1


def test_register_backend_rejects_bad_names_and_factories(clean_registry):
    with pytest.raises(ds.BackendError, match="non-empty string name"):
        register_backend("", _Mine)
    register_backend("notabackend", lambda: object())
    with pytest.raises(ds.BackendError, match="not a deepseek.backends.Backend"):
        get_backend("notabackend")


def test_unknown_backend_lists_available():
    with pytest.raises(ds.BackendError) as e:
        get_backend("no-such-backend")
    msg = str(e.value)
    assert "no-such-backend" in msg
    for name in available_backends():
        assert repr(name) in msg
    assert "'cpu'" in msg and "'reference'" in msg and "deepseek.backends" in msg

    model, x = _Tiny().eval(), torch.randn(3, 8)
    with pytest.raises(ds.BackendError, match="available: .*'reference'"):
        ds.compile(model, (x,), backend="no-such-backend")


class _Empty(Backend):
    pass


class _NoCompile(Backend):
    def capabilities(self):
        return Capabilities(device="cpu", priority=-100)

    def supports(self, node):
        return True


@pytest.mark.parametrize("call, needs", [
    (lambda b: b.capabilities(), "needs capabilities()"),
    (lambda b: b.supports(None), "needs supports(node)"),
    (lambda b: b.compile(Graph()), "needs compile(graph, target)"),
    (lambda b: b.execute(None, []), "needs execute(executable, inputs)"),
])
def test_missing_methods_raise_naming_them(call, needs):
    with pytest.raises(NotImplementedError, match=r"backend 'unnamed' " + needs.replace("(", r"\(")
                       .replace(")", r"\)")):
        call(_Empty())


def test_missing_method_surfaces_through_compile(clean_registry):
    register_backend("halfdone", _NoCompile)
    model, x = _Tiny().eval(), torch.randn(3, 8)
    with pytest.raises(NotImplementedError, match=r"backend 'halfdone' needs compile"):
        ds.compile(model, (x,), backend="halfdone")
    register_backend("blank", _Empty)
    with pytest.raises(NotImplementedError, match=r"backend 'blank' needs supports"):
        ds.compile(model, (x,), backend="blank")


def test_base_allocate_deallocate():
    b = _Mine()
    buf = b.allocate(64)
    assert buf.dtype == torch.uint8 and buf.numel() == 64 and buf.device.type == "cpu"
    b.deallocate(buf)


# --------------------------------------------------------------------------- #
# op-by-op against the reference backend (the recipe of docs/writing-a-backend.md)
# --------------------------------------------------------------------------- #
def _load_toy_from_source():
    """Import the plug-in's module straight from the source tree (no install)."""
    path = os.path.join(PLUGIN_DIR, "deepseek_toy_backend", "__init__.py")
    spec = importlib.util.spec_from_file_location("_toy_backend_src", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def one_op_graph(op, tensors, attrs=None) -> Graph:
    """A graph of one node ``op(*tensors, **attrs)``, its inputs the graph's inputs."""
    g = Graph()
    xs = [g.add_input(f"x{i}", TensorSpec.of(t)) for i, t in enumerate(tensors)]
    attrs = dict(attrs or {})
    specs = infer_specs(Node(op, xs, attrs, []), {})
    node = g.add_node(op, xs, attrs, specs, name="out")
    g.outputs = list(node.outputs)
    return g


OP_CASES = [
    (Op.RELU, [(4, 5)], {}),
    (Op.ADD_TENSOR, [(4, 5), (4, 5)], {"alpha": 1}),
    (Op.MUL_TENSOR, [(4, 5), (1, 5)], {}),
    (Op.SIGMOID, [(2, 3, 4)], {}),
    (Op.MM, [(4, 6), (6, 3)], {}),
    (Op.ADDMM, [(3,), (4, 6), (6, 3)], {"beta": 1, "alpha": 1}),
    (Op.CONVOLUTION, [(2, 3, 8, 8), (4, 3, 3, 3), (4,)],
     {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "transposed": False,
      "output_padding": [0, 0], "groups": 1}),
]


@pytest.mark.parametrize("op, shapes, attrs", OP_CASES, ids=[c[0].name for c in OP_CASES])
def test_toy_backend_op_by_op(op, shapes, attrs):
    toy = _load_toy_from_source().ToyBackend()
    ref = get_backend("reference")
    tensors = [torch.randn(s) for s in shapes]
    g = one_op_graph(op, tensors, attrs)
    assert toy.supports(g.nodes[0])
    got = toy.execute(toy.compile(g), tensors)
    want = ref.execute(ref.compile(g), tensors)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_l2(a, b) < 1e-6
    assert toy.nodes_executed == 1
    out = [torch.empty_like(w) for w in want]  # the outputs= form writes in place
    assert toy.execute(toy.compile(g), tensors, out)[0] is out[0]
    assert rel_l2(out[0], want[0]) < 1e-6


def test_toy_backend_declines_other_ops():
    toy = _load_toy_from_source().ToyBackend()
    t = torch.randn(4, 5)
    assert not toy.supports(one_op_graph(Op.SUM_DIM_INTLIST, [t], {"dim": [1]}).nodes[0])
    assert not toy.supports(one_op_graph(Op.VIEW, [t], {"size": [20]}).nodes[0])
    with pytest.raises(ds.BackendError, match="cannot compile"):
        toy.compile(one_op_graph(Op.VIEW, [t], {"size": [20]}))


# --------------------------------------------------------------------------- #
# the plug-in installed with pip, discovered through its entry point
# --------------------------------------------------------------------------- #
_CHILD = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import torch, torch.nn as nn
import deepseek as ds
import deepseek.backends

class Net(nn.Module):  # conv -> relu -> pool -> flatten -> MLP
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(32, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))

torch.manual_seed(0)
model, x = Net().eval(), torch.randn(2, 3, 8, 8)
available = deepseek.backends.available_backends()
engine = ds.compile(model, (x,), backend="toy")
x2 = torch.randn(2, 3, 8, 8)
with torch.no_grad():
    got, want = engine(x2), model(x2)
rel = float((got.double() - want.double()).norm() / want.double().norm())
toy = deepseek.backends.get_backend("toy")
import deepseek_toy_backend
print(json.dumps({
    "available": available,
    "auto": deepseek.backends.get_backend("auto").name,
    "rel_l2": rel,
    "report_backend": engine.report().to_dict()["backend"],
    "partitions": engine.report().to_dict()["partitions"],
    "nodes_executed": toy.nodes_executed,
    "executions": toy.executions,
    "toy_type": type(toy).__module__ + "." + type(toy).__name__,
    "plugin_file": deepseek_toy_backend.__file__,
}))
"""


def test_installed_plugin(tmp_path):
    src = tmp_path / "src"
    target = tmp_path / "site"
    # Build from a copy: pip builds in the source tree and would leave build/ and *.egg-info.
    shutil.copytree(PLUGIN_DIR, src, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--no-cache-dir", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=120, env=env)
    assert pip.returncode == 0, f"pip install failed:\n{pip.stdout}\n{pip.stderr}"
    assert (target / "deepseek_toy_backend" / "__init__.py").exists()
    assert sorted(p.name for p in target.iterdir()
                  if p.name.endswith(".dist-info")) == ["deepseek_toy_backend-0.1.0.dist-info"]

    child_env = {**env, "PYTHONPATH": os.pathsep.join(
        [str(target)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    child_env.pop("DEEPSEEK_CPU_THREADS", None)
    run = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         timeout=180, env=child_env, cwd=str(tmp_path))
    assert run.returncode == 0, f"child failed:\n{run.stdout}\n{run.stderr}"
    r = json.loads(run.stdout.strip().splitlines()[-1])

    assert "toy" in r["available"], r["available"]
    assert {"cpu", "reference"} <= set(r["available"])
    assert r["auto"] != "toy"  # priority -5: "auto" never picks it
    assert r["toy_type"] == "deepseek_toy_backend.ToyBackend"
    assert r["plugin_file"].startswith(str(target))  # the installed copy, not the source tree
    assert r["report_backend"] == "toy"
    assert r["rel_l2"] < 1e-5, r
    backends = [p["backend"] for p in r["partitions"]]
    assert "toy" in backends and "reference" in backends, r["partitions"]
    assert all(p["device"] == "cpu" for p in r["partitions"])
    toy_nodes = sum(p["nodes"] for p in r["partitions"] if p["backend"] == "toy")
    assert r["nodes_executed"] > 0
    assert r["nodes_executed"] == toy_nodes  # one call of the engine ran every toy node once
    assert r["executions"] == backends.count("toy")


# --------------------------------------------------------------------------- #
# backend="auto" with a plug-in that cannot run here
# --------------------------------------------------------------------------- #
class _Unavailable(Backend):
    """A plug-in installed on a machine without its device: what is_available() is for."""

    def is_available(self):
        return False

    def capabilities(self):
        return Capabilities(device="cpu", priority=1000)


class _BrokenFactory(Backend):
    def __init__(self):
        raise RuntimeError("no device driver")


@pytest.mark.parametrize("factory", [_Unavailable, _BrokenFactory])
def test_auto_skips_unavailable_backends(clean_registry, factory):
    register_backend("elsewhere", factory)
    assert get_backend("auto").name == "cpu"


def test_stage_three_maps_every_precision_to_the_backends_device_type():
    """Hardware passes target the backend's device type for fp32 and int8 too (a CUDA
    backend's fp32 graph gets CUDA's layout rewrites); a plug-in without capabilities()
    still compiles fp32/int8 graphs (for the CPU type) but not a reduced precision."""
    from deepseek.api import _device_type

    class _Gpu(_NoCompile):
        def capabilities(self):
            return Capabilities(device="cuda:1", priority=-100)

    for precision in ("fp32", "int8", "bf16", "fp8"):
        assert _device_type(_Gpu(), precision) == "cuda"
    assert _device_type(_Empty(), "fp32") == _device_type(_Empty(), "int8") == "cpu"
    with pytest.raises(NotImplementedError, match="needs capabilities"):
        _device_type(_Empty(), "bf16")
