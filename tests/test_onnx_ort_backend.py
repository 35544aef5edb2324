"""ONNX Runtime as a HAL plug-in: entry-point registration, lazy import, availability,
supports() and partitions, results matching eager PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import deepseek as ds
from deepseek.backends import get_backend, hal
from deepseek.backends.onnxruntime import OnnxRuntimeBackend
from deepseek.ir.graph import Graph, Node
from deepseek.ir.interpreter import infer_specs
from deepseek.ir.ops import Op
from deepseek.ir.types import TensorSpec
from tests.conftest import rel_l2
from tests.model_zoo import ZOO

pytest.importorskip("onnxruntime")


def test_registered_through_the_entry_point_and_import_stays_lazy():
    script = (
        "import sys, json\n"
        "import deepseek\n"
        "lazy = 'onnxruntime' not in sys.modules and 'onnx' not in sys.modules\n"
        "from importlib.metadata import entry_points\n"
        "eps = {e.name: e.value for e in entry_points(group='deepseek.backends')}\n"
        "import deepseek.backends as b\n"
        "print(json.dumps({'lazy': lazy, 'ep': eps.get('onnxruntime'), "
        "'available': b.available_backends(), 'auto': b.get_backend('auto').name}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["lazy"], "import deepseek must not import onnx or onnxruntime"
    assert info["ep"] == "deepseek.backends.onnxruntime:OnnxRuntimeBackend"
    assert "onnxruntime" in info["available"]
    assert info["auto"] != "onnxruntime", "auto keeps Deepseek's own CPU backend first"


def test_unavailable_without_onnxruntime(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    b = OnnxRuntimeBackend()
    assert not b.is_available()


@pytest.mark.parametrize("name", ["small_cnn", "bert_tiny_padded", "llama_gqa_tiny"])
def test_models_run_in_onnxruntime_and_match_eager(name):
    model, inputs = ZOO[name]()
    engine = ds.compile(model, inputs, backend="onnxruntime")
    parts = engine.report().to_dict()["partitions"]
    assert parts[0]["backend"] == "onnxruntime" and sum(p["nodes"] for p in parts
                                                        if p["backend"] == "onnxruntime") >= 8
    fresh = tuple(torch.randn_like(t) if t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        ref = model(*fresh)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    got = engine(*fresh)
    got = got if isinstance(got, torch.Tensor) else got[0]
    assert rel_l2(got, ref) < 1e-4


def test_unsupported_nodes_fall_back_and_partitions_split():
    class M(torch.nn.Module):
        def forward(self, x):
            y = torch.relu(x) * 2
            z = torch.special.erfinv(torch.tanh(y) * 0.5)  # erfinv: no ONNX export
            return z + y.sum()

    x = torch.randn(4, 5)
    engine = ds.compile(M(), (x,), backend="onnxruntime", opt_level=0)
    backends = [p["backend"] for p in engine.report().to_dict()["partitions"]]
    assert backends == ["onnxruntime", "reference", "onnxruntime"], backends
    x2 = torch.randn(4, 5)
    torch.testing.assert_close(engine(x2), M()(x2))


def test_supports_and_threads():
    b = OnnxRuntimeBackend(threads=2)
    g = Graph()
    x = g.add_input("x", TensorSpec((3, 4), torch.float32))

    def node(op, ins, attrs):
        return Node(op, ins, attrs, [type(x)("o", s) for s in infer_specs(Node(op, ins, attrs, []), {})])

    assert b.supports(node(Op.RELU, [x], {}))
    assert not b.supports(node(Op.ERFINV, [x], {}))
    fb = Node(None, [x], {}, [x], fallback="aten.einsum.default")
    assert not b.supports(fb)
    assert b.capabilities().extras["threads"] == 2 and b.capabilities().priority < \
        get_backend("cpu").capabilities().priority


def test_symbolic_batch_in_onnxruntime():
    model, inputs = ZOO["small_cnn"]()
    engine = ds.compile(model, inputs, backend="onnxruntime", dynamic_dims={0: {0: "batch"}})
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            assert rel_l2(engine(x), model(x)) < 1e-5
    assert hal.available_backends().count("onnxruntime") == 1
