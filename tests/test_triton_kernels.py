"""Every generated Triton kernel against the reference, on random inputs of odd sizes.

Without a GPU these run under Triton's interpreter (TRITON_INTERPRET=1, set in
conftest) on CPU tensors; on a GPU machine they run as compiled kernels.
"""

import zlib

import pytest
import torch

triton = pytest.importorskip("triton")

from deepseek.backends.cuda.triton_pointwise import PointwiseKernel, generate_source  # noqa: E402
from deepseek.ir.fused import dump_program, run_program  # noqa: E402
from tests.conftest import rel_l2  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

PROGRAMS = {
    "gelu_tanh_chain": [["pow.Tensor_Scalar", ["$0"], {"exponent": 3.0}],
                        ["mul.Tensor", ["#0", 0.044715], {}], ["add.Tensor", ["$0", "#1"], {}],
                        ["mul.Tensor", ["#2", 0.7978845608], {}], ["tanh.default", ["#3"], {}],
                        ["add.Tensor", ["#4", 1.0], {}], ["mul.Tensor", ["$0", 0.5], {}],
                        ["mul.Tensor", ["#6", "#5"], {}]],
    "bias_residual_gelu": [["add.Tensor", ["$0", "$1"], {}], ["gelu.default", ["#0"], {}],
                           ["add.Tensor", ["#1", "$2"], {"alpha": 2}]],
    "silu": [["sigmoid.default", ["$0"], {}], ["mul.Tensor", ["$0", "#0"], {}]],
    "masked_softmax_prologue": [["gt.Scalar", ["$1"], {"other": 0.5}],
                                ["where.self", ["#0", "$0", "$3"], {}],
                                ["sub.Tensor", ["#1", "$2"], {}], ["exp.default", ["#2"], {}]],
    "rsqrt_scale": [["add.Tensor", ["$0", 1e-5], {}], ["rsqrt.default", ["#0"], {}],
                    ["mul.Tensor", ["$1", "#1"], {}], ["relu.default", ["#2"], {}],
                    ["clamp.default", ["#3"], {"min": 0.1, "max": 2.0}]],
    "cast_and_divide": [["_to_copy.default", ["$0"], {"dtype": {"dtype": "float32"}}],
                        ["div.Tensor", ["#0", "$1"], {}], ["neg.default", ["#1"], {}],
                        ["maximum.default", ["#2", "$1"], {}]],
}
SHAPES = {  # output shape and each input's shape (broadcasting), sizes off the block size
    1: [(1000,), (1000,), (1,)],
    2: [(37, 61), (37, 61), (61,)],
    3: [(3, 17, 129), (3, 1, 129), (1, 17, 1)],
    4: [(2, 5, 7, 33), (2, 5, 7, 33), (5, 1, 1)],
}


def _inputs(program, shapes, dtype):
    n = 1 + max(int(a[1:]) for _, args, _ in program for a in args
                if isinstance(a, str) and a.startswith("$"))
    xs = []
    for i in range(n):
        shape = shapes[min(i, len(shapes) - 1)]
        x = torch.randn(shape, device=DEVICE)
        if i == 0 and program is PROGRAMS["rsqrt_scale"]:
            x = x.abs()  # rsqrt of a positive variance
        if program is PROGRAMS["cast_and_divide"] and i == 1:
            x = x.abs() + 0.5  # no division by ~0
        xs.append(x.to(dtype) if i == 0 else x)
    return xs


@pytest.mark.parametrize("name", sorted(PROGRAMS))
@pytest.mark.parametrize("rank", sorted(SHAPES))
def test_generated_kernel_matches_reference(name, rank):
    program = dump_program(PROGRAMS[name])
    shapes = SHAPES[rank]
    xs = _inputs(PROGRAMS[name], shapes[1:] if len(shapes) > 1 else shapes, torch.float32)
    ref = run_program(xs, program)
    kernel = PointwiseKernel(program, xs, ref.shape, ref.dtype)
    assert kernel.source is not None
    got = kernel(*xs)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bf16_output_and_inputs():
    program = dump_program(PROGRAMS["bias_residual_gelu"])
    xs = [torch.randn(33, 65, device=DEVICE).bfloat16(), torch.randn(65, device=DEVICE).bfloat16(),
          torch.randn(33, 65, device=DEVICE).bfloat16()]
    ref = run_program([x.float() for x in xs], program)
    got = PointwiseKernel(program, xs, ref.shape, torch.bfloat16)(*xs)
    assert got.dtype == torch.bfloat16
    rel = (got.float() - ref).norm() / ref.norm()
    assert rel < 1e-2


