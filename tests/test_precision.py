"""precision= in ds.compile: bf16/fp16 graphs keep the float32 interface and stay accurate."""

import pytest
import torch
from torch.utils._pytree import tree_leaves

import deepseek as ds
from deepseek.ir.ops import Op, Prop
from tests.conftest import rel_l2
from tests.model_zoo import ZOO


@pytest.mark.parametrize("name", ["bert_tiny_padded", "llama_gqa_tiny", "mobilenetv2_tiny",
                                  "lstm_classifier"])
def test_bf16_matches_fp32_eager_within_bf16_tolerance(name):
    model, inputs = ZOO[name]()
    engine = ds.compile(model, inputs, backend="cpu", precision="bf16")
    assert engine.report().passes[0]["name"] == "map_to_tensorcore"
    matmuls = [n for n in engine.graph.nodes if n.opdef.has(Prop.MATMUL)]
    assert matmuls and all(x.spec.dtype == torch.bfloat16 for n in matmuls
                           for x in n.input_values() if x.spec.dtype.is_floating_point)
    with torch.no_grad():
        ref = tree_leaves(model(*inputs))[0]
    got = tree_leaves(engine(*inputs))[0]
    assert got.dtype == torch.float32  # the model's interface is kept
    assert rel_l2(got, ref) < 1e-2


def test_fp16_and_unknown_precisions():
    model, inputs = ZOO["small_cnn"]()
    engine = ds.compile(model, inputs, backend="cpu", precision="fp16")
    assert any(n.op is Op.TO_COPY for n in engine.graph.nodes)
    assert rel_l2(engine(*inputs), model(*inputs)) < 1e-2
    with pytest.raises(ds.DeepseekError, match="fp8"):
        ds.compile(model, inputs, backend="cpu", precision="fp8")
    with pytest.raises(ds.DeepseekError, match="precision must be one of"):
        ds.compile(model, inputs, backend="cpu", precision="int4")


def test_bf16_does_not_touch_the_captured_graph():
    model, inputs = ZOO["small_cnn"]()
    graph = ds.capture(model, inputs)
    before = str(graph)
    ds.compile(graph, backend="cpu", precision="bf16")
    assert str(graph) == before
