"""Quantization arithmetic against a NumPy restatement of the formulae.

Scale, zero point, rounding (half to even) and clamping for each method and
granularity, and each calibrator's range, computed independently in NumPy.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek.quantization.config import QuantConfig, QuantizationError
from deepseek.quantization.modules import QuantizedActivation, QuantizedWeight
from deepseek.quantization.observers import (EntropyCalibrator, MSECalibrator, make_calibrator,
                                             qrange)

F32_EPS = np.finfo(np.float32).eps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small kernels: one intra-op thread is fastest, and fair to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the formulae, in NumPy ---------------------------------------------------------
def np_range(bits, symmetric, weight):
    half = 2 ** (bits - 1)
    if symmetric:
        return (-(half - 1) if weight else -half), half - 1
    return (-half, half - 1) if weight else (0, 2 ** bits - 1)


def np_qparams(lo, hi, bits, symmetric, weight):
    qmin, qmax = np_range(bits, symmetric, weight)
    lo, hi = np.minimum(np.float32(lo), 0), np.maximum(np.float32(hi), 0)
    if symmetric:
        scale = np.maximum(np.maximum(-lo, hi) / np.float32(qmax), F32_EPS).astype(np.float32)
        return scale, np.zeros_like(scale, dtype=np.int64)
    scale = np.maximum((hi - lo) / np.float32(qmax - qmin), F32_EPS).astype(np.float32)
    zp = np.clip(qmin - np.round(lo / scale), qmin, qmax).astype(np.int64)
    return scale, zp


def np_quantize(x, scale, zp, qmin, qmax):
    inv = (np.float32(1.0) / np.asarray(scale, dtype=np.float32)).astype(np.float32)
    return np.clip(np.round(x.astype(np.float32) * inv) + zp, qmin, qmax).astype(np.int64)


def np_dequantize(q, scale, zp):
    return ((q - zp).astype(np.float32) * np.asarray(scale, dtype=np.float32)).astype(np.float32)


METHODS = ["symmetric", "asymmetric"]


# --- ranges, qparams, rounding ----------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("weight", [True, False])
def test_integer_ranges(bits, method, weight):
    r = qrange(bits, method == "symmetric", weight)
    assert (r.qmin, r.qmax) == np_range(bits, method == "symmetric", weight)
    assert r.dtype == (torch.uint8 if (method == "asymmetric" and not weight) else torch.int8)


@settings(max_examples=40, deadline=None)
@given(lo=st.floats(-100, 100, width=32), hi=st.floats(-100, 100, width=32),
       bits=st.sampled_from([4, 8]), method=st.sampled_from(METHODS), weight=st.booleans())
def test_choose_qparams_matches_numpy(lo, hi, bits, method, weight):
    from deepseek.quantization.observers import choose_qparams

    lo, hi = min(lo, hi), max(lo, hi)
    r = qrange(bits, method == "symmetric", weight)
    s, z = choose_qparams(torch.tensor([lo]), torch.tensor([hi]), r, method == "symmetric")
    ns, nz = np_qparams(np.float32(lo), np.float32(hi), bits, method == "symmetric", weight)
    assert float(s) == pytest.approx(float(ns), rel=1e-6)
    assert int(z) == int(nz)
    # zero is exactly representable and the observed range is (nearly) covered
    assert r.qmin <= int(z) <= r.qmax


def test_rounding_is_half_to_even_and_clamps():
    r = qrange(8, False, False)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 1000.0, -1000.0, 2.4999, 2.5001])
    q = QuantizedActivation(torch.tensor([1.0]), torch.tensor([10]), r, 8)
    out = torch.ops.quantized_decomposed.quantize_per_tensor.tensor(
        x, q.scale, q.zero_point, r.qmin, r.qmax, r.dtype)
    assert out.tolist() == [10, 12, 12, 10, 255, 0, 12, 13]
    np.testing.assert_array_equal(out.numpy(), np_quantize(x.numpy(), 1.0, 10, 0, 255))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [4, 8])
def test_activation_qdq_matches_numpy(method, bits):
    sym = method == "symmetric"
    r = qrange(bits, sym, weight=False)
    x = torch.randn(64, 33) * 3 + (0 if sym else 1)
    lo, hi = float(x.min()) * 0.8, float(x.max()) * 0.8  # clipped range: clamping is exercised
    ns, nz = np_qparams(lo, hi, bits, sym, False)
    act = QuantizedActivation(torch.tensor([float(ns)]), torch.tensor([int(nz)]), r, bits)
    want = np_dequantize(np_quantize(x.numpy(), ns, nz, r.qmin, r.qmax), ns, nz)
    np.testing.assert_allclose(act(x).numpy(), want, rtol=0, atol=1e-6)


# --- weights: every method and granularity ----------------------------------------------
def np_weight(w, bits, sym, granularity, group):
    qmin, qmax = np_range(bits, sym, True)
    rows = w.reshape(w.shape[0], -1)
    if granularity == "per_tensor":
        blocks = rows.reshape(1, -1)
    elif granularity == "per_channel":
        blocks = rows
    else:
        blocks = rows.reshape(-1, group)
    s, z = np_qparams(blocks.min(1), blocks.max(1), bits, sym, True)
    q = np_quantize(blocks, s[:, None], z[:, None], qmin, qmax)
    return q.reshape(w.shape), s, z, np_dequantize(q, s[:, None], z[:, None]).reshape(w.shape)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits,shape", [(8, (24, 64)), (4, (16, 8, 2, 4)), (2, (8, 32))])
def test_weight_quantization_matches_numpy(granularity, method, bits, shape):
    sym = method == "symmetric"
    w = torch.randn(shape) * torch.rand(shape[0]).reshape(-1, *([1] * (len(shape) - 1))) * 2
    qw = QuantizedWeight(w, bits, sym, granularity, group_size=16)
    q, s, z, deq = np_weight(w.numpy(), bits, sym, granularity, 16)
    np.testing.assert_array_equal(qw.qweight.numpy().astype(np.int64), q)
    np.testing.assert_allclose(qw.scale.numpy().reshape(-1), s, rtol=1e-6)
    if qw.zero_point is not None:
        np.testing.assert_array_equal(qw.zero_point.numpy().reshape(-1), z)
    else:
        assert sym and not z.any()
    np.testing.assert_allclose(qw().numpy(), deq, rtol=0, atol=1e-6)
    qmin, qmax = np_range(bits, sym, True)
    assert qw.qweight.dtype == torch.int8
    assert qmin <= int(qw.qweight.min()) and int(qw.qweight.max()) <= qmax


def test_mse_weight_search_never_worse_than_minmax():
    from deepseek.quantization.observers import weight_qparams, fake_quantize

    w = torch.randn(32, 64)
    w[0, 0] = 12.0  # an outlier
    r = qrange(4, True, True)
    err = {}
    for search in ("minmax", "mse"):
        s, z = weight_qparams(w, r, True, "per_channel", search=search)
        err[search] = (fake_quantize(w, s[:, None], z[:, None], r) - w).pow(2).sum(1)
    assert torch.all(err["mse"] <= err["minmax"] + 1e-6)
    assert err["mse"][0] < err["minmax"][0]  # the outlier row is clipped


# --- calibrators ------------------------------------------------------------------------
def _batches():
    torch.manual_seed(1)
    return [torch.randn(200, 16) * 2 + 0.5, torch.randn(300, 16) * 3, torch.randn(100, 16)]


@pytest.mark.parametrize("method", METHODS)
def test_minmax_calibrator(method):
    sym = method == "symmetric"
    c = make_calibrator("minmax", qrange(8, sym, False), sym)
    data = _batches()
    for b in data:
        c.observe(b)
    allv = torch.cat([b.reshape(-1) for b in data]).numpy()
    assert c.range() == (float(allv.min()), float(allv.max()))
    s, z = c.qparams()
    ns, nz = np_qparams(allv.min(), allv.max(), 8, sym, False)
    assert float(s) == pytest.approx(float(ns), rel=1e-6) and int(z) == int(nz)


@pytest.mark.parametrize("method", METHODS)
def test_percentile_calibrator(method):
    sym = method == "symmetric"
    c = make_calibrator("percentile", qrange(8, sym, False), sym, percentile=99.0)
    data = _batches()
    for b in data:
        c.observe(b)
    v = torch.cat([b.reshape(-1) for b in data]).double().numpy()
    lo, hi = c.range()
    if sym:
        t = np.percentile(np.abs(v), 99.0)
        assert (lo, hi) == pytest.approx((-t, t), rel=1e-9)
    else:
        assert (lo, hi) == pytest.approx((np.percentile(v, 1.0), np.percentile(v, 99.0)), rel=1e-9)


def np_entropy_threshold(hist, limit, levels):
    """TensorRT's KL search written out with loops (the reference)."""
    bins = len(hist)
    best, best_i = math.inf, bins
    for i in range(levels, bins + 1):
        p = [float(h) for h in hist[:i]]
        p[-1] += float(sum(hist[i:]))
        q = [0.0] * i
        for lvl in range(levels):
            members = [j for j in range(i) if (j * levels) // i == lvl]
            nonzero = [j for j in members if hist[j] > 0]
            total = sum(float(hist[j]) for j in members)
            for j in nonzero:
                q[j] = total / len(nonzero)
        sp, sq = sum(p), sum(q)
        if sp == 0 or sq == 0:
            continue
        kl, finite = 0.0, True
        for pj, qj in zip(p, q):
            if pj > 0:
                if qj == 0:
                    finite = False
                    break
                kl += pj / sp * math.log((pj / sp) / (qj / sq))
        if finite and kl < best:
            best, best_i = kl, i
    return best_i * limit / bins


@pytest.mark.parametrize("method", METHODS)
def test_entropy_calibrator_matches_reference(method):
    sym = method == "symmetric"
    c = EntropyCalibrator(qrange(4, sym, False), sym, bins=128)  # 4 bits: a small search
    x = torch.cat([torch.randn(4000).abs() ** 1.5, -torch.rand(500) * 0.5, torch.tensor([9.0])])
    c.observe(x)
    levels = c.side_levels()
    t_pos = np_entropy_threshold(c.pos.numpy(), c.limit, levels)
    t_neg = np_entropy_threshold(c.neg.numpy(), c.limit, levels)
    if sym:
        t_pos = t_neg = max(t_pos, t_neg)
    lo, hi = c.range()
    assert (lo, hi) == pytest.approx((max(float(x.min()), -t_neg), min(float(x.max()), t_pos)))
    assert hi < 9.0  # the outlier is clipped


def test_histogram_merging_is_exact():
    c = MSECalibrator(qrange(8, True, False), True, bins=64)
    a, b = torch.rand(1000) * 1.0, torch.rand(1000) * 3.9
    c.observe(a)
    c.observe(b)  # the range doubles twice: 1 -> 4
    want = torch.histc(torch.cat([a, b]), 64, 0.0, c.limit).double()
    assert c.limit == pytest.approx(float(a.max()) * 4)
    # the same counts, up to values lying on a bin edge (float rounding of the edge)
    assert float(c.pos.sum()) == float(want.sum()) == 2000
    assert float((c.pos - want).abs().max()) <= 1 and int((c.pos != want).sum()) <= 4


@pytest.mark.parametrize("method", METHODS)
def test_mse_calibrator_is_near_the_best_clipping_on_raw_data(method):
    sym = method == "symmetric"
    r = qrange(8, sym, False)
    x = torch.cat([torch.randn(20000), torch.tensor([25.0])])  # a far outlier
    c = make_calibrator("mse", r, sym)
    c.observe(x)
    lo, hi = c.range()
    v = x.numpy().astype(np.float64)

    def raw_mse(a, b):
        s, z = np_qparams(a, b, 8, sym, False)
        return float(np.mean((np_dequantize(np_quantize(v, s, z, r.qmin, r.qmax), s, z) - v) ** 2))

    grid = [raw_mse(max(v.min(), -t), min(v.max(), t)) for t in np.linspace(0.5, 25, 400)]
    assert hi < 25.0
    assert raw_mse(lo, hi) <= 1.05 * min(grid)


# --- config -----------------------------------------------------------------------------
def test_config_round_trips_and_rejects_bad_values():
    c = QuantConfig(weight_bits=4, activation_bits=None, method="asymmetric",
                    weight_method="symmetric", granularity="per_group", group_size=64,
                    skip=["classifier.*"])
    assert QuantConfig.from_json(c.to_json()) == c
    assert c.weight_symmetric and not c.symmetric
    assert c.skips("classifier.3") and not c.skips("features.0")
    for bad in [dict(weight_bits=9), dict(method="affine"), dict(granularity="per_row"),
                dict(calibration="kl"), dict(group_size=1), dict(accuracy_budget=-1),
                dict(activation_bits=1), dict(weight_method="affine")]:
        with pytest.raises(QuantizationError):
            QuantConfig(**bad)
    with pytest.raises(QuantizationError, match="no fields"):
        QuantConfig.from_dict({"type": "QuantConfig", "weight_bits": 8, "evil": 1})
    with pytest.raises(QuantizationError):
        QuantConfig.from_json("{not json")
