"""Dynamic int8 quantization (``QuantConfig(calibration="dynamic")``): each row of a Linear
layer's input quantized with its own scale at run time. The formulas against NumPy, the C
row quantizer bitwise against PyTorch's ops, the kernel against its reference formula, and
compiled engines against the eager quantized module."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import deepseek as ds
from deepseek.ir.ops import Op
from deepseek.quantization import QuantConfig, QuantizationError, Quantizer
from deepseek.quantization import kernels
from deepseek.quantization.modules import DynamicQuantizedActivation

qd = torch.ops.quantized_decomposed


def _rows(seed: int, shape, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + shift
    x.view(-1)[::7] = (x.view(-1)[::7] * 2).round() / 2  # exact halves: rounding ties
    return x


def _numpy_per_row(x: np.ndarray, symmetric: bool) -> tuple[np.ndarray, ...]:
    """(q, scale, zero point) per row: the textbook formulas, in NumPy."""
    x32 = x.astype(np.float32)
    if symmetric:
        amax = np.abs(x32).max(-1, keepdims=True)
        scale = (np.maximum(amax, np.float32(1e-5)) / np.float32(127)).astype(np.float32)
        q = np.clip(np.rint(x32 * (np.float32(1) / scale)), -128, 127)
        return q.astype(np.int8), scale.astype(np.float64), np.zeros_like(scale)
    lo = np.minimum(x32.min(-1, keepdims=True), 0)
    hi = np.maximum(x32.max(-1, keepdims=True), 0)
    scale = np.maximum((hi - lo) / np.float32(255), np.finfo(np.float32).eps).astype(np.float32)
    from_min, from_max = -128 + lo / scale, 127 + hi / scale
    zp = np.where(from_min + from_max > 0, -128 - lo / scale, 127 - hi / scale)
    zp = np.rint(np.clip(zp, -128, 127))
    q = np.clip(np.rint(x32.astype(np.float64) * (1.0 / scale.astype(np.float64)) + zp),
                -128, 127)
    return q.astype(np.int8), scale.astype(np.float64), zp


@pytest.mark.parametrize("symmetric", [True, False])
def test_eager_module_matches_numpy_formula(symmetric):
    x = _rows(0, (4, 6, 37), 0.0 if symmetric else 1.5)
    q, scale, zp = _numpy_per_row(x.numpy(), symmetric)
    want = (q.astype(np.float64) - zp) * scale
    got = DynamicQuantizedActivation(symmetric)(x)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-6, atol=1e-7)
    # every row's error is at most half a step of its own scale
    assert ((got - x).abs() <= torch.from_numpy(scale).float() * 0.5001 + 1e-7).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 67), (128, 768), (1, 7), (4, 1), (2, 9), (0, 7)])
def test_c_row_quantizer_is_bitwise_pytorch(symmetric, shape):
    from deepseek.backends.cpu import rowwise

    if rowwise.library() is None:
        pytest.skip("no C compiler")
    x = _rows(1, shape, 0.0 if symmetric else -2.0)
    choose = qd.choose_qparams_per_token if symmetric else qd.choose_qparams_per_token_asymmetric
    scale, zp = choose(x, torch.int8)
    q = qd.quantize_per_token(x, scale, zp, -128, 127, torch.int8)
    got_q, got_scale, got_zp, rowsum = rowwise.quantize_rows(x, symmetric)
    assert got_q.dtype == torch.uint8  # q + 128: oneDNN's fast form
    assert torch.equal(got_q.to(torch.int16) - 128, q.to(torch.int16))
    assert torch.equal(got_scale, scale.double().reshape(-1))
    assert torch.equal(got_zp, zp.to(torch.int32).reshape(-1))
    assert torch.equal(rowsum, q.to(torch.int32).sum(-1).reshape(-1))


def _weights(seed: int, n: int, k: int, per_channel: bool, zero_point: bool):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n if per_channel else 1, generator=g) * 0.01 + 1e-3
    zp = torch.randint(-9, 10, (n,), dtype=torch.int32, generator=g) if zero_point else None
    bias = torch.randn(n, generator=g)
    return w, scale, zp, bias


@pytest.mark.parametrize("path", ["op", "aten_steps"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("per_channel,post_op,with_bias", [(True, "none", True),
                                                            (False, "relu", True),
                                                            (True, "relu", False),
                                                            (True, "gelu", True),
                                                            (False, "gelu_tanh", True)])
def test_kernel_matches_reference(path, symmetric, zero_point, per_channel, post_op, with_bias):
    """The op (C row passes around oneDNN's int8 linear on the CPU) and the ATen steps
    that CUDA runs, against the float reference formula; integer sums are exact, so only
    float rounding differs."""
    x = _rows(2, (2, 9, 72), 0.0 if symmetric else 0.7)
    w, scale, zp, bias = _weights(3, 40, 72, per_channel, zero_point)
    bias = bias if with_bias else None
    args = (x, symmetric, w, scale, zp, bias, post_op)
    want = kernels.reference_linear_int8_dynamic(*args).double()
    if path == "op":
        got = torch.ops.deepseek_quant.linear_int8_dynamic(*args)
    else:
        got = kernels._linear_int8_dynamic_cuda(*args)
    assert got.shape == (2, 9, 40) and got.dtype == torch.float32
    err = (got.double() - want).norm() / want.norm()
    assert err < 1e-6, err  # GELU's erf within 2e-7 of ATen's


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(48, 96)
        self.mid = nn.Linear(96, 96)
        self.down = nn.Linear(96, 24)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, image):
        h = torch.nn.functional.gelu(self.mid(torch.relu(self.up(x))))
        return self.down(h), self.conv(image)


@pytest.mark.parametrize("method", ["symmetric", "asymmetric"])
def test_compiled_dynamic_engine_matches_eager(method, tmp_path):
    torch.manual_seed(0)
    model = _Mixed().eval()
    x, image = torch.randn(2, 5, 48), torch.randn(1, 3, 9, 9)
    quantizer = Quantizer(QuantConfig(calibration="dynamic", method=method, progress=False))
    qmodel = quantizer.quantize(model)
    report = quantizer.report
    assert report.mode == "dynamic"
    assert report.quantized == ["up", "mid", "down"] and report.kept_float == ["conv"]
    engine = ds.compile(qmodel, (x, image), backend="cpu", precision="int8")
    graph = engine._parts[0].graph
    ops = [n.op for n in graph.nodes]
    assert ops.count(Op.LINEAR_INT8_DYNAMIC) == 3
    assert Op.RELU not in ops and Op.GELU not in ops  # fused into their kernels
    assert not any(o in ops for o in (Op.QUANTIZE_PER_TOKEN, Op.DEQUANTIZE_PER_TOKEN,
                                      Op.CHOOSE_QPARAMS_PER_TOKEN,
                                      Op.CHOOSE_QPARAMS_PER_TOKEN_ASYMMETRIC))
    fresh = torch.randn(2, 5, 48) * 2, torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        want, ref_float = qmodel(*fresh), model(*fresh)
    got = engine(*fresh)
    for g, w in zip(got, want):
        assert ((g - w).norm() / w.norm()) < 1e-5
    # quantized, not float: the int8 result differs from the float model's
    assert ((got[0] - ref_float[0]).norm() / ref_float[0].norm()) > 1e-4
    path = os.path.join(tmp_path, "dynamic.dsk")
    engine.save(path)
    loaded = ds.load(path)
    assert torch.allclose(loaded(*fresh)[0], got[0], rtol=1e-6, atol=1e-6)


def test_dynamic_is_more_accurate_than_one_range_per_tensor():
    """Rows of very different magnitudes (as tokens have): a scale per row keeps the small
    rows' precision, which one per-tensor range loses."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    x = torch.randn(16, 64) * torch.logspace(-2, 1, 16).reshape(16, 1)
    with torch.no_grad():
        ref = model(x)
        dyn = Quantizer(QuantConfig(calibration="dynamic", progress=False)).quantize(model)(x)
        static = Quantizer(QuantConfig(progress=False)).quantize(model, [x])(x)
    err = lambda y: float(((y - ref).norm(dim=1) / ref.norm(dim=1)).max())  # noqa: E731
    assert err(dyn) < err(static) / 5


def test_dynamic_config_errors():
    with pytest.raises(QuantizationError, match="activation_bits=8"):
        QuantConfig(calibration="dynamic", activation_bits=4)
    with pytest.raises(QuantizationError, match="dynamic"):
        QuantConfig(calibration="dinamic")
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(QuantizationError, match="no QAT form"):
        Quantizer(QuantConfig(calibration="dynamic")).prepare_qat(model)
    with pytest.raises(QuantizationError, match="calibration_data"):
        Quantizer(QuantConfig(calibration="dynamic", bias_correction=True)).quantize(model)
    convs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(QuantizationError, match="Linear layers only.*static PTQ"):
        Quantizer(QuantConfig(calibration="dynamic")).quantize(convs)
    # weight-only stays weight-only whatever the calibration says
    q = Quantizer(QuantConfig(calibration="dynamic", activation_bits=None, progress=False))
    q.quantize(model)
    assert q.report.mode == "weight_only"


def test_dynamic_with_bias_correction_reads_the_data():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    data = [torch.randn(8, 32) for _ in range(4)]
    q = Quantizer(QuantConfig(calibration="dynamic", bias_correction=True, progress=False))
    q.quantize(model, data)
    assert q.report.mode == "dynamic" and set(q.report.bias_shifts) == {"0", "2"}


class _QKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 24)

    def forward(self, x):
        return (self.q(x) * self.k(x)).sum(-1, keepdim=True) * self.v(x)


