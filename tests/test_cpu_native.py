"""The CPU backend's C kernels (deepseek/backends/cpu/*.c, built by native.py): Winograd
3x3 convolutions (winograd.{py,c}: the C transforms and the batched GEMM between them)
and direct convolutions for few input channels with a fused 2x2 max pool (direct.{py,c}),
each against a float64 convolution, inside generated plans, and without a compiler."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import deepseek as ds
import deepseek.backends.cpu.codegen as codegen
from deepseek.backends.cpu import direct, native, rowwise, winograd
from tests.conftest import rel_l2
from tests.test_cpu_plans import _check, _forcing, _plan_source

pytestmark = pytest.mark.skipif(any(m.library() is None for m in (winograd, direct, rowwise)),
                                reason=f"no C compiler: {native.unavailable}")


@pytest.mark.parametrize("tile", winograd.TILES)
@pytest.mark.parametrize("n,c,k,h,w,pad", [
    (1, 64, 64, 14, 14, 1),  # tiles divide the output (F4: no, F2: yes)
    (2, 13, 21, 9, 11, 1),   # channel counts off the 8-wide vectors, odd sizes, a batch
    (1, 8, 5, 7, 7, 0),      # no padding: output 5x5
    (1, 16, 24, 5, 6, 2),    # padding 2: output wider than the input
    (1, 9, 8, 3, 3, 1),      # one tile, mostly padding
])
@pytest.mark.parametrize("bias,relu,pool", [(True, False, False), (False, True, False),
                                           (True, True, True), (False, False, True)])
def test_winograd_matches_float64_convolution(tile, n, c, k, h, w, pad, bias, relu, pool):
    torch.manual_seed(c * k + h)
    x = torch.randn(n, c, h, w)
    wt = torch.randn(k, c, 3, 3) / (3 * c ** 0.5)
    b = torch.randn(k) if bias else None
    ref = torch.nn.functional.conv2d(x.double(), wt.double(), None if b is None else b.double(),
                                     padding=pad)
    if relu:
        ref = ref.clamp_min(0)
    if pool:  # floor: an odd last row or column dropped
        ref = torch.max_pool2d(ref, 2)
    conv = winograd.WinogradConv(wt, b, (pad, pad), x.shape, relu=relu, tile=tile, pool=pool)
    v = torch.full(conv.v_shape, float("nan"))  # every entry must be written before read
    m = torch.full(conv.m_shape, float("nan"))
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        y = conv(inp, v, m)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert rel_l2(y.double(), ref) < 1e-5
    out = torch.full(ref.shape, float("nan")).contiguous(memory_format=torch.channels_last)
    assert conv(x, v, m, out) is out and rel_l2(out.double(), ref) < 1e-5


@pytest.mark.parametrize("kernel", ["winograd4", "winograd2", "direct"])
def test_a_nan_input_is_not_hidden_by_relu_or_pool(kernel):
    """torch.relu and max_pool2d keep NaN; so do the fused kernels. The direct kernel gives
    PyTorch's NaN pattern; Winograd's transforms mix a whole tile, so its NaNs cover at
    least PyTorch's (as cuDNN's Winograd kernels do)."""
    c = 1 if kernel == "direct" else 8
    x = torch.randn(1, c, 12, 12)
    x[0, 0, 5, 6] = float("nan")
    w, b = torch.randn(16, c, 3, 3), torch.randn(16)
    ref = torch.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1)), 2)
    if kernel == "direct":
        y = direct.DirectConv(w, b, (1, 1), (1, 1), x.shape, relu=True, pool=True)(x)
        assert torch.equal(y.isnan(), ref.isnan())
    else:
        conv = winograd.WinogradConv(w, b, (1, 1), x.shape, relu=True, tile=int(kernel[-1]),
                                     pool=True)
        y = conv(x, torch.empty(conv.v_shape), torch.empty(conv.m_shape))
        assert ref.isnan().any() and (y.isnan() | ~ref.isnan()).all()
    keep = ~y.isnan()
    assert torch.allclose(y[keep], ref[keep], rtol=1e-4, atol=1e-4)


def test_scratch_bytes_counts_both_matrices():
    conv = winograd.WinogradConv(torch.randn(32, 16, 3, 3), None, (1, 1), (1, 16, 10, 10), tile=4)
    assert conv.v_shape == (36, 9, 16) and conv.m_shape == (36, 9, 32)
    assert conv.scratch_bytes() == 4 * 36 * 9 * (16 + 32)


class ConvReluConv(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.a = nn.Conv2d(c, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 8, 3, padding=0, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("choice", ["winograd4", "winograd2"])
def test_winograd_chosen_in_a_plan(monkeypatch, choice):
    """Forced, both convolutions run through it: the first with its ReLU as it writes and
    into a plan buffer (the second writes the caller's output: a fresh tensor)."""
    _forcing(monkeypatch, choice)
    engine = _check(ConvReluConv().eval(), torch.randn(2, 16, 13, 10))
    source = _plan_source(engine)
    assert source.count("= wino") == 2 and "v_relu = v_convolution\n" in source
    first, second = (ln for ln in source.splitlines() if "= wino" in ln)
    assert first.count("_b") == 3 and second.count("_b") == 2


@pytest.mark.parametrize("choice", ["winograd4", "winograd2"])
def test_winograd_in_a_plan_takes_the_pool(monkeypatch, choice):
    """conv -> ReLU -> 2x2 max pool, forced through Winograd: one statement (odd sizes: the
    pool drops the last row)."""
    _forcing(monkeypatch, choice)
    model = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(24, 8, 1)).eval()
    source = _plan_source(_check(model, torch.randn(2, 16, 11, 10)))
    assert "= wino" in source and "max_pool2d(" not in source


