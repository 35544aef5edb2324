"""The integer kernel ops (deepseek_quant::*) against their reference formulae."""

import copy

import pytest
import torch

import deepseek.ir.ops  # noqa: F401  (the registry imports the kernel ops)
from deepseek.quantization import kernels as K

dq = torch.ops.deepseek_quant

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small kernels: one intra-op thread is fastest, and fair to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def _weight(n, k, asym, per_tensor=False, bits=8):
    """Random int8 weights of ``bits`` bits: 8 uses the whole range; 7 ([-64, 63]) is
    what oneDNN's kernels compute exactly without VNNI (``K.int8_native_for``)."""
    half = 2 ** (bits - 1)
    w = torch.randint(-(half - 1) if not asym else -half, half, (n, k), dtype=torch.int8)
    s = torch.rand(1 if per_tensor else n) * 0.02 + 1e-3
    z = torch.randint(-4, 5, s.shape, dtype=torch.int32) if asym else None
    return w, s, z


def _close_quantized(out, ref, quantum_ok=1):
    """Equal, or one step apart where fp rounding differs at a .5 boundary (rare)."""
    diff = (out.int() - ref.int()).abs()
    assert int(diff.max()) <= quantum_ok
    assert float((diff > 0).float().mean()) < 0.01


@pytest.mark.parametrize("act", [torch.uint8, torch.int8])
@pytest.mark.parametrize("asym_w", [False, True])
@pytest.mark.parametrize("post", ["none", "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("out_dtype", [None, torch.uint8, torch.int8])
@pytest.mark.parametrize("bits", [8, 7])
def test_linear_int8_matches_reference(act, asym_w, post, out_dtype, bits):
    lo, hi = (0, 256) if act == torch.uint8 else (-128, 128)
    x = torch.randint(lo, hi, (3, 7, 48), dtype=act)
    w, s, z = _weight(24, 48, asym_w, per_tensor=asym_w and post == "relu", bits=bits)
    b = torch.randn(24)
    xz = 131 if act == torch.uint8 else 0
    oz = 7 if out_dtype == torch.uint8 else 0
    args = (x, 0.013, xz, w, s, z, b, post, 0.05, oz, out_dtype)
    ref = K.reference_linear_int8(*args)
    outs = [dq.linear_int8(*args)]  # whichever path measured faster
    if K.int8_native_for(w):  # and PyTorch's int8 linear itself
        outs.append(K.pytorch_linear_int8(*args))
    for out in outs:
        assert out.shape == (3, 7, 24) and out.dtype == (out_dtype or torch.float32)
        if out_dtype is None:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
        else:
            _close_quantized(out, ref)


@pytest.mark.parametrize("act", [torch.uint8, torch.int8])
@pytest.mark.parametrize("asym_w", [False, True])
@pytest.mark.parametrize("geometry", [(1, 1, 1, 1), (2, 0, 1, 2), (1, 2, 2, 8)])
@pytest.mark.parametrize("bits", [8, 7])
def test_conv2d_int8_matches_reference(act, asym_w, geometry, bits):
    stride, padding, dilation, groups = geometry
    lo, hi = (0, 256) if act == torch.uint8 else (-128, 128)
    x = torch.randint(lo, hi, (2, 8, 11, 10), dtype=act)
    w, s, z = _weight(16, 8 // groups * 9, asym_w, bits=bits)
    w = w.reshape(16, 8 // groups, 3, 3)
    b = torch.randn(16)
    args = (x, 0.02, 5 if act == torch.uint8 else 0, w, s, z, b, [stride] * 2, [padding] * 2,
            [dilation] * 2, groups, "relu", 1.0, 0, None)
    out, ref = dq.conv2d_int8(*args), K.reference_conv2d_int8(*args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    meta = dq.conv2d_int8(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    assert meta.shape == out.shape and meta.dtype == out.dtype


@pytest.mark.parametrize("act", [torch.uint8, torch.int8])
@pytest.mark.parametrize("asym_w", [False, True])
@pytest.mark.parametrize("x_zero_point", [0, 7])
@pytest.mark.parametrize("out_dtype", [None, torch.uint8])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bits", [8, 7])
def test_pointwise_conv2d_int8_runs_as_a_gemm_and_matches_reference(act, asym_w, x_zero_point,
                                                                    out_dtype, stride, bits):
    """1x1 convolutions go through the int8 linear kernel over the (strided) pixels."""
    lo, hi = (0, 256) if act == torch.uint8 else (-128, 128)
    x = torch.randint(lo, hi, (2, 24, 7, 5), dtype=act)
    w, s, z = _weight(40, 24, asym_w, bits=bits)
    w = w.reshape(40, 24, 1, 1)
    args = (x, 0.02, x_zero_point, w, s, z, torch.randn(40), [stride] * 2, [0, 0], [1, 1], 1,
            "relu", 0.05, 3, out_dtype)
    out, ref = dq.conv2d_int8(*args), K.reference_conv2d_int8(*args)
    if out_dtype is None:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    else:  # requantized: at most one step apart where rounding ties differ
        assert out.dtype == ref.dtype and (out.int() - ref.int()).abs().max() <= 1
    if K.int8_native_for(w):  # the GEMM path (else the float formula runs, in NCHW)
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("out_dtype", [None, torch.uint8])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_float_formula_of_an_int8_kernel_matches_reference(kind, out_dtype, monkeypatch):
    """8-bit weights without VNNI: oneDNN's float32 convolution or linear on the weight
    de-quantized and laid out once, the input de-quantized, ReLU as post-op."""
    if not K._ONEDNN:
        pytest.skip("PyTorch without oneDNN")
    monkeypatch.setattr(K, "_VNNI", False)
    w, s, z = _weight(24, 16 * 9, True)
    b = torch.randn(24)
    if kind == "conv":
        x = torch.randint(0, 256, (2, 16, 9, 11), dtype=torch.uint8)
        w = w.reshape(24, 16, 3, 3)
        args = (x, 0.02, 3, w, s, z, b, [2, 1], [1, 1], [1, 1], 1, "relu", 0.05, 5, out_dtype)
        out, ref = dq.conv2d_int8(*args), K.reference_conv2d_int8(*args)
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randint(0, 256, (3, 5, 16 * 9), dtype=torch.uint8)
        args = (x, 0.02, 3, w, s, z, b, "relu", 0.05, 5, out_dtype)
        out, ref = dq.linear_int8(*args), K.reference_linear_int8(*args)
    assert not K.int8_native_for(w)
    if out_dtype is None:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    else:
        _close_quantized(out, ref)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_int8_kernels_never_saturate(kind):
    """The worst case for pairs of products summed in int16 (no VNNI): 255 x 127 + 255 x
    127. 8-bit weights take the oneDNN kernels only with VNNI, 7-bit ones everywhere;
    either way the result is the exact integer sum."""
    x = torch.full((2, 16, 6, 6), 255, dtype=torch.uint8)
    for top, native in ((127, K.native_int8()), (64, K._ONEDNN)):
        w = torch.full((8, 16 * (9 if kind == "conv" else 1)), top, dtype=torch.int8)
        assert K.int8_native_for(w) == native
        s = torch.full((8,), 1e-3)
        if kind == "linear":
            rows = x.permute(0, 2, 3, 1).reshape(-1, 16)
            out = dq.linear_int8(rows, 0.01, 0, w, s, None, None, "none", 1.0, 0, None)
            want = torch.full_like(out, 255 * top * 16 * 0.01 * 1e-3)
        else:
            out = dq.conv2d_int8(x, 0.01, 0, w.reshape(8, 16, 3, 3), s, None, None, [1, 1],
                                 [0, 0], [1, 1], 1, "none", 1.0, 0, None)
            want = torch.full_like(out, 255 * top * 16 * 9 * 0.01 * 1e-3)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=0)


def test_prepacked_weight_is_cached_and_refreshed_on_change():
    x = torch.randint(0, 256, (4, 32), dtype=torch.uint8)
    w, s, _ = _weight(8, 32, False)
    first = dq.linear_int8(x, 0.1, 128, w, s, None, None, "none", 1.0, 0, None)
    assert id(w) in K._CACHE
    copy.deepcopy(w)  # the cache lives beside the weight, which stays copyable
    w.mul_(-1)  # in place: the packed copy must not be reused
    second = dq.linear_int8(x, 0.1, 128, w, s, None, None, "none", 1.0, 0, None)
    torch.testing.assert_close(second, -first, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 16), (4, 0), (8, 16)])
def test_linear_weight_only(bits, group):
    q = torch.randint(-8, 8, (12, 64), dtype=torch.int8) if bits == 4 else \
        torch.randint(-128, 128, (12, 64), dtype=torch.int8)
    s = torch.rand(12, 64 // group) * 0.1 if group else torch.rand(12) * 0.1
    z = torch.randint(-2, 3, s.shape, dtype=torch.int32)
    stored = K.pack_int4(q) if bits == 4 else q
    assert stored.numel() == q.numel() // (2 if bits == 4 else 1)
    x = torch.randn(5, 64)
    out = dq.linear_weight_only(x, stored, s, z, None, bits, group)
    w = (q.float().reshape(12, -1, group or 64) - z.float().reshape(12, -1, 1)) * \
        s.reshape(12, -1, 1)
    torch.testing.assert_close(out, x @ w.reshape(12, 64).t(), rtol=1e-5, atol=1e-5)


def test_int4_packing_round_trips():
    q = torch.randint(-8, 8, (7, 30), dtype=torch.int8)
    packed = K.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 15)
    assert torch.equal(K.unpack_int4(packed), q)


def _wonly_case(bits, granularity, asym, n=13, k=64, group=16):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8) if bits == 4 else \
        torch.randint(-128, 128, (n, k), dtype=torch.int8)
    shape = {"tensor": (1,), "channel": (n,), "group": (n, k // group)}[granularity]
    s = torch.rand(shape) * 0.1 + 1e-3
    z = torch.randint(-2, 3, shape, dtype=torch.int32) if asym else None
    groups = k // group if granularity == "group" else 1
    w = (q.float().reshape(n, groups, -1)
         - (z.float().reshape(-1, groups if granularity == "group" else 1, 1) if asym else 0)) \
        * s.reshape(-1, groups if granularity == "group" else 1, 1)
    stored = K.pack_int4(q) if bits == 4 else q
    return stored, s, z, (group if granularity == "group" else 0), w.reshape(n, k)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 4])
def test_streaming_weight_only_kernel_matches_the_float_formula(bits, granularity, asym, rows):
    from deepseek.backends.cpu import weightonly

    stored, s, z, group, w = _wonly_case(bits, granularity, asym)
    if weightonly.library() is None:
        pytest.skip("no C compiler")
    assert weightonly.supports(rows, torch.float32, stored, s, z, bits, group)
    x, b = torch.randn(rows, 64), torch.randn(13)
    for bias in (None, b):
        out = weightonly.StreamingLinear(stored, s, z, bias, bits, group)(x)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, bias),
                                   rtol=1e-5, atol=1e-5)
    x3 = torch.randn(3, 3, 64)  # leading dims fold into rows (9: the kernel's tiles of 4 and 1)
    torch.testing.assert_close(weightonly.StreamingLinear(stored, s, z, b, bits, group)(x3),
                               torch.nn.functional.linear(x3, w, b), rtol=1e-5, atol=1e-5)


def test_weight_only_op_streams_the_int_weight_only_at_decoding_rows():
    from deepseek.backends.cpu import weightonly

    if weightonly.library() is None:
        pytest.skip("no C compiler")
    stored, s, z, group, w = _wonly_case(4, "group", True)
    x = torch.randn(2, 64)
    torch.testing.assert_close(dq.linear_weight_only(x, stored, s, z, None, 4, group), x @ w.t(),
                               rtol=1e-5, atol=1e-5)
    assert [key[0] for key in K._CACHE[id(stored)][2]] == ["stream"]  # no float weight kept
    big = torch.randn(weightonly.MAX_ROWS + 1, 64)  # a GEMM's rows: the float weight
    torch.testing.assert_close(dq.linear_weight_only(big, stored, s, z, None, 4, group),
                               big @ w.t(), rtol=1e-5, atol=1e-5)
    assert "dequant" in [key[0] for key in K._CACHE[id(stored)][2]]
    assert not weightonly.supports(1, torch.float32, stored[:, :30], s, z, 4, 0)  # 60 columns