@pytest.mark.parametrize("calibration", ["minmax", "dynamic"])
def test_sibling_int8_linears_merge_into_one_kernel(calibration):
    """Q/K/V-like int8 linears reading one input become one kernel over the stacked
    weights and three slices of its result (a dynamic one quantizes the rows once),
    with the results kept apart give."""
    torch.manual_seed(4)
    model = _QKV().eval()
    x = torch.randn(2, 5, 32)
    data = None if calibration == "dynamic" else [torch.randn(2, 5, 32) for _ in range(4)]
    qmodel = Quantizer(QuantConfig(calibration=calibration, weight_method="symmetric",
                                   progress=False)).quantize(model, data)
    merged = ds.compile(qmodel, (x,), backend="cpu", precision="int8")
    apart = ds.compile(qmodel, (x,), backend="cpu", precision="int8",
                       disable_passes=["merge_sibling_gemms"])
    kind = Op.LINEAR_INT8_DYNAMIC if calibration == "dynamic" else Op.LINEAR_INT8
    for engine, count in ((merged, 1), (apart, 3)):
        assert [n.op for n in engine._parts[0].graph.nodes].count(kind) == count
    fresh = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = qmodel(fresh)
    got, kept = merged(fresh), apart(fresh)
    assert (got - kept).norm() / kept.norm() < 1e-6  # float rounding of the epilogues only
    assert (got - want).norm() / want.norm() < 1e-5