def test_native_kernels_not_offered_without_a_compiler(monkeypatch):
    monkeypatch.setattr(native, "_LIBS", {})
    monkeypatch.setattr(native, "unavailable", {})
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert winograd.library() is None and "compiler" in native.unavailable["winograd"]
    seen = []
    monkeypatch.setattr(codegen, "_fastest", lambda c: seen.append(set(c)) or next(iter(c)))
    _check(ConvReluConv().eval(), torch.randn(1, 16, 8, 8))
    _check(FirstLayer().eval(), torch.randn(1, 1, 12, 12))
    assert seen and not any(name.startswith("winograd") or name == "direct"
                            for names in seen for name in names)


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("n,c,k,h,w,kernel,stride,pad", [
    (1, 1, 32, 28, 28, 3, 1, 1),   # MNIST's first layer
    (2, 3, 20, 9, 11, 3, 2, 1),    # RGB, stride 2, channels off the 8-wide vectors, a batch
    (1, 1, 70, 13, 13, 5, 1, 2),   # more than 32 output channels, a 5x5 kernel
    (1, 4, 8, 7, 6, 7, 2, 3),      # kernel bigger than the image: every tap near a border
    (1, 2, 3, 6, 5, 1, 1, 0),      # 1x1, three output channels
])
@pytest.mark.parametrize("bias,relu", [(True, True), (False, False)])
def test_direct_matches_float64_convolution(n, c, k, h, w, kernel, stride, pad, pool, bias, relu):
    torch.manual_seed(k * h + c)
    x = torch.randn(n, c, h, w)
    wt = torch.randn(k, c, kernel, kernel)
    b = torch.randn(k) if bias else None
    ref = torch.nn.functional.conv2d(x.double(), wt.double(), None if b is None else b.double(),
                                     stride=stride, padding=pad)
    if relu:
        ref = ref.clamp_min(0)
    if pool:
        ref = torch.max_pool2d(ref, 2)
    conv = direct.DirectConv(wt, b, (stride, stride), (pad, pad), x.shape, relu=relu, pool=pool)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        y = conv(inp)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert rel_l2(y.double(), ref) < 1e-6
    out = torch.full(ref.shape, float("nan")).contiguous(memory_format=torch.channels_last)
    assert conv(x, out) is out and rel_l2(out.double(), ref) < 1e-6


