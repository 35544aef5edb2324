"""ds.compile on the CPU matches eager PyTorch on the benchmark and breadth models."""

import pytest
import torch
from torch.utils._pytree import tree_leaves

import deepseek as ds
from benchmarks.models import BENCHMARK_MODELS
from deepseek.numerics import fresh_like
from tests.conftest import rel_l2
from tests.model_zoo import ZOO

SMALL = {  # the benchmark models at sizes that keep CI quick; same architectures
    "mnist_cnn": dict(batch=2),
    "resnet50": dict(batch=1, image=64),
    "bert_base": dict(batch=2, seq=16),
    "gpt2_small": dict(batch=1, seq=16),
}


def _check(model, inputs, engine_inputs=None):
    engine = ds.compile(model, inputs, backend="cpu")
    engine_inputs = engine_inputs or inputs
    with torch.no_grad():
        ref = tree_leaves(model(*engine_inputs))
    got = tree_leaves(engine(*engine_inputs))
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        if r.is_floating_point():
            assert rel_l2(g, r) < 1e-4
        else:
            assert torch.equal(g, r)
    return engine


@pytest.mark.parametrize("name", sorted(BENCHMARK_MODELS))
def test_benchmark_models_match_eager(name):
    model, inputs = BENCHMARK_MODELS[name](**SMALL[name])
    _check(model, inputs, fresh_like(inputs))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_breadth_models_match_eager(name):
    model, inputs = ZOO[name]()
    engine = _check(model, inputs, fresh_like(inputs))
    assert not engine.report().fallback_nodes, "every op of the zoo has a Deepseek kernel"


@pytest.mark.parametrize("name", ["llama_gqa_tiny", "gpt2_tiny"])
def test_symbolic_batch_and_sequence(name):
    model, inputs = ZOO[name]()
    engine = ds.compile(model, inputs, backend="cpu", dynamic_dims={0: {0: "batch", 1: "seq"}})
    assert str(engine.graph.inputs[0].spec) == "i64[batch,seq]"
    for batch, seq in ((3, 9), (1, 16), (5, 4)):
        ids = torch.randint(2, 50, (batch, seq))
        with torch.no_grad():
            ref = tree_leaves(model(ids))[0]
        assert rel_l2(tree_leaves(engine(ids))[0], ref) < 1e-4
    assert len(engine._parts[0].executable.plans) == 3  # one plan per concrete shape
