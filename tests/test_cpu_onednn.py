"""oneDNN primitives made once per plan (deepseek/backends/cpu/onednn.{py,c}): each kernel
against a float64 reference on random inputs, inside generated plans (forced), and a
plan without them where oneDNN is not installed."""

from __future__ import annotations

import itertools

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
    made = onednn.pool2d("max", kernel, stride, pad, dil, ceil, shape, dtype)
    assert torch.equal(made(x), torch.max_pool2d(x, kernel, stride, pad, dil, ceil))


def test_pooled_size_is_pytorchs():
    """The pool's output size by formula (its meta kernel's first call imports sympy)."""
    for size, k, s, p, d, ceil in itertools.product(range(1, 12), range(1, 5), range(1, 4),
                                                    range(3), range(1, 3), (False, True)):
        if p > k // 2 or size + 2 * p < d * (k - 1) + 1:
            continue  # configurations PyTorch refuses
        want = torch.nn.functional.max_pool2d(torch.empty(1, 1, size, 1, device="meta"),
                                              (k, 1), (s, 1), (p, 0), (d, 1), ceil).shape[2]
        assert onednn._pooled_size(size, k, s, p, d, ceil) == want, (size, k, s, p, d, ceil)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,kernel,stride,pad,include", [
    ((1, 2048, 7, 7), (7, 7), (7, 7), (0, 0), True),   # ResNet's global average pool
    ((2, 5, 7, 9), (3, 2), (2, 3), (1, 1), True),      # padded windows counted as zeros
    ((2, 5, 7, 9), (3, 3), (2, 2), (1, 1), False),     # or left out of the divisor
])
def test_average_pool_matches_aten(dtype, shape, kernel, stride, pad, include):
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    made = onednn.pool2d("avg_include_pad" if include else "avg", kernel, stride, pad, (1, 1),
                         False, shape, dtype)
    ref = F.avg_pool2d(x.double(), kernel, stride, pad, count_include_pad=include)
    assert made(x).shape == ref.shape
    assert rel_l2(made(x).double(), ref) < (1e-6 if dtype == torch.float32 else 8e-3)