class FirstLayer(nn.Module):
    """MNIST's first block: conv (one channel) -> ReLU -> 2x2 max pool, then a layer that
    keeps the pooled result inside the plan (a buffer)."""

    def __init__(self, pool=2, hw=(12, 12)):
        super().__init__()
        self.conv = nn.Conv2d(1, 12, 3, padding=1)
        self.pool = nn.MaxPool2d(pool)
        self.fc = nn.Linear(12 * (hw[0] // pool) * (hw[1] // pool), 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


@pytest.mark.parametrize("pool,fused", [(2, True), (3, False)])
def test_direct_chosen_in_a_plan_takes_the_pool(monkeypatch, pool, fused):
    """Forced, the first layer runs through the direct kernel; a 2x2 max pool after its ReLU
    is done by the kernel as it writes (a 3x3 one stays a pool)."""
    _forcing(monkeypatch, "direct")
    model = FirstLayer(pool, hw=(13, 12)).eval()
    source = _plan_source(_check(model, torch.randn(1, 1, 13, 12)))
    assert "= direct" in source and ("max_pool2d(" not in source) == fused


@pytest.mark.parametrize("pool", [2, 3])
def test_candidates_are_timed_with_the_pool_a_native_kernel_does(monkeypatch, pool):
    """Where a 2x2 max pool follows, the native kernel is timed doing it (its result is the
    pooled one) and every other candidate with a pooling step after it: the choice weighs
    what each path runs. A 3x3 pool no native kernel does leaves the timings alone."""
    seen = []

    def record(candidates):
        if "direct" in candidates:
            seen.append({name: f() for name, f in candidates.items()})
        return "direct" if "direct" in candidates else next(iter(candidates))

    monkeypatch.setattr(codegen, "_fastest", record)
    model = FirstLayer(pool, hw=(12, 12)).eval()
    _check(model, torch.randn(1, 1, 12, 12))
    (results,) = seen
    direct_out = results.pop("direct")
    assert direct_out.shape == ((1, 12, 6, 6) if pool == 2 else (1, 12, 12, 12))
    for name, out in results.items():  # (conv result, pool step's result) when pooled
        assert isinstance(out, tuple) == (pool == 2), name


def test_gelu_tanh_one_pass_matches_float64():
    x = torch.cat([torch.randn(3001) * 4, torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 1e4])])
    ref = torch.nn.functional.gelu(x.double(), approximate="tanh")
    got = rowwise.gelu_tanh(x)
    assert (got.double() - ref).abs().max() < 1e-6 and torch.isfinite(got).all()
    assert codegen.gelu_tanh(x).equal(got)  # the backend's GELU is this kernel here


@pytest.mark.parametrize("cols", [768, 13, 8])
@pytest.mark.parametrize("affine", [True, False])
def test_add_layer_norm_matches_float64(cols, affine):
    x, r = torch.randn(2, 5, cols) * 3 + 1, torch.randn(2, 5, cols)
    w, b = (torch.randn(cols), torch.randn(cols)) if affine else (None, None)
    s, y = rowwise.add_layer_norm(x, r, w, b, 1e-5)
    wd, bd = (None if t is None else t.double() for t in (w, b))
    ref = torch.layer_norm(x.double() + r.double(), [cols], wd, bd, 1e-5)
    assert torch.equal(s, x + r) and rel_l2(y.double(), ref) < 1e-6


class Residual(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.fc, self.ln = nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x):
        h = self.ln(x + self.fc(x))  # residual add + layer norm: one fused node
        return h, self.ln(h + x)


@pytest.mark.parametrize("choice", ["native", "aten"])
def test_add_layer_norm_in_a_plan(monkeypatch, choice):
    _forcing(monkeypatch, choice)
    source = _plan_source(_check(Residual().eval(), torch.randn(3, 7, 24)))
    assert ("add_ln" in source) == (choice == "native")


@pytest.mark.parametrize("dtype,zp,lo,hi", [(torch.uint8, 122, 0, 255),
                                             (torch.int8, 0, -128, 127),
                                             (torch.uint8, 3, 0, 127)])  # 7-bit activations
@pytest.mark.parametrize("shape,channels_last", [((2, 13, 9, 7), True), ((5, 37), False),
                                                 ((3,), False)])
