"""The capture cache (deepseek/frontend/capture_cache.py): a second capture of the same
program skips the decompositions and gives the same graph, with the model's current
weights; a second capture of the same model skips the trace too (the model's
fingerprint, deepseek/frontend/fingerprint.py); another program, small buffers with other
values, changed module state, code or globals, hooks, a damaged entry or link, or the
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


def _entries(cache) -> list[str]:
    """The cache's entries (not the links from model fingerprints, ``m-*.json``)."""
    return [p for p in glob.glob(str(cache / "*.json"))
            if not os.path.basename(p).startswith("m-")]


def _traces(monkeypatch) -> list:
    """Counts torch.export calls (a capture found by the model's fingerprint makes none)."""
    import deepseek.frontend.torch_export as te

    return count_calls(monkeypatch, te, "export")


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
    assert len(calls) == 1 and len(_entries(cache)) == 1
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
    (entry,) = _entries(cache)
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


_FACTOR = 2.0  # a module-level global that _Global.forward reads


class _Global(_Net):
    def forward(self, x):
        return super().forward(x) * _FACTOR


class _Flagged(_Net):
    def __init__(self):
        super().__init__()
        self.use_gelu = False  # plain module state that changes the program

    def forward(self, x):
        h = self.bn(self.conv(x))
        h = nn.functional.gelu(h) if self.use_gelu else torch.relu(h)
        return torch.softmax(self.fc(h.mean((2, 3))) * self.scale, -1)


def _versioned(negate: bool) -> type:
    """Two classes with one qualified name and different code (an edited source file)."""
    class Edited(_Net):
        def forward(self, x):
            y = super().forward(x)
            return -y if negate else y
    return Edited


def _check(engine, model, x) -> None:
    with torch.no_grad():
        assert rel_l2(engine(x), model(x)) < 1e-5