class _Pools(nn.Module):
    """A 3x3 average pool, then the mean over the image (global average pooling), kept
    4-D for a 1x1 convolution and flattened for a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.avg_pool2d(torch.relu(x), 3, 1, 1, count_include_pad=False)
        return self.conv(h.mean([2, 3], keepdim=True)).flatten(1), self.fc(h.mean([-2, -1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_average_pools_in_a_plan(monkeypatch, dtype):
    """Forced, the average pool and both spatial means run as pooling primitives made
    once, and the plan matches eager on fresh inputs."""
    _forcing(monkeypatch, "onednn_made")
    torch.manual_seed(3)
    model = _Pools().eval().to(dtype)
    engine = ds.compile(model, (torch.randn(2, 8, 6, 5, dtype=dtype),), backend="cpu")
    for _ in range(2):
        x = torch.randn(2, 8, 6, 5, dtype=dtype)
        with torch.no_grad():
            for got, ref in zip(engine(x), model(x)):
                assert got.shape == ref.shape
                assert rel_l2(got.double(), ref.double()) < \
                    (1e-5 if dtype == torch.float32 else 2e-2)
    source = _plan_source(engine)
    assert "k_mean" not in source and "avg_pool2d(" not in source, source
    assert source.count("= dnn") >= 3


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(24, 40), nn.Linear(40, 12, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate="tanh"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 24), (2, 5, 24)])  # post-ops from 9 rows
def test_gemms_as_made_1x1_convolutions_in_a_plan(monkeypatch, dtype, shape):
    """Forced, both GEMMs (one with its GELU as a post-op, one without bias, leading
    dims folded into rows) run as 1x1 convolution primitives over a 1 x rows image."""
    _forcing(monkeypatch, "conv1x1_made")
    torch.manual_seed(4)
    model = _Mlp().eval().to(dtype)
    engine = ds.compile(model, (torch.randn(shape, dtype=dtype),), backend="cpu")
    for _ in range(2):
        x = torch.randn(shape, dtype=dtype)
        with torch.no_grad():
            ref = model(x)
        got = engine(x)
        assert got.shape == ref.shape
        assert rel_l2(got.double(), ref.double()) < (1e-5 if dtype == torch.float32 else 2e-2)
    source = _plan_source(engine)
    assert source.count("= dnn") == 2 and "gelu_tanh" not in source, source


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
    monkeypatch.setattr(onednn, "_LIBRARIES", {})
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
    made = onednn.pool2d("max", *args, False, x.shape, torch.float32)
    assert torch.equal(made(x), torch.max_pool2d(x, (3, 2)))


@pytest.mark.parametrize("choice", ["onednn_made", "onednn_sum"])
def test_a_stretch_of_kernels_runs_as_one_chain_call(monkeypatch, choice):
    """Forced, the stem, its pool and the block's end (binary or sum post-op) run as one
    ``Chain`` call; the plan matches eager, and a result stays intact when the engine runs
    again (each call lays its intermediates out in an arena of its own)."""
    from deepseek.backends.cpu import codegen

    order = (choice, "onednn_made")  # the sum post-op where offered, else a made primitive
    monkeypatch.setattr(codegen, "_fastest",
                        lambda c: next((k for k in order if k in c), next(iter(c))))
    torch.manual_seed(5)
    model = _Block().eval()
    engine = _check(model, torch.randn(2, 3, 10, 10))
    merged = _plan_source(engine, merged=True)
    assert merged.count("= chain") == 1 and "= dnn" not in merged.split("= chain")[0]
    assert _plan_source(engine).count("= dnn") >= 4  # the profiler's twin: one per node
    x1, x2 = torch.randn(2, 3, 10, 10), torch.randn(2, 3, 10, 10)
    y1 = engine(x1)
    keep = y1.clone()
    engine(x2)
    assert torch.equal(y1, keep)
    with torch.no_grad():
        assert rel_l2(y1, model(x1)) < 1e-4


@pytest.mark.parametrize("dtype,to", [(torch.float32, torch.bfloat16),
                                      (torch.float32, torch.float32),
                                      (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (2, 19, 4, 9)])
def test_reorder_into_channels_last_is_exact(dtype, to, shape):
    x = torch.randn(shape).to(dtype)
    made = onednn.reorder(list(shape), dtype, to)
    got = made(x)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == to
    assert torch.equal(got, x.to(to).contiguous(memory_format=torch.channels_last))


def test_input_converted_by_a_reorder_in_the_chain(monkeypatch, half_precisions_native):
    """In bf16, the float32 input reaches the stem through a oneDNN reorder (dtype and
    layout in one pass) that is the chain's first step, not an ATen copy before it."""
    _forcing(monkeypatch, "onednn_made")
    torch.manual_seed(8)
    model = _Block().eval()
    engine = ds.compile(model, (torch.randn(2, 3, 10, 10),), backend="cpu", precision="bf16")
    for _ in range(2):
        x = torch.randn(2, 3, 10, 10)
        with torch.no_grad():
            assert rel_l2(engine(x).float(), model(x)) < 2e-2
    merged = _plan_source(engine, merged=True)
    first = merged.splitlines()[2]  # after the def and the inputs' unpacking
    assert " = chain" in first and first.endswith("(i_x)"), merged
    assert merged.count("= chain") == 1 and merged.count("to_copy") == 1, merged  # the output's


_TWO_RUNTIMES = pytest.mark.skipif(len(onednn.runtimes()) < 2,
                                   reason="needs both PyTorch's oneDNN and the extra's")