def test_quantize_is_bitwise_the_reference(dtype, zp, lo, hi, shape, channels_last):
    """One pass in C against the five in-place ATen steps it replaces, every value equal:
    ties to even (values on .5 steps), both ends of the range, far outside it, inf, NaN;
    the output keeps the input's memory layout."""
    inv = 9.0
    x = torch.randn(shape) * 20
    flat = x.view(-1)
    specials = torch.tensor([0.5, 1.5, -2.5, 1e30, -1e30, float("inf"), float("-inf"),
                             float("nan")]) / inv
    flat[:len(specials)] = specials[:flat.numel()]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = torch.mul(x, inv).round_().add_(zp).clamp_(lo, hi).to(dtype)
    got = rowwise.quantize(x, inv, zp, lo, hi, dtype)
    assert got.dtype == dtype and got.stride() == want.stride() and torch.equal(got, want)


@pytest.mark.parametrize("choice", ["native", "aten"])
def test_quantize_in_an_int8_plan(monkeypatch, choice):
    from deepseek.quantization import QuantConfig, Quantizer

    _forcing(monkeypatch, choice)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 12, 12)
    q = Quantizer(QuantConfig(progress=False)).quantize(model, [torch.randn(4, 3, 12, 12)])
    engine = ds.compile(q, (x,), backend="cpu", precision="int8")
    with torch.no_grad():
        want = q(x)
    assert rel_l2(engine(x), want) < 2e-3
    source = _plan_source(engine)
    native = len(re.findall(r"= quantize\d+\(", source))
    # the input's quantization (the next ones are fused into the int8 kernels)
    assert (native, "round_()" in source) == ((1, False) if choice == "native" else (0, True))


def test_built_once_per_machine_then_loaded_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSEEK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_LIBS", {})
    assert rowwise.library() is not None
    built = list((tmp_path / "native").glob("rowwise_*.so"))
    assert len(built) == 1
    monkeypatch.setattr(native, "_LIBS", {})  # a new process: only the disk cache is left
    calls = []
    real = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run",
                        lambda args, **kw: calls.append(args) or real(args, **kw))
    assert rowwise.library() is not None
    assert all("-o" not in args for args in calls)  # asked the compiler's version only


def test_an_unwritable_cache_builds_into_a_temporary_directory(monkeypatch, tmp_path):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")  # the cache path is a file: no directory can be made there
    monkeypatch.setenv("DEEPSEEK_CACHE_DIR", str(blocked))
    monkeypatch.setattr(native, "_LIBS", {})
    monkeypatch.setattr(native, "_TMP_DIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert rowwise.library() is not None
    assert list((tmp_path / "tmp").glob("rowwise_*.so"))


def test_build_failure_is_reported_not_raised(monkeypatch, tmp_path):
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: broken' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setattr(native, "_LIBS", {})
    monkeypatch.setattr(native, "unavailable", {})
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setenv("DEEPSEEK_CACHE_DIR", str(tmp_path / "cache"))
    assert winograd.library() is None and "broken" in native.unavailable["winograd"]


def test_profiler_names_the_algorithm_and_keeps_the_roof(monkeypatch):
    """A Winograd convolution's effective GFLOP/s (direct-convolution FLOPs over its time)
    is reported with the algorithm's name and never raises the compute roof."""
    from deepseek.profiler import DevicePeaks

    _forcing(monkeypatch, "winograd4")
    model, x = ConvReluConv(c=32).eval(), torch.randn(1, 32, 40, 40)
    engine = ds.compile(model, (x,), backend="cpu")
    tiny = DevicePeaks(device="cpu", gflops=0.001, gbps=1000.0)  # every op beats this roof
    with ds.profile(engine, peaks={"cpu": tiny}) as prof:
        for _ in range(3):
            engine(x)
    rows = {r["name"]: r for r in prof.report().ops}
    assert rows["convolution"]["algorithm"] == "winograd F(4x4,3x3)"
    assert rows["convolution_1"]["algorithm"] == "winograd F(4x4,3x3)"
    assert all(r["algorithm"] is None for n, r in rows.items() if not n.startswith("convolution"))
    assert prof.report().meta["peaks"]["cpu"]["gflops"] == 0.001  # not raised by Winograd rows
