"""oneDNN primitives made once per plan (deepseek/backends/cpu/onednn.{py,c}): each kernel
against a float64 reference on random inputs, inside generated plans (forced), and a
plan without them where oneDNN is not installed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deepseek as ds
from deepseek.backends.cpu import native, onednn
from tests.conftest import rel_l2
from tests.test_cpu_plans import _check, _forcing, _plan_source

pytestmark = pytest.mark.skipif(not onednn.available(),
                                reason=f"oneDNN not built: {native.unavailable.get('onednn')}")

_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
_ACTS = {"none": lambda t: t, "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
         "swish": F.silu, "hardswish": F.hardswish, "gelu": F.gelu,
         "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as the kernel sees it (rounded to ``dtype``), in float64 for the reference."""
    return t.to(dtype).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c,k,hw,kernel,stride,pad,dil,groups", [
    (1, 64, 256, (14, 14), 1, 1, 0, 1, 1),    # a ResNet 1x1
    (2, 13, 21, (9, 11), 3, 1, 1, 1, 1),      # channels off the vector width, odd sizes
    (1, 3, 16, (23, 20), 7, 2, 3, 1, 1),      # a stem: 3 channels, stride 2
    (2, 24, 36, (17, 19), 3, (2, 1), (1, 2), (1, 2), 3),  # grouped, dilated, uneven strides
    (1, 32, 32, (10, 10), 3, 1, 1, 1, 32),    # depthwise
])
@pytest.mark.parametrize("activation,residual", [("none", None), ("relu", "add"),
                                                 ("swish", None), ("hardswish", "add"),
                                                 ("relu", "sum")])
def test_conv2d_matches_float64(dtype, n, c, k, hw, kernel, stride, pad, dil, groups,
                                activation, residual):
    torch.manual_seed(c * k + hw[0])
    def pair(v):
        return (v, v) if isinstance(v, int) else v
    x = torch.randn(n, c, *hw)
    w = torch.randn(k, c // groups, kernel, kernel) / (kernel * (c // groups) ** 0.5)
    b = torch.randn(k)
    made = onednn.conv2d(w, b, pair(stride), pair(pad), pair(dil), groups, x.shape, dtype,
                         activation, residual)
    assert made is not None
    ref = F.conv2d(_rounded(x, dtype), _rounded(w, dtype), b.double(), stride, pad, dil, groups)
    z = torch.randn(ref.shape).to(dtype).contiguous(memory_format=torch.channels_last)
    if residual:
        ref = ref + z.double()
    ref = _ACTS[activation](ref)
    got = made(x.to(dtype).contiguous(memory_format=torch.channels_last),
               z if residual else None)
    assert (got.data_ptr() == z.data_ptr()) == (residual == "sum")  # sum: in z's memory
    assert got.dtype == dtype and got.shape == ref.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert rel_l2(got.double(), ref) < _TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,n", [(1, 768, 768), (7, 40, 33), (128, 64, 200)])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_float64(dtype, rows, k, n, activation, bias):
    torch.manual_seed(rows + k + n)
    x, w = torch.randn(rows, k), torch.randn(k, n) / k ** 0.5
    b = torch.randn(n) if bias else None
    made = onednn.linear(w, b, rows, dtype, activation)
    ref = _rounded(x, dtype) @ _rounded(w, dtype) + (b.double() if bias else 0)
    got = made(x.to(dtype))
    assert got.dtype == dtype and got.shape == (rows, n)
    assert rel_l2(got.double(), _ACTS[activation](ref)) < _TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,kernel,stride,pad,dil,ceil", [
    ((1, 64, 112, 112), (3, 3), (2, 2), (1, 1), (1, 1), False),  # ResNet's
    ((2, 5, 7, 9), (2, 2), (2, 2), (0, 0), (1, 1), False),        # floor drops a row
    ((2, 5, 7, 9), (3, 2), (2, 3), (1, 1), (1, 2), True),         # ceil mode, dilation
])
def test_max_pool_is_exact(dtype, shape, kernel, stride, pad, dil, ceil):
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    made = onednn.max_pool2d(kernel, stride, pad, dil, ceil, shape, dtype)
    assert torch.equal(made(x), torch.max_pool2d(x, kernel, stride, pad, dil, ceil))


