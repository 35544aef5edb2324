"""torch.compile(model, backend="deepseek"): graph breaks stay eager, graphs run on Deepseek."""

import pytest
import torch
import torch.nn as nn

import deepseek.api
from tests.conftest import rel_l2


class Branchy(nn.Module):
    """Data-dependent Python control flow: dynamo must break the graph at the `if`."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.bn = nn.BatchNorm1d(16)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            return torch.relu(self.b(h))
        return self.b(self.bn(h) * 2)


@pytest.fixture
def engines(monkeypatch):
    built = []
    real = deepseek.api._build_engine

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(deepseek.api, "_build_engine", spy)
    torch._dynamo.reset()
    yield built
    torch._dynamo.reset()


def test_data_dependent_branch_runs_correctly(engines):
    model = Branchy().eval()
    compiled = torch.compile(model, backend="deepseek")
    taken = set()
    with torch.no_grad():
        for i in range(8):
            x = torch.randn(4, 8) + (3.0 if i % 2 else -3.0)
            taken.add(bool(model.a(x).sum() > 0))
            assert rel_l2(compiled(x), model(x)) < 1e-5
    assert taken == {True, False}, "both branches were exercised"
    assert len(engines) >= 3, "the graphs on both sides of the break were compiled by Deepseek"


def test_input_order_and_unused_inputs(engines):
    def f(x, unused, w, b):
        return torch.nn.functional.batch_norm(x, b, w, None, None) * 2 + x.sum()

    compiled = torch.compile(f, backend="deepseek")
    args = (torch.randn(4, 8), torch.randn(3), torch.rand(8) + 0.5, torch.randn(8))
    assert rel_l2(compiled(*args), f(*args)) < 1e-5
    assert engines


def test_training_gradients_match_eager(engines):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    ref = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="deepseek")
    x = torch.randn(5, 8)
    compiled(x).sum().backward()
    ref(x).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_l2(p.grad, q.grad) < 1e-5
    assert len(engines) >= 2, "forward and backward graphs both ran on Deepseek"
