import os
import sys

import pytest
import torch

from deepseek.numerics import rel_l2  # noqa: F401  (tests import it from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # tests import benchmarks.models and tests.model_zoo
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels are checked on the CPU by its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def half_precisions_native(monkeypatch):
    """Let the CPU backend lower to bf16/fp16 even where this CPU has no native kernels for
    them (it then keeps float32): tests of the lowering itself run on every CPU."""
    import deepseek.backends.cpu as cpu

    monkeypatch.setattr(cpu, "native_precisions", lambda: frozenset({"bf16", "fp16"}))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty ``DEEPSEEK_CACHE_DIR`` with every on-disk cache switched on."""
    monkeypatch.setenv("DEEPSEEK_CACHE_DIR", str(tmp_path))
    for switch in ("DEEPSEEK_CAPTURE_CACHE", "DEEPSEEK_CPU_CHOICE_CACHE"):
        monkeypatch.delenv(switch, raising=False)
    return tmp_path


def count_calls(monkeypatch, owner, name: str) -> list:
    """Wrap ``owner.name`` so each call appends its arguments to the returned list."""
    calls = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls
