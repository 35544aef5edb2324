"""The CPU backend's kernel choices kept on disk (deepseek/backends/cpu/choices.py): a
second compile of the same graph on this machine measures nothing and writes the same
plan; another shape is measured; a damaged table or the switch turned off measure."""

from __future__ import annotations

import glob

import pytest
import torch
import torch.nn as nn

import deepseek as ds
from deepseek.backends.cpu import codegen
from tests.conftest import count_calls, rel_l2
from tests.test_cpu_plans import _plan_source


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return nn.functional.gelu(self.fc(h.flatten(1)))


@pytest.fixture
def cache(fresh_cache):
    return fresh_cache / "cpu_choices"


def _measured(monkeypatch) -> list:
    return count_calls(monkeypatch, codegen, "_measure")


def _compiled(x):
    torch.manual_seed(0)
    model = _Net().eval()
    engine = ds.compile(model, (x,), backend="cpu")
    y = torch.randn_like(x)
    with torch.no_grad():
        assert rel_l2(engine(y), model(y)) < 1e-5
    return engine


def test_second_compile_measures_nothing_and_writes_the_same_plan(cache, monkeypatch):
    calls = _measured(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    first = _plan_source(_compiled(x), merged=True)
    assert calls and len(glob.glob(str(cache / "*.json"))) == 1
    n = len(calls)
    assert _plan_source(_compiled(x), merged=True) == first
    assert len(calls) == n
    _compiled(torch.randn(3, 3, 8, 8))  # another batch: other questions
    assert len(calls) > n


def test_damaged_table_or_switched_off_measures(cache, monkeypatch, caplog):
    calls = _measured(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    _compiled(x)
    (table,) = glob.glob(str(cache / "*.json"))
    with open(table, "w") as f:
        f.write("[1, 2")
    n = len(calls)
    _compiled(x)
    assert len(calls) > n and "unreadable" in caplog.text
    monkeypatch.setenv("DEEPSEEK_CPU_CHOICE_CACHE", "0")
    n = len(calls)
    _compiled(x)
    _compiled(x)
    assert len(calls) >= n + 2  # measured both times
