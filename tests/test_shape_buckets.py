"""Shape buckets (deepseek.runtime.buckets): padding to the next power of two and slicing
back gives the exact-shape result, and models that mix samples are caught. The CUDA
backend uses them to replay one CUDA graph per bucket; here they wrap the CPU plans."""

import torch
from torch import nn

import deepseek as ds
from benchmarks.models import BENCHMARK_MODELS
from deepseek.runtime.buckets import ShapeBuckets
from tests.conftest import rel_l2


def _engine(model, example, dims):
    engine = ds.compile(model.eval(), example, backend="cpu", dynamic_dims=dims)
    exe = engine._parts[0].executable
    return engine.graph, exe


def test_buckets_pad_to_the_next_power_of_two_and_slice_back():
    model, (x,) = BENCHMARK_MODELS["mnist_cnn"](batch=4)
    graph, exe = _engine(model, (x,), {0: {0: "batch"}})
    buckets = ShapeBuckets(graph)
    assert buckets.enabled and buckets.symbol == "batch"
    assert [buckets.bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    shapes = []

    def run(xs):
        shapes.append(tuple(xs[0].shape))
        return exe(xs)

    for n in (5, 8, 3):
        xb = torch.randn(n, 1, 28, 28)
        got = buckets(run, exe, [xb])[0]
        with torch.no_grad():
            assert got.shape == (n, 10) and rel_l2(got, model(xb)) < 1e-5
    assert shapes == [(8, 1, 28, 28), (8, 1, 28, 28), (4, 1, 28, 28)]
    assert buckets.checked and buckets.enabled


class _MixesTheBatch(nn.Module):
    def forward(self, x):
        return torch.relu(x - x.mean(0, keepdim=True))  # every sample reads the others


def test_a_model_mixing_samples_turns_buckets_off_and_returns_the_exact_result():
    graph, exe = _engine(_MixesTheBatch(), (torch.randn(4, 6),), {0: {0: "batch"}})
    buckets = ShapeBuckets(graph)
    assert buckets.enabled  # the signature allows it; the first padded call tells
    x = torch.randn(5, 6)
    got = buckets(exe, exe, [x])[0]
    torch.testing.assert_close(got, _MixesTheBatch()(x))
    assert not buckets.enabled
    ran = []
    buckets(lambda xs: ran.append(xs) or exe(xs), exe, [torch.randn(3, 6)])
    assert ran[0][0].shape == (3, 6)  # no padding any more


class _Flatten(nn.Module):
    def forward(self, x):
        return x.reshape(-1) * 2  # the symbol inside an expression: batch*6


def test_unsound_signatures_get_no_buckets():
    graph, _ = _engine(_Flatten(), (torch.randn(4, 6),), {0: {0: "batch"}})
    assert not ShapeBuckets(graph).enabled
    static, _ = _engine(_Flatten(), (torch.randn(4, 6),), None)
    assert not ShapeBuckets(static).enabled  # nothing symbolic
    two, _ = _engine(nn.Linear(6, 3), (torch.randn(2, 4, 6),), {0: {0: "batch", 1: "seq"}})
    assert not ShapeBuckets(two).enabled  # two symbols: which one pads is not ours to pick
    one, _ = _engine(nn.Linear(6, 3), (torch.randn(2, 6),), {0: {0: "batch"}})
    assert ShapeBuckets(one).enabled
    one.donated = frozenset(v.name for v in one.inputs)  # written in place: a copy would not do
    assert not ShapeBuckets(one).enabled