def test_inputs_in_another_layout_or_dtype_are_converted():
    w, b = torch.randn(8, 4, 3, 3), torch.randn(8)
    made = onednn.conv2d(w, b, (1, 1), (1, 1), (1, 1), 1, (2, 4, 6, 6), torch.float32)
    x = torch.randn(2, 4, 6, 6)  # NCHW memory, and then float64
    ref = F.conv2d(x, w, b, padding=1)
    assert rel_l2(made(x), ref) < 1e-5 and rel_l2(made(x.double()), ref) < 1e-5


class _Block(nn.Module):
    """conv -> ReLU -> max pool, a bottleneck's residual end, then a GEMM + GELU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 1)
        self.down = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16 * 5 * 5, 32)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.stem(x)), 3, 2, 1)
        h = torch.relu(self.conv(h) + self.down(h))
        return F.gelu(self.fc(h.flatten(1)))


def test_chosen_in_a_plan(monkeypatch):
    """Forced, every convolution, the residual end, the max pool and the GEMM run as
    primitives made once; the plan's result matches eager on fresh inputs."""
    _forcing(monkeypatch, "onednn_made")
    torch.manual_seed(0)
    source = _plan_source(_check(_Block().eval(), torch.randn(2, 3, 10, 10)))
    assert "_convolution_pointwise" not in source and "max_pool2d(" not in source
    assert source.count("= dnn") == 5  # stem, conv + residual, down, pool, fc + GELU


def test_residual_accumulated_in_place_in_a_plan(monkeypatch):
    """Forced, the block's end accumulates into the dying residual's buffer (oneDNN's sum
    post-op) and the result still matches eager, call after call."""
    _forcing(monkeypatch, "onednn_sum")
    torch.manual_seed(2)
    source = _plan_source(_check(_Block().eval(), torch.randn(2, 3, 10, 10)))
    assert "_convolution_pointwise.binary(" not in source
    assert sum(" = dnn" in ln and ", " in ln.split("(", 1)[1] for ln in source.splitlines()) == 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resnet_block_plan_matches_eager(precision, half_precisions_native):
    """Measured choices (whatever wins here) in both precisions."""
    torch.manual_seed(1)
    model = _Block().eval()
    x = torch.randn(3, 3, 10, 10)
    engine = ds.compile(model, (x,), backend="cpu", precision=precision)
    y = torch.randn_like(x)
    with torch.no_grad():
        assert rel_l2(engine(y), model(y)) < (1e-5 if precision == "fp32" else 2e-2)


def test_not_offered_without_onednn(monkeypatch):
    monkeypatch.setattr(onednn, "_root", lambda: None)
    monkeypatch.setattr(native, "_LIBS", {k: v for k, v in native._LIBS.items() if k != "onednn"})
    _forcing(monkeypatch, "onednn_made")
    assert not onednn.available() and "oneDNN not found" in native.unavailable["onednn"]
    source = _plan_source(_check(_Block().eval(), torch.randn(2, 3, 10, 10)))
    assert "= dnn" not in source


def test_pool_attributes_normalized_as_pytorch_reads_them():
    from deepseek.ir.ops import pool2d_attrs

    assert pool2d_attrs(3) == ([3, 3], [3, 3], [0, 0], [1, 1])
    assert pool2d_attrs((3, 2), []) == ([3, 2], [3, 2], [0, 0], [1, 1])  # stride = kernel
    assert pool2d_attrs([2], 1, (1, 0), 2) == ([2, 2], [1, 1], [1, 0], [2, 2])
    x = torch.randn(1, 4, 9, 8).contiguous(memory_format=torch.channels_last)
    args = pool2d_attrs((3, 2), [])
    made = onednn.max_pool2d(*args, False, x.shape, torch.float32)
    assert torch.equal(made(x), torch.max_pool2d(x, (3, 2)))