def test_unsupported_step_is_reported_not_miscompiled():
    program = dump_program([["erfinv.default", ["$0"], {}]])
    assert generate_source(program, 1, 2) is None
    assert not PointwiseKernel.supported(program, [torch.randn(3)], torch.float32)


def test_source_is_cached_on_disk(tmp_path, monkeypatch):
    from deepseek.backends.cuda import triton_pointwise as tp

    monkeypatch.setenv("DEEPSEEK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tp, "_LOADED", {})
    program = dump_program(PROGRAMS["silu"])
    xs = [torch.randn(5, 7, device=DEVICE)]
    PointwiseKernel(program, xs, (5, 7), torch.float32)(*xs)
    files = list(tmp_path.rglob("pointwise_*.py"))
    # the strided kernel for rank 2 and the flat one for dense same-layout inputs
    assert len(files) == 2 and all("@triton.jit" in f.read_text() for f in files)


def test_channels_last_inputs_keep_their_layout():
    program = dump_program(PROGRAMS["bias_residual_gelu"])
    xs = [torch.randn(2, 6, 5, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
          for _ in range(3)]
    ref = run_program(xs, program)
    got = PointwiseKernel(program, xs, ref.shape, torch.float32)(*xs)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, affine", [(100, True), (768, True), (33, False), (1, True)])
def test_add_layer_norm_kernel_matches_pytorch(n, affine, dtype):
    """Odd row lengths (not a power of two), with and without weight/bias, 7 rows."""
    from deepseek.backends.cuda.triton_norm import AddLayerNorm

    x = torch.randn(7, n, device=DEVICE).to(dtype)
    r = torch.randn(7, n, device=DEVICE).to(dtype)
    w = torch.randn(n, device=DEVICE).to(dtype) if affine else None
    b = torch.randn(n, device=DEVICE).to(dtype) if affine else None
    s, y = AddLayerNorm(n, 1e-5)(x, r, w, b)
    want_s = x + r
    want_y = torch.layer_norm(want_s.float(), [n], None if w is None else w.float(),
                              None if b is None else b.float(), 1e-5).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    if dtype == torch.float32:
        assert torch.equal(s, want_s)
    else:  # within one bf16 rounding step (the interpreter's rounding mode may differ)
        assert torch.allclose(s.float(), want_s.float(), rtol=2 ** -7, atol=1e-6)
    assert rel_l2(y.float(), want_y.float()) < tol


def test_add_layer_norm_kernel_bf16_output_into_float32_residual():
    """bf16 precision keeps the residual stream float32: a bf16 sub-block output x is
    added to a float32 residual r; the sum and the norm are float32, as PyTorch's add."""
    from deepseek.backends.cuda.triton_norm import AddLayerNorm

    n = 96
    x = torch.randn(5, n, device=DEVICE).to(torch.bfloat16)
    r, w, b = (torch.randn(*shape, device=DEVICE) for shape in ((5, n), (n,), (n,)))
    s, y = AddLayerNorm(n, 1e-5)(x, r, w, b)
    assert s.dtype == y.dtype == torch.float32
    torch.testing.assert_close(s, x + r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, torch.layer_norm(x + r, [n], w, b, 1e-5), rtol=1e-4, atol=1e-4)
    # the normalized rows also in bf16 (for the next GEMM), or only in bf16
    s2, y2, low = AddLayerNorm(n, 1e-5)(x, r, w, b, also=torch.bfloat16)
    assert torch.equal(s2, s) and torch.equal(y2, y) and low.dtype == torch.bfloat16
    # within one bf16 rounding step (the interpreter's rounding mode may differ)
    assert torch.allclose(low.float(), y, rtol=2 ** -7, atol=1e-6)
    s3, y3 = AddLayerNorm(n, 1e-5)(x, r, w, b, y_dtype=torch.bfloat16)
    assert torch.equal(s3, s) and torch.equal(y3, low)
    # without a reader of the sum it is not written; the rows are the same bits
    s4, y4, low4 = AddLayerNorm(n, 1e-5)(x, r, w, b, also=torch.bfloat16, keep_sum=False)
    assert s4 is None and torch.equal(y4, y) and torch.equal(low4, low)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_kernel_matches_index_put(dtype):
    """Both caches written at the same positions; new rows strided (a permuted view)."""
    from deepseek.backends.cuda.triton_kv import KVWrite

    k_cache = torch.randn(2, 3, 10, 12, device=DEVICE).to(dtype)
    v_cache = torch.randn(2, 3, 10, 12, device=DEVICE).to(dtype)
    k_new = torch.randn(2, 4, 3, 12, device=DEVICE).to(dtype).permute(0, 2, 1, 3)  # (2, 3, 4, 12)
    v_new = torch.randn(2, 4, 3, 12, device=DEVICE).to(dtype).permute(0, 2, 1, 3)
    idx = torch.tensor([5, 0, 9, -2], device=DEVICE)  # -2: from the end, as index_put
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k[:, :, idx] = k_new
    want_v[:, :, idx] = v_new
    out = KVWrite()(k_cache, v_cache, idx, k_new, v_new)
    assert out is k_cache  # written where it lies
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    # caches that are not contiguous take PyTorch's path, with the same result
    k2, v2 = want_k.clone().transpose(0, 1).contiguous().transpose(0, 1), want_v.clone()
    KVWrite()(k2, v2, idx, k_new * 2, v_new)
    want_k[:, :, idx] = k_new * 2
    assert not k2.is_contiguous() and torch.equal(k2, want_k) and torch.equal(v2, want_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, weighted", [(100, True), (64, True), (33, False)])
def test_rms_norm_kernel_matches_the_reference(n, weighted, dtype):
    from deepseek.backends.cuda.triton_norm import RMSNorm
    from deepseek.ir.fused import fused_rms_norm

    x = (torch.randn(7, n, device=DEVICE) * 3).to(dtype)
    w = torch.rand(n, device=DEVICE).add(0.5).to(dtype) if weighted else None
    got, want = RMSNorm(n, 1e-6)(x, w), fused_rms_norm(x, w, 1e-6)
    assert got.dtype == want.dtype == dtype
    assert rel_l2(got.float(), want.float()) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_fp8_row_quantization_and_linear_match_the_reference():
    """Rows quantized to float8_e4m3fn with a scale each (within one fp8 step of the
    reference: the interpreter may round differently), and the whole fp8 GEMM against
    deepseek::fp8_linear's reference (rows: 37, not a block multiple; K = 96)."""
    from deepseek.backends.cuda.triton_fp8 import FP8Linear, quantize_rows
    from deepseek.ir.fused import FP8_MAX, fp8_linear

    torch.manual_seed(0)
    x = torch.randn(37, 96, device=DEVICE).to(torch.bfloat16)
    x[3] *= 100  # per-row scales: one large row leaves the others' precision alone
    q, s = quantize_rows(x)
    want_s = x.float().abs().amax(-1, keepdim=True) / FP8_MAX
    torch.testing.assert_close(s, want_s, rtol=1e-6, atol=0)
    want_q = (x.float() / want_s).to(torch.float8_e4m3fn).float()  # PyTorch's cast
    assert q.dtype == torch.float8_e4m3fn
    off = q.float() != want_q  # ties: away from zero here, to even in PyTorch
    assert off.float().mean() < 0.01
    assert ((q.float() - want_q).abs()[off] <= want_q.abs()[off] / 8).all()  # one step
    assert rel_l2(q.float() * s, x.float()) < 4e-2
    w = torch.randn(48, 96, device=DEVICE) * 0.1
    ws = w.abs().amax(1) / FP8_MAX
    wq = (w / ws[:, None]).to(torch.float8_e4m3fn)
    b = torch.randn(48, device=DEVICE).to(torch.bfloat16)
    y = FP8Linear(wq, ws)(x, b)
    assert y.dtype == torch.bfloat16 and y.shape == (37, 48)
    assert rel_l2(y.float(), fp8_linear(x, wq, ws, b).float()) < 2e-2


# Triton's interpreter (3.6) computes tl.dot on bf16 operands wrongly (values ~1e8 off):
# bf16 is checked on GPUs only
_ATTENTION_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dt", _ATTENTION_DTYPES)
@pytest.mark.parametrize("case", ["additive_mask", "bool_mask", "causal", "gqa_no_mask",
                                  "odd_sizes"])
def test_attention_kernel_matches_sdpa(case, dt):
    from deepseek.backends.cuda.triton_attention import Attention

    torch.manual_seed(0)
    b, h, hk, sq, sk, d = {"additive_mask": (2, 3, 3, 40, 40, 64), "bool_mask": (1, 2, 2, 33, 70, 32),
                           "causal": (2, 2, 2, 50, 50, 64), "gqa_no_mask": (1, 4, 2, 24, 24, 16),
                           "odd_sizes": (1, 3, 3, 17, 29, 40)}[case]
    q, k, v = (torch.randn(b, n, s, d, device=DEVICE).to(dt) for n, s in
               ((h, sq), (hk, sk), (hk, sk)))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided, as a QKV GEMM's views are
    mask = None
    if case == "additive_mask":  # BERT's padding mask: (B, 1, Sq, Sk), -inf-like on padding
        mask = torch.zeros(b, 1, sq, sk, device=DEVICE)
        mask[1, ..., 30:] = torch.finfo(torch.float32).min
        mask = mask.to(dt)
    elif case == "bool_mask":
        mask = torch.rand(sq, sk, device=DEVICE) > 0.3
        mask[:, 0] = True
    causal = case == "causal"
    gqa = hk != h
    kernel = Attention(block_m=16, block_n=32)
    assert kernel.supported(q, k, v, mask, enable_gqa=gqa)
    got = kernel(q, k, v, mask, causal, None)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), mask if mask is None or mask.dtype == torch.bool
        else mask.float(), is_causal=causal, enable_gqa=gqa)
    assert got.shape == ref.shape and got.dtype == dt
    assert got.transpose(1, 2).is_contiguous()  # (B, S, H, D) memory: the reshape after is free
    assert rel_l2(got.float(), ref) < 1e-2


# (batch, c_in, h, w, c_out, kernel, stride, padding, dilation, input dtype, its zero point)
_CONV_INT8 = {
    "stem_7x7_flat_k": (2, 3, 13, 11, 40, 7, 2, 3, 1, torch.int8, 0),  # through patches
    "stem_5x5_uint8_zp": (1, 3, 10, 9, 16, 5, 2, 2, 1, torch.uint8, 140),  # padding: the zp
    "1x1_few_channels_flat_k": (2, 8, 5, 6, 12, 1, 1, 0, 1, torch.int8, 4),
    "3x3_uint8_zp": (2, 48, 9, 7, 33, 3, 1, 1, 1, torch.uint8, 131),
    "1x1_stride2": (1, 64, 6, 5, 70, 1, 2, 0, 1, torch.int8, -3),
    "3x3_dilated_c_off_block": (1, 40, 8, 9, 24, 3, 2, 2, 2, torch.uint8, 7),
    # through tensor descriptors (TMA on Hopper): a 1x1 as a GEMM, stride-1 KxK as
    # spatial tiles whose padding TMA fills with zeros (odd sizes: tiles past the edge)
    "1x1_gemm": (2, 32, 7, 5, 40, 1, 1, 0, 1, torch.int8, 5),
    "1x1_gemm_uint8": (1, 48, 6, 6, 24, 1, 1, 0, 1, torch.uint8, 131),
    "3x3_spatial": (2, 32, 9, 11, 20, 3, 1, 1, 1, torch.int8, 0),
    "3x3_spatial_dilated": (1, 16, 10, 7, 36, 3, 1, 2, 2, torch.int8, 0),
}
_TMA = {"1x1_gemm": "gemm", "1x1_gemm_uint8": "gemm", "3x3_spatial": "spatial",
        "3x3_spatial_dilated": "spatial"}


@pytest.mark.parametrize("case", sorted(_CONV_INT8))
def test_int8_convolution_matches_the_reference(case):
    """The implicit-GEMM int8 convolution (channels off the block size, padding reading
    the zero point, uint8 inputs as int8 with a bit flip, the stem's 3 channels through
    the flattened K) against conv2d_int8's float formula: float outputs to float32
    rounding, quantized outputs exactly or one step off at a rounding tie; the
    residual add before ReLU and a bf16 float output beside the quantized one."""
    from deepseek.backends.cuda.triton_int8 import Conv2dInt8
    from deepseek.quantization.kernels import reference_conv2d_int8

    n, cin, h, w, cout, k, s, p, d, xdt, zp = _CONV_INT8[case]
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))  # str hash varies per run
    lo, hi = (0, 256) if xdt == torch.uint8 else (-128, 128)
    x = torch.randint(lo, hi, (n, cin, h, w), dtype=xdt, generator=g)
    wq = torch.randint(-128, 128, (cout, cin, k, k), dtype=torch.int8, generator=g)
    ws = torch.rand(cout, generator=g) * 0.01 + 1e-3
    b = torch.randn(cout, generator=g)
    geometry = ([s, s], [p, p], [d, d], 1)
    conv = Conv2dInt8(*(t.to(DEVICE) for t in (wq, ws)), 0.02, b.to(DEVICE), *geometry[:3])
    xd = x.to(DEVICE)
    # the descriptor kernel at these small channel counts and in its GEMM form (both slower
    # than the pointer kernel on an H100, so off by default)
    conv.tma_gemm, conv.tma_min_channels = _TMA.get(case) == "gemm", 16
    assert conv.tma_layout(xd.contiguous(memory_format=torch.channels_last), zp) == _TMA.get(case)
    for post in ("none", "relu"):
        want = reference_conv2d_int8(x, 0.02, zp, wq, ws, None, b, *geometry, post, 1.0, 0, None)
        y, q = conv(xd, zp, post, float_dtype=torch.float32)
        assert q is None and y.is_contiguous(memory_format=torch.channels_last)
        assert rel_l2(y.cpu(), want) < 1e-6
        residual = torch.randn(want.shape, generator=g)
        want_r = want if post == "none" else reference_conv2d_int8(
            x, 0.02, zp, wq, ws, None, b, *geometry, "none", 1.0, 0, None)
        want_r = want_r + residual
        want_r = torch.relu(want_r) if post == "relu" else want_r
        qdt = torch.uint8 if post == "relu" else torch.int8
        y, q = conv(xd, zp, post, residual.to(DEVICE), torch.bfloat16, (0.5, 3, qdt))
        assert y.dtype == torch.bfloat16 and rel_l2(y.float().cpu(), want_r) < 8e-3
        want_q = torch.clamp(torch.round(want_r / 0.5) + 3, *((0, 255) if qdt == torch.uint8
                                                             else (-128, 127))).to(qdt)
        diff = (q.cpu().int() - want_q.int()).abs()  # one step off only at a rounding tie
        assert q.dtype == qdt and diff.max() <= 1
        assert int((diff > 0).sum()) <= max(2, diff.numel() // 500)


def _cudnn_frontend():
    from deepseek.backends.cuda.cudnn_int8 import frontend

    return frontend()


# (batch, c_in, h, w, c_out, kernel, stride, padding): symmetric int8 activations
_CUDNN_INT8 = {"1x1": (2, 64, 7, 5, 40, 1, 1, 0), "3x3": (2, 32, 9, 11, 20, 3, 1, 1),
               "3x3_stride2": (1, 48, 10, 9, 36, 3, 2, 1), "1x1_stride2": (2, 16, 9, 9, 8, 1, 2, 0),
               "stem_3ch_7x7_stride2": (2, 3, 16, 15, 8, 7, 2, 3)}  # channels padded to 4


def test_a_second_int8_kernel_must_agree_before_it_is_chosen():
    """The check ``Conv2dInt8.choose`` runs before it times cuDNN's kernel: float results
    within 1e-3 relative L2, quantized ones one step apart at rounding ties only."""
    from deepseek.backends.cuda.triton_int8 import _agree

    y = torch.randn(2, 8, 5, 5)
    q = torch.randint(-128, 127, (2, 8, 5, 5), dtype=torch.int8)
    tie = q.clone()
    tie.view(-1)[0] += 1
    assert _agree((y, q), (y * (1 + 1e-5), tie))
    assert not _agree((y, q), (y * 1.01, q))
    far = q.clone()
    far.view(-1)[0] += 2
    assert not _agree((None, q), (None, far))
    many = q.clone()
    many.view(-1)[:20] += 1  # 20 of 400 values: not ties
    assert not _agree((None, q), (None, many))


@pytest.mark.skipif(DEVICE != "cuda" or _cudnn_frontend() is None,
                    reason="needs a GPU and nvidia-cudnn-frontend (the cuda extra)")
@pytest.mark.parametrize("case", sorted(_CUDNN_INT8))
def test_int8_convolution_through_cudnn_matches_the_reference(case):
    """cuDNN's int8 convolution with its fused epilogue (scale, bias, residual, ReLU,
    requantize), forced, against conv2d_int8's float formula; quantized outputs exactly
    or one step off at a rounding tie."""
    from deepseek.backends.cuda.triton_int8 import Conv2dInt8
    from deepseek.quantization.kernels import reference_conv2d_int8

    n, cin, h, w, cout, k, s, p = _CUDNN_INT8[case]
    g = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    x = torch.randint(-128, 128, (n, cin, h, w), dtype=torch.int8, generator=g)
    wq = torch.randint(-128, 128, (cout, cin, k, k), dtype=torch.int8, generator=g)
    ws = torch.rand(cout, generator=g) * 0.01 + 1e-3
    b = torch.randn(cout, generator=g)
    geometry = ([s, s], [p, p], [1, 1], 1)
    conv = Conv2dInt8(wq.to(DEVICE), ws.to(DEVICE), 0.02, b.to(DEVICE), *geometry[:3])
    conv.prefer = "cudnn"
    xd = x.to(DEVICE)
    want = reference_conv2d_int8(x, 0.02, 0, wq, ws, None, b, *geometry, "relu", 1.0, 0, None)
    y, _ = conv(xd, 0, "relu", float_dtype=torch.float32)
    assert set(conv.choices.values()) == {"cudnn"}  # cuDNN built and ran it
    assert rel_l2(y.cpu(), want) < 1e-6
    plain = reference_conv2d_int8(x, 0.02, 0, wq, ws, None, b, *geometry, "none", 1.0, 0, None)
    residual = torch.randn(plain.shape, generator=g)
    want_r = torch.relu(plain + residual)
    y, q = conv(xd, 0, "relu", residual.to(DEVICE).half(), torch.bfloat16,
                (0.05, 0, torch.int8))
    assert set(conv.choices.values()) == {"cudnn"}  # cuDNN ran both calls
    assert rel_l2(y.float().cpu(), want_r) < 8e-3
    want_q = torch.clamp(torch.round(want_r / 0.05), -128, 127)
    diff = (q.cpu().int() - want_q.int()).abs()  # the residual went through float16
    assert q.dtype == torch.int8 and diff.max() <= 1
    assert int((diff > 0).sum()) <= max(2, diff.numel() // 100)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("geometry", [(3, 2, 1, 1, False), (2, 2, 0, 1, True), (3, 1, 1, 2, False)])
def test_max_pool_kernel_matches_pytorch(dtype, geometry):
    """The Triton max pool on int8/uint8 (CUDA's ATen pools floats only) and floats
    against PyTorch's CPU pooling of the same values, exactly: padding never wins (all
    values negative in one channel), ceil mode's partial windows, a NaN propagates."""
    from deepseek.backends.cuda.triton_pool import max_pool2d

    k, s, p, d, ceil = geometry
    g = torch.Generator().manual_seed(k * 10 + s)
    if dtype.is_floating_point:
        x = torch.randn(2, 19, 11, 13, generator=g).to(dtype)
        x[0, 3] = -x[0, 3].abs() - 1  # a channel of negatives: zero padding would win
        x[1, 5, 4, 6] = float("nan")
    else:
        lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
        x = torch.randint(lo, hi, (2, 19, 11, 13), dtype=dtype, generator=g)
    want = torch.max_pool2d(x, k, s, p, d, ceil)
    got = max_pool2d(x.to(DEVICE), [k], [s], [p], [d], ceil)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    if dtype.is_floating_point:
        assert torch.allclose(got.cpu(), want, rtol=0, atol=0, equal_nan=True)
        assert got.isnan().any()
    else:
        assert torch.equal(got.cpu(), want)