def test_second_capture_of_the_same_model_does_not_trace(cache, monkeypatch):
    traces, calls = _traces(monkeypatch), _decompositions(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    first = ds.capture(_model(), (x,))
    assert len(traces) == 1 and len(glob.glob(str(cache / "m-*.json"))) == 1
    second = ds.capture(_model(), (x,))
    assert (len(traces), len(calls)) == (1, 1)  # neither traced nor decomposed
    assert graph_to_json(second) == graph_to_json(first)
    retrained = _model()  # other (big) weights: still a hit, with these weights
    with torch.no_grad():
        retrained.conv.weight.mul_(-1.5)
    engine = ds.compile(retrained, (x,), backend="cpu")
    assert len(traces) == 1
    _check(engine, retrained, torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("change", ["attribute", "module_eps", "global", "code", "input_dtype",
                                    "small_buffer"])
def test_a_changed_model_is_traced_again(cache, monkeypatch, change):
    traces = _traces(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    make = {"attribute": lambda: _model(_Flagged), "global": lambda: _model(_Global),
            "code": lambda: _model(_versioned(False))}.get(change, _model)
    ds.capture(make(), (x,))
    other = make() if change != "code" else _model(_versioned(True))
    if change == "attribute":
        other.use_gelu = True
    elif change == "module_eps":
        other.bn.eps = 0.5
    elif change == "global":
        monkeypatch.setitem(globals(), "_FACTOR", -3.0)
    elif change == "small_buffer":
        other.scale.fill_(3.0)
    elif change == "input_dtype":
        other, x = other.double(), x.double()
    engine = ds.compile(other, (x,), backend="cpu")
    assert len(traces) == 2
    _check(engine, other, x)


def test_a_model_with_forward_hooks_is_always_traced(cache, monkeypatch):
    traces = _traces(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    hooked = _model()
    hooked.fc.register_forward_hook(lambda mod, args, out: out * 4.0)
    for _ in range(2):
        engine = ds.compile(hooked, (x,), backend="cpu")
        _check(engine, hooked, x)
    assert len(traces) == 2 and not glob.glob(str(cache / "m-*.json"))


def test_damaged_link_is_a_miss(cache, monkeypatch, caplog):
    traces = _traces(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    ds.capture(_model(), (x,))
    (link,) = glob.glob(str(cache / "m-*.json"))
    with open(link, "w") as f:
        f.write('{"key": ')
    engine = ds.compile(_model(), (x,), backend="cpu")
    assert len(traces) == 2 and "link" in caplog.text
    _check(engine, _model(), x)


def test_traced_mode_keys_by_the_exported_program_only(cache, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_CAPTURE_CACHE", "traced")
    traces, calls = _traces(monkeypatch), _decompositions(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    ds.capture(_model(), (x,))
    ds.capture(_model(), (x,))
    assert (len(traces), len(calls)) == (2, 1)
    assert not glob.glob(str(cache / "m-*.json"))


_FINGERPRINT = """
from deepseek.frontend.fingerprint import fingerprint
from tests.model_zoo import gpt2_tiny
model, inputs = gpt2_tiny()
print(fingerprint(model.eval(), list(inputs), ["x"]))
"""


def test_a_transformers_models_fingerprint_is_the_same_in_another_process():
    """A transformers model (its config objects and their salted hashes included) is keyed
    alike under another string-hash salt: a fresh process finds the entry."""
    import subprocess
    import sys

    from deepseek.frontend.fingerprint import fingerprint
    from tests.conftest import ROOT
    from tests.model_zoo import gpt2_tiny

    model, inputs = gpt2_tiny()
    here = fingerprint(model.eval(), list(inputs), ["x"])
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": ROOT}
    there = subprocess.run([sys.executable, "-c", _FINGERPRINT], env=env, cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()[-1]
    assert here == there


class _Opaque:
    """An object the fingerprint cannot look into (no ``__dict__``)."""

    __slots__ = ("factor",)

    def __init__(self, factor):
        self.factor = factor


class _HoldsOpaque(_Net):
    def __init__(self, factor):
        super().__init__()
        self.opaque = _Opaque(factor)

    def forward(self, x):
        return super().forward(x) * self.opaque.factor


def test_a_model_holding_unhashable_state_is_traced_every_time(cache, monkeypatch):
    """Module state the fingerprint cannot hash (an object with slots) is never guessed at:
    such a model is traced at each capture, and a changed value gives a new graph."""
    from deepseek.frontend.fingerprint import Unkeyable, fingerprint

    with pytest.raises(Unkeyable, match="_Opaque"):
        fingerprint(_model(lambda: _HoldsOpaque(2.0)), [torch.randn(2, 3, 8, 8)], [])
    traces = _traces(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    for factor in (2.0, -3.0):
        m = _model(lambda: _HoldsOpaque(factor))
        _check(ds.compile(m, (x,), backend="cpu"), m, x)
    assert len(traces) == 2 and not glob.glob(str(cache / "m-*.json"))


_PKG_MODEL = """
import torch
from . import helper

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return helper.scale(self.fc(x))
"""


def test_an_edited_helper_module_of_a_user_package_changes_the_fingerprint(tmp_path,
                                                                            monkeypatch):
    """A user package's helper called through a module attribute (not a global the
    bytecode names) is covered by its file; which of the package's modules happen to be
    imported does not change the key."""
    import importlib
    import sys
    import time

    from deepseek.frontend.fingerprint import fingerprint

    pkg = tmp_path / "fp_user_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "model.py").write_text(_PKG_MODEL)
    (pkg / "helper.py").write_text("def scale(x):\n    return x * 2\n")
    (pkg / "unused.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("fp_user_pkg")]:
        monkeypatch.delitem(sys.modules, name)
    net = importlib.import_module("fp_user_pkg.model").Net().eval()
    x = [torch.randn(2, 4)]
    first = fingerprint(net, x, [])
    importlib.import_module("fp_user_pkg.unused")
    assert fingerprint(net, x, []) == first  # another module imported: same key
    time.sleep(0.01)
    (pkg / "helper.py").write_text("def scale(x):\n    return x * 3\n")
    assert fingerprint(net, x, []) != first  # the helper's file changed


def test_a_fingerprint_that_fails_falls_back_to_tracing(cache, monkeypatch, caplog):
    """A fingerprint that raises (an object whose hashing fails) never fails the capture:
    the model is traced, with a warning naming it."""
    import deepseek.frontend.capture_cache as capture_cache

    def broken(model, inputs, extra):
        raise RuntimeError("hashing failed")

    monkeypatch.setattr(capture_cache, "fingerprint", broken)
    traces = _traces(monkeypatch)
    model, x = _model(), torch.randn(2, 3, 8, 8)
    _check(ds.compile(model, (x,), backend="cpu"), model, x)
    assert len(traces) == 1 and "could not fingerprint _Net" in caplog.text