@_TWO_RUNTIMES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_runtimes_make_the_same_kernels(dtype):
    """A convolution with a residual and a GEMM with GELU, made on PyTorch's oneDNN and on
    the extra's, each against ATen."""
    torch.manual_seed(9)
    w, b = torch.randn(24, 16, 3, 3) * 0.1, torch.randn(24)
    x = torch.randn(2, 16, 9, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 24, 9, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    ref = torch.relu(F.conv2d(x.double(), w.double(), b.double(), padding=1) + r.double())
    wl, bl = torch.randn(16, 40) * 0.1, torch.randn(40)
    rows = torch.randn(9, 16).to(dtype)
    ref_l = F.gelu(rows.double() @ wl.double() + bl.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for runtime in onednn.runtimes():
        pick = lambda candidates, runtime=runtime: runtime  # noqa: E731
        conv = onednn.conv2d(w, b, [1, 1], [1, 1], [1, 1], 1, x.shape, dtype, "relu", "add",
                             choose=pick)
        assert conv.lib is onednn.library(runtime)
        assert rel_l2(conv(x, r).double(), ref) < tol
        gemm = onednn.linear(wl, bl, 9, dtype, "gelu", choose=pick)
        assert rel_l2(gemm(rows).double(), ref_l) < tol


@_TWO_RUNTIMES
def test_a_choice_answered_without_timing_makes_one_kernel(monkeypatch):
    """As from the disk cache: the choice names a runtime without calling the candidates,
    and only that runtime's kernel is made (a warm compile does not make both)."""
    made = []

    class Counting(onednn._Kernel):
        def __init__(self, lib, *rest, **kw):
            made.append(lib)
            super().__init__(lib, *rest, **kw)
    monkeypatch.setattr(onednn, "_Kernel", Counting)
    kernel = onednn.conv2d(torch.randn(8, 4, 1, 1), None, [1, 1], [0, 0], [1, 1], 1,
                           (1, 4, 5, 5), torch.float32, choose=lambda candidates: "extra")
    assert made == [onednn.library("extra")] and kernel.lib is made[0]


@_TWO_RUNTIMES
def test_a_chain_mixes_kernels_of_both_runtimes(monkeypatch):
    """Kernels alternately made on either oneDNN run in one chain call, each through its
    own library's entry; the plan matches eager."""
    from deepseek.backends.cpu import codegen

    turn = []

    def choose(candidates):
        if set(candidates) == set(onednn.RUNTIMES):
            turn.append(len(turn) % 2)
            return onednn.RUNTIMES[turn[-1]]
        return "onednn_made" if "onednn_made" in candidates else next(iter(candidates))
    monkeypatch.setattr(codegen, "_fastest", choose)
    torch.manual_seed(10)
    model = _Tower().eval()
    engine = _check(model, torch.randn(1, 16, 8, 8))
    plan = next(iter(engine._parts[0].executable.plans.values()))
    chain = next(v for v in plan.__globals__.values() if isinstance(v, onednn.Chain))
    assert {k.lib._name for k in chain.kernels} == {onednn.library(r)._name
                                                    for r in onednn.RUNTIMES}


@pytest.mark.parametrize("xdt,zp", [(torch.uint8, 131), (torch.int8, 0), (torch.int8, 5)])
@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (1, 1, 0), (3, 2, 1), (1, 2, 0)])
@pytest.mark.parametrize("out", [torch.float32, torch.uint8, torch.int8])
def test_int8_convolution_made_once_matches_the_reference(xdt, zp, k, stride, pad, out):
    """oneDNN's int8 convolution as a primitive made once (scales, zero points, bias,
    ReLU, requantization in its attributes) against conv2d_int8's float formula: float
    outputs to float32 rounding, quantized ones exactly or one step off at a tie."""
    from deepseek.quantization.kernels import reference_conv2d_int8

    torch.manual_seed(11)
    lo, hi = (0, 256) if xdt == torch.uint8 else (-128, 128)
    x = torch.randint(lo, hi, (2, 32, 9, 7), dtype=xdt)
    w = torch.randint(-127, 128, (24, 32, k, k), dtype=torch.int8)
    ws, b = torch.rand(24) * 0.01 + 1e-3, torch.randn(24)
    act = "relu" if out != torch.int8 else "none"
    quantized = out != torch.float32
    made = onednn.qconv2d(w, ws, b, [stride] * 2, [pad] * 2, [1, 1], list(x.shape), xdt, 0.02,
                          zp, act, out, 0.5 if quantized else 1.0, 3 if quantized else 0)
    got = made(x.contiguous(memory_format=torch.channels_last))
    want = reference_conv2d_int8(x, 0.02, zp, w, ws, None, b, [stride] * 2, [pad] * 2, [1, 1],
                                 1, act, 0.5, 3, out if quantized else None)
    assert got.dtype == out and got.is_contiguous(memory_format=torch.channels_last)
    if not quantized:
        assert rel_l2(got, want) < 1e-6
        return
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and int((diff > 0).sum()) <= max(2, diff.numel() // 500)


@pytest.mark.parametrize("xdt,zp", [(torch.uint8, 131), (torch.int8, 0), (torch.int8, 5)])
@pytest.mark.parametrize("act", ["none", "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("out", [torch.float32, torch.uint8, torch.int8])
def test_int8_linear_made_once_matches_the_reference(xdt, zp, act, out):
    """oneDNN's int8 GEMM as a primitive made once (a linear's (N, K) weight, per-channel
    scales, bias, activation, requantization) against linear_int8's float formula."""
    from deepseek.quantization.kernels import reference_linear_int8

    torch.manual_seed(12)
    lo, hi = (0, 256) if xdt == torch.uint8 else (-128, 128)
    x = torch.randint(lo, hi, (37, 72), dtype=xdt)
    w = torch.randint(-127, 128, (40, 72), dtype=torch.int8)
    ws, b = torch.rand(40) * 0.01 + 1e-3, torch.randn(40)
    quantized = out != torch.float32
    made = onednn.qlinear(w, ws, b, 37, xdt, 0.02, zp, act, out, 0.5 if quantized else 1.0,
                          3 if quantized else 0)
    got = made(x)
    want = reference_linear_int8(x, 0.02, zp, w, ws, None, b, act, 0.5, 3,
                                 out if quantized else None)
    assert got.dtype == out and got.shape == (37, 40)
    if not quantized:
        assert rel_l2(got, want) < 1e-5
        return
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and int((diff > 0).sum()) <= max(2, diff.numel() // 200)


def test_unknown_runtime_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DEEPSEEK_ONEDNN", "mkl")
    with pytest.raises(ValueError, match="DEEPSEEK_ONEDNN='mkl'.*torch, extra"):
        onednn.runtimes()


def test_pytorch_onednn_functions_missing_is_none(tmp_path):
    import mmap

    assert onednn.torch_onednn(["dnnl_no_such_function"]) is None
    not_elf = tmp_path / "libfake.so"
    not_elf.write_bytes(b"not an ELF file" * 100)
    with open(not_elf, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert onednn._functions(m, str(not_elf), ["dnnl_version"]) is None


class _Tower(nn.Module):
    """Six 1x1 convolutions in a row: each intermediate dies at the next one."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(16, 16, 1) for _ in range(6)))

    def forward(self, x):
        return self.convs(x).relu()


def test_chain_arena_reuses_dead_intermediates(monkeypatch):
    _forcing(monkeypatch, "onednn_made")
    torch.manual_seed(6)
    model = _Tower().eval()
    engine = _check(model, torch.randn(1, 16, 8, 8))
    plan = next(iter(engine._parts[0].executable.plans.values()))
    chains = [v for v in plan.__globals__.values() if isinstance(v, onednn.Chain)]
    assert len(chains) == 1 and chains[0].n == 6
    one = 16 * 8 * 8 * 4
    assert chains[0].arena_bytes == 2 * one  # two live at a time, not six


def _attention_operands(b, h, sq, sk, d, dtype, g):
    """q, k, v as the heads of merged projections lay them out (strided views)."""
    q = torch.randn(b, sq, h, d, generator=g).to(dtype).transpose(1, 2)
    kv = torch.randn(b, sk, 2, h, d, generator=g).to(dtype)
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,sq,sk,d,mask", [
    (1, 12, 128, 128, 64, "keys"),       # BERT-base's padding mask, (B, 1, 1, keys)
    (2, 3, 5, 7, 16, "full"),            # cross attention, a (B, 1, rows, keys) mask
    (2, 4, 9, 9, 8, "causal"),
    (3, 2, 6, 11, 24, None),
    (1, 5, 1, 13, 32, "keys"),           # one query row (a decoding step)
])
@pytest.mark.parametrize("heads_inner", [False, True])
def test_attention_made_once_matches_sdpa(dtype, b, h, sq, sk, d, mask, heads_inner):
    g = torch.Generator().manual_seed(b * 1000 + sq * 10 + sk)
    q, k, v = _attention_operands(b, h, sq, sk, d, dtype, g)
    m = {"keys": lambda: torch.randn(b, 1, 1, sk, generator=g),
         "full": lambda: torch.randn(b, 1, sq, sk, generator=g),
         "causal": lambda: None, None: lambda: None}[mask]()
    if m is not None and dtype == torch.bfloat16:
        m = m.to(dtype)
    scale = 0.7 / d ** 0.5
    made = onednn.attention((b, h, sq, d), sk, dtype, scale, causal=mask == "causal",
                            heads_inner=heads_inner)
    for _ in range(2):  # the second call runs the primitives made by the first
        got = made(q, k, v, m)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                              attn_mask=None if m is None else m.double(),
                                              is_causal=mask == "causal", scale=scale)
        assert got.shape == (b, h, sq, d) and got.dtype == dtype
        assert (got.transpose(1, 2) if heads_inner else got).is_contiguous()
        assert rel_l2(got.double(), want) < _TOL[dtype]
    q2, k2, v2 = (t.contiguous() for t in (q, k, v))  # other strides: primitives of their own
    assert rel_l2(made(q2, k2, v2, m).double(), want) < _TOL[dtype]
    assert len(made._made) == 2


class _CausalSelfAttention(nn.Module):
    """GPT-2's attention: one projection for q, k and v, causal, heads merged after."""

    def __init__(self, dim=48, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, s, dim = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(x).split(dim, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads_inner", [False, True])
def test_attention_made_once_gives_zeros_where_every_key_is_masked(dtype, heads_inner):
    """Rows with every key masked (left padding under a causal mask) come out as zeros,
    as from PyTorch's attention, not as the NaNs of a softmax over -infs."""
    g = torch.Generator().manual_seed(5)
    q, k, v = _attention_operands(2, 3, 6, 6, 16, dtype, g)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, :, 1] = float("-inf")  # one row of batch 0
    mask[1] = float("-inf")  # all of batch 1
    mask = mask.to(dtype)
    made = onednn.attention((2, 3, 6, 16), 6, dtype, 0.25, heads_inner=heads_inner)
    got = made(q, k, v, mask)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                          attn_mask=mask.float(), scale=0.25)
    assert not got.isnan().any() and (got[1] == 0).all() and (got[0, :, 1] == 0).all()
    assert rel_l2(got.float(), want) < _TOL[dtype]


@pytest.mark.parametrize("name", ["bert_tiny_padded", "vit_tiny", "causal"])
def test_attention_made_once_in_a_plan(monkeypatch, name):
    """Attention chosen as the made primitives inside a compiled transformer (heads read
    where the projections wrote them) matches eager; with the choice off, PyTorch's."""
    from torch.utils._pytree import tree_leaves

    from tests.model_zoo import ZOO

    model, inputs = (_CausalSelfAttention().eval(), (torch.randn(2, 10, 48),)) \
        if name == "causal" else ZOO[name]()
    with torch.no_grad():
        want = tree_leaves(model(*inputs))[0]
    for choice, calls in (("onednn_made", True), ("aten", False)):
        _forcing(monkeypatch, choice)
        engine = ds.compile(model, inputs, backend="cpu")
        got = tree_leaves(engine(*inputs))[0]
        assert ("= attention" in _plan_source(engine)) == calls
        assert rel_l2(got, want) < 1e-5
