"""The capture cache (deepseek/frontend/capture_cache.py): a second capture of the same
program skips the decompositions and gives the same graph, with the model's current
weights; another program, small buffers with other values, a damaged entry or the
switch turned off never read a stale entry."""

from __future__ import annotations

import glob
import os

import pytest
import torch
import torch.nn as nn
from torch.export import ExportedProgram

import deepseek as ds
from deepseek.runtime.artifact import graph_to_json
from tests.conftest import count_calls, rel_l2


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 16)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return torch.softmax(self.fc(h) * self.scale, -1)


class _Gelu(_Net):
    def forward(self, x):  # another program: GELU where _Net has ReLU
        h = nn.functional.gelu(self.bn(self.conv(x))).mean((2, 3))
        return torch.softmax(self.fc(h) * self.scale, -1)


@pytest.fixture
def cache(fresh_cache):
    return fresh_cache / "capture"


def _decompositions(monkeypatch) -> list:
    """Counts run_decompositions calls (a miss runs it, a hit does not)."""
    return count_calls(monkeypatch, ExportedProgram, "run_decompositions")


def _model(cls=_Net, seed=0):
    torch.manual_seed(seed)
    m = cls().eval()
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2.0)
    return m


def test_second_capture_is_the_same_graph_without_decomposing(cache, monkeypatch):
    calls = _decompositions(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    first = ds.capture(_model(), (x,))
    assert len(calls) == 1 and len(glob.glob(str(cache / "*.json"))) == 1
    second = ds.capture(_model(), (x,))
    assert len(calls) == 1  # a hit: no second trace
    assert graph_to_json(second) == graph_to_json(first)
    engine = ds.compile(_model(), (x,), backend="cpu")
    y = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_l2(engine(y), _model()(y)) < 1e-5
    assert len(calls) == 1


def test_a_hit_takes_the_models_current_weights(cache, monkeypatch):
    calls = _decompositions(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    ds.capture(_model(), (x,))
    retrained = _model()  # same program, other (big) weights; tensors of 64 elements or
    with torch.no_grad():  # fewer, such as these biases, are keyed by value
        retrained.conv.weight.mul_(-1.5)
        retrained.fc.weight.add_(torch.randn(16, 8))
    engine = ds.compile(retrained, (x,), backend="cpu")
    assert len(calls) == 1
    y = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = retrained(y)
        assert rel_l2(engine(y), ref) < 1e-5
        assert rel_l2(_model()(y), ref) > 1e-2  # the weights do differ


def test_another_program_or_small_buffer_value_misses(cache, monkeypatch):
    calls = _decompositions(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    ds.capture(_model(), (x,))
    ds.capture(_model(_Gelu), (x,))
    assert len(calls) == 2
    other = _model()
    other.scale.fill_(2.0)  # a 0-d buffer: keyed by value
    engine = ds.compile(other, (x,), backend="cpu")
    assert len(calls) == 3
    with torch.no_grad():
        assert rel_l2(engine(x), other(x)) < 1e-5
    ds.capture(_model(), (torch.randn(4, 3, 8, 8),))  # another input shape
    assert len(calls) == 4


def test_damaged_entry_is_a_miss(cache, monkeypatch, caplog):
    calls = _decompositions(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    ds.capture(_model(), (x,))
    (entry,) = glob.glob(str(cache / "*.json"))
    with open(entry, "w") as f:
        f.write('{"graph": {"format": "deepseek-graph", "version": 1, "nodes": [42')
    engine = ds.compile(_model(), (x,), backend="cpu")
    assert len(calls) == 2 and "unreadable" in caplog.text
    with torch.no_grad():
        assert rel_l2(engine(x), _model()(x)) < 1e-5


def test_switched_off(cache, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_CAPTURE_CACHE", "0")
    calls = _decompositions(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    ds.capture(_model(), (x,))
    ds.capture(_model(), (x,))
    assert len(calls) == 2 and not os.path.exists(cache)
