"""Capture: unsupported ops, fallbacks, source lines, structure, and report accounting."""

import pytest
import torch
import torch.nn as nn

import deepseek as ds
from tests.conftest import rel_l2


class UsesErfc(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        h = self.lin(x)
        return torch.special.erfc(h) * 2 + torch.lgamma(h.abs() + 1)  # two ops outside the IR


def test_strict_lists_every_unsupported_op_with_its_source_line():
    with pytest.raises(ds.UnsupportedOpError) as info:
        ds.compile(UsesErfc(), (torch.randn(3, 6),), backend="cpu", strict=True)
    msg = str(info.value)
    assert "aten.erfc.default" in msg and "aten.lgamma.default" in msg
    assert "test_capture.py" in msg and "erfc(h)" in msg  # the user's source line
    assert "strict=False" in msg  # the fix


def test_fallback_runs_through_pytorch_and_is_reported():
    model = UsesErfc().eval()
    x = torch.randn(3, 6)
    engine = ds.compile(model, (x,), backend="cpu")
    assert rel_l2(engine(x), model(x)) < 1e-5
    report = engine.report().to_dict()
    ops = sorted(f["op"] for f in report["fallback_nodes"])
    assert ops == ["aten.erfc.default", "aten.lgamma.default"]
    assert all("test_capture.py" in f["source"] for f in report["fallback_nodes"])
    assert {p["backend"] for p in report["partitions"]} == {"cpu", "reference"}
    assert "fallback" in str(engine.report())


def test_report_accounting_is_consistent():
    from deepseek.examples import mnist_cnn

    model, inputs = mnist_cnn(2)
    report = ds.compile(model, inputs, backend="cpu").report().to_dict()
    names = [p["name"] for p in report["passes"]]
    assert "fuse_conv_bn" in names
    fused = next(p for p in report["passes"] if p["name"] == "fuse_conv_bn")
    assert fused["nodes_before"] - fused["nodes_after"] == 2  # both batch norms folded
    # folding BN removes two full reads and writes of the conv outputs
    conv_out_bytes = 2 * (32 * 28 * 28 + 64 * 14 * 14) * 4
    saved = report["bytes_moved"]["unoptimized"] - report["bytes_moved"]["optimized"]
    assert saved >= 2 * conv_out_bytes
    assert 0 < report["peak_memory_bytes"]["optimized"] <= report["peak_memory_bytes"]["unoptimized"]
    assert report["nodes"]["optimized"] < report["nodes"]["unoptimized"]


def test_opt_level_zero_runs_no_pass_and_still_matches():
    from deepseek.examples import mnist_cnn

    model, inputs = mnist_cnn(2)
    engine = ds.compile(model, inputs, backend="cpu", opt_level=0)
    assert engine.report().passes == []
    x = torch.randn(2, 1, 28, 28)
    assert rel_l2(engine(x), model(x)) < 1e-5


def test_disable_single_pass():
    from deepseek.examples import mnist_cnn

    model, inputs = mnist_cnn(2)
    engine = ds.compile(model, inputs, backend="cpu", disable_passes=["fuse_conv_bn"])
    assert "fuse_conv_bn" not in [p["name"] for p in engine.report().passes]
    assert any(n.kind == "_native_batch_norm_legit_no_training" for n in engine.graph.nodes)
    with pytest.raises(ValueError, match="unknown passes"):
        ds.compile(model, inputs, backend="cpu", disable_passes=["no_such_pass"])


def test_bad_compile_arguments_have_clear_errors():
    model = nn.Linear(3, 3)
    with pytest.raises(ds.DeepseekError, match="precision"):
        ds.compile(model, (torch.randn(2, 3),), precision="fp64")
    with pytest.raises(ds.DeepseekError, match="example inputs"):
        ds.compile(model)
    with pytest.raises(ds.CaptureError, match="dynamic_dims"):
        ds.compile(model, (torch.randn(2, 3),), dynamic_dims={0: {5: "batch"}})
    with pytest.raises(ds.BackendError, match="unknown backend"):
        ds.compile(model, (torch.randn(2, 3),), backend="tpu9000")
