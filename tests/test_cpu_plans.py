"""The CPU backend's generated plans: measured kernel choices, layout rewrites, plan buffers.

Every kernel choice is made by timing, so each test forces each candidate in turn
(``_fastest`` patched) and checks the result against eager PyTorch.
"""

from __future__ import annotations

import re
import threading

import pytest
import torch
import torch.nn as nn

import deepseek as ds
import deepseek.backends.cpu.codegen as codegen
from deepseek.examples import mnist_cnn
from tests.conftest import rel_l2


def _forcing(monkeypatch, choice: str):
    """Make every measured choice pick ``choice`` where it is a candidate (else the first)."""
    monkeypatch.setattr(codegen, "_fastest", lambda c: choice if choice in c else next(iter(c)))


def _plan_source(engine, merged: bool = False) -> str:
    """The plan's statements, one per node; ``merged``: as the plain plan runs them
    (stretches of oneDNN kernels as one call, ``dnn_chains``)."""
    plan = next(iter(engine._parts[0].executable.plans.values()))
    if merged:
        return plan.source
    return "\n".join(ln for ln in plan.instrumented(None).source.splitlines()
                     if not ln.strip().startswith("_hook("))


def _check(model, x, atol=1e-4):
    engine = ds.compile(model, (x,), backend="cpu")
    for _ in range(2):
        y = torch.randn_like(x)
        with torch.no_grad():
            ref = model(y)
        got = engine(y)
        refs, gots = (ref, got) if isinstance(ref, tuple) else ((ref,), (got,))
        for r, g in zip(refs, gots):
            assert g.shape == r.shape and rel_l2(g, r) < atol
    return engine


@pytest.mark.parametrize("choice", ["onednn", "conv1x1", "aten", "split"])
@pytest.mark.parametrize("rows", [1, 3])
def test_gemm_candidates_match_eager(monkeypatch, choice, rows):
    _forcing(monkeypatch, choice)
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 32, bias=False)).eval()
    engine = _check(model, torch.randn(rows, 96))
    if choice == "split" and torch.get_num_threads() > 1:
        assert "baddbmm" in _plan_source(engine) and "torch.bmm" in _plan_source(engine)
    if choice == "conv1x1":  # both GEMMs (the first with the ReLU as its post-op)
        assert _plan_source(engine).count("_convolution_pointwise(") == 2


@pytest.mark.parametrize("choice", ["onednn", "conv1x1", "aten", "split"])
def test_gemm_on_3d_input(monkeypatch, choice):
    _forcing(monkeypatch, choice)
    engine = _check(nn.Linear(48, 32).eval(), torch.randn(1, 2, 48))
    assert ("_convolution_pointwise(" in _plan_source(engine)) == (choice == "conv1x1")


class ConvPoolHead(nn.Module):
    def __init__(self, act=nn.ReLU, pool=dict(kernel_size=2), flat_out=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.act = act()
        self.pool = nn.MaxPool2d(**pool)
        self.fc = nn.Linear(16 * 5 * 5, 10)
        self.flat_out = flat_out

    def forward(self, x):
        f = torch.flatten(self.pool(self.act(self.conv(x))), 1)
        y = self.fc(f)
        return (y, f) if self.flat_out else y


@pytest.mark.parametrize("choice", ["onednn", "aten", "aten_cl", "split", "into_cl", "pool_first", "post_op"])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid, nn.Tanh, nn.SiLU])
def test_conv_act_pool_flatten_linear(monkeypatch, choice, act):
    """conv -> monotone op -> max pool -> flatten -> linear, every measured path."""
    _forcing(monkeypatch, choice)
    engine = _check(ConvPoolHead(act).eval(), torch.randn(1, 3, 10, 10))
    src = _plan_source(engine)
    if choice == "onednn":  # oneDNN's convolution leaves channels-last activations: the
        assert "as_strided" in src  # flatten reads them in place, the weight permuted


@pytest.mark.parametrize("choice", ["into_cl", "pool_first"])
def test_monotone_op_moves_past_padded_ceil_pool(monkeypatch, choice):
    _forcing(monkeypatch, choice)
    model = ConvPoolHead(nn.Sigmoid, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True))
    model.fc = nn.Linear(16 * 6 * 6, 10)
    _check(model.eval(), torch.randn(2, 3, 11, 11))


def test_flatten_read_elsewhere_keeps_its_order(monkeypatch):
    """A flatten that is also an output is not reordered (only a GEMM-only flatten is)."""
    _forcing(monkeypatch, "onednn")
    engine = _check(ConvPoolHead(flat_out=True).eval(), torch.randn(1, 3, 10, 10))
    assert "as_strided" not in _plan_source(engine)


def test_outputs_are_fresh_tensors_and_buffers_are_reused(monkeypatch):
    _forcing(monkeypatch, "split")
    model, (x,) = mnist_cnn(1)
    engine = ds.compile(model, (x,), backend="cpu")
    first = engine(x)
    kept = first.clone()
    for _ in range(3):
        engine(torch.randn_like(x))
    assert torch.equal(first, kept)  # a later call never writes into a returned tensor
    plan = next(iter(engine._parts[0].executable.plans.values()))
    assert "_pool.pop()" in plan.source
    assert len(plan.__globals__["_pool"]) == 1  # one set of buffers, reused


def test_an_output_is_never_a_plan_buffer(monkeypatch):
    """A GEMM whose result (through a view) is returned computes into a fresh tensor."""
    _forcing(monkeypatch, "aten")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 16)

        def forward(self, x):
            return self.fc(x).view(2, 8), torch.relu(self.fc(x) * 2)

    engine = _check(M().eval(), torch.randn(1, 32))
    a, b = engine(torch.randn(1, 32))
    a_kept, b_kept = a.clone(), b.clone()
    engine(torch.randn(1, 32))
    assert torch.equal(a, a_kept) and torch.equal(b, b_kept)


def test_concurrent_calls_take_their_own_buffers(monkeypatch):
    _forcing(monkeypatch, "into_cl")
    model, (x,) = mnist_cnn(1)
    engine = ds.compile(model, (x,), backend="cpu")
    xs = [torch.randn_like(x) for _ in range(4)]
    with torch.no_grad():
        refs = [model(v) for v in xs]
    engine(x)
    errors = []

    def worker(k):
        for _ in range(30):
            if rel_l2(engine(xs[k]), refs[k]) > 1e-4:
                errors.append(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_first_call_under_inference_mode_then_normal_calls(monkeypatch):
    _forcing(monkeypatch, "split")
    model, (x,) = mnist_cnn(1)
    engine = ds.compile(model, (x,), backend="cpu")
    with torch.inference_mode():
        engine(x)
    with torch.no_grad():
        ref = model(x)
    out = engine(x)
    assert rel_l2(out, ref) < 1e-4 and not out.is_inference() and torch.is_grad_enabled()


def test_kernel_choice_is_the_fastest_candidate():
    import time

    def slow():
        time.sleep(0.002)

    assert codegen._fastest({"slow": slow, "fast": lambda: None}) == "fast"
    assert codegen._fastest({"fast": lambda: None, "slow": slow}) == "fast"


def test_buffers_of_one_shape_are_shared_when_their_lifetimes_do_not_overlap(monkeypatch):
    _forcing(monkeypatch, "aten")
    layers = []
    for _ in range(5):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 10)).eval()
    engine = _check(model, torch.randn(1, 64))
    src = _plan_source(engine)
    # five hidden GEMM results, each read by the next GEMM only: two buffers alternate
    assert src.count("out=_b0") + src.count("out=_b1") == 5 and "_b2" not in src


@pytest.mark.parametrize("conv", [
    dict(in_channels=1, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=3, out_channels=16, kernel_size=5, stride=2, padding=2, bias=False),
    dict(in_channels=2, out_channels=4, kernel_size=(3, 2), stride=(1, 2), padding=(0, 1), dilation=2),
    dict(in_channels=4, out_channels=8, kernel_size=1),
])
@pytest.mark.parametrize("batch", [1, 2])
def test_gather_gemm_convolution(monkeypatch, conv, batch):
    """Small convolutions as a gather of patches and one GEMM (channels-last result)."""
    _forcing(monkeypatch, "gather")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(**conv)

        def forward(self, x):  # the result read by a pool and returned: both paths
            y = self.conv(x)
            return torch.max_pool2d(torch.relu(y), 2), y * 2

    engine = _check(M().eval(), torch.randn(batch, conv["in_channels"], 12, 11))
    assert "index_select" in _plan_source(engine)


def test_gather_gemm_convolution_as_the_output(monkeypatch):
    _forcing(monkeypatch, "gather")
    engine = _check(nn.Conv2d(1, 4, 3, padding=1).eval(), torch.randn(1, 1, 9, 9))
    src = _plan_source(engine)
    assert "index_select" in src and "as_strided" in src  # a fresh result, not a buffer
    out = engine(torch.randn(1, 1, 9, 9))
    assert out.is_contiguous()  # outputs leave in the default layout


def test_profiler_names_the_kernel_that_runs_a_moved_op(monkeypatch):
    """A ReLU moved past its max pool is reported as run by the pool, not timed alone."""
    _forcing(monkeypatch, "pool_first")
    model = ConvPoolHead().eval()
    engine = ds.compile(model, (torch.randn(1, 3, 10, 10),), backend="cpu")
    with ds.profile(engine) as prof:
        for _ in range(3):
            engine(torch.randn(1, 3, 10, 10))
    rows = {r["name"]: r for r in prof.report().ops}
    relu = next(r for r in rows.values() if r["op"].startswith("aten.relu") or r["op"] == "relu")
    pool = next(r for r in rows.values() if "max_pool2d" in r["op"])
    assert relu["fused_into"] == pool["name"]


class _Mlp(nn.Module):
    """GEMM -> reshape -> activation -> GEMM, the transformer MLP's shape."""

    def __init__(self, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(32, 64), nn.Linear(64, 16), act

    def forward(self, x):  # x: (2, 12, 32): 24 rows, through 3-D views
        return self.fc2(self.act(self.fc1(x)))


class _TanhGelu(nn.Module):
    """GPT-2's GELU written out: fusion makes it one element-wise program."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x.pow(3))))


@pytest.mark.parametrize("choice", ["onednn", "conv1x1", "apart"])  # oneDNN: post-op candidates
@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), _TanhGelu(), nn.ReLU()],
                         ids=["gelu", "gelu_tanh", "gelu_tanh_written_out", "relu"])
def test_gemm_activation_epilogue(monkeypatch, choice, act):
    """The activation after a GEMM runs as oneDNN's post-op when that measures faster
    (forced here), recognised through the reshape between them; else separately."""
    _forcing(monkeypatch, choice)
    model = _Mlp(act).eval()
    x = torch.randn(2, 12, 32)
    engine = _check(model, x)
    source = _plan_source(engine)
    kind = "'relu'" if isinstance(act, nn.ReLU) else "'gelu'"
    assert (source.count(kind) == 1) == (choice != "apart")
    assert ("_convolution_pointwise(" in source) == (choice == "conv1x1")


def test_written_out_gelu_runs_as_one_gelu():
    """A tanh GELU spelled out element-wise (GPT-2's) that no GEMM can take as a post-op
    runs as one GELU (``gelu_tanh``), not eight passes over memory; so does nn.GELU's."""
    for act in (_TanhGelu(), nn.GELU(approximate="tanh")):
        engine = _check(nn.Sequential(nn.LayerNorm(32), act).eval(), torch.randn(4, 32))
        source = _plan_source(engine)
        assert source.count("gelu_tanh") == 1 and "pow" not in source and "tanh(" not in source


def test_gelu_tanh_matches_float64_reference():
    x = torch.cat([torch.randn(10_000) * 4, torch.tensor([-30.0, -8.0, 0.0, 8.0, 30.0])])
    ref = torch.nn.functional.gelu(x.double(), approximate="tanh")
    got = codegen.gelu_tanh(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=2e-6)


def test_gelu_programs_are_recognised_by_their_values():
    from deepseek.ir.fused import dump_program

    tanh_gelu = dump_program([("pow.Tensor_Scalar", ["$0"], {"exponent": 3.0}),
                              ("mul.Tensor", ["#0", 0.044715], {}), ("add.Tensor", ["$0", "#1"], {}),
                              ("mul.Tensor", ["#2", 0.7978845608028654], {}),
                              ("tanh.default", ["#3"], {}), ("add.Tensor", ["#4", 1.0], {}),
                              ("mul.Tensor", ["$0", 0.5], {}), ("mul.Tensor", ["#6", "#5"], {})])
    assert codegen._gelu_program(tanh_gelu, {}) == "tanh"
    sigmoid = dump_program([("sigmoid.default", ["$0"], {})])
    assert codegen._gelu_program(sigmoid, {}) is None
    # as ONNX files spell it: the constants are inputs ($1 = 0.5, $2 = 0.044715, ...)
    onnx_style = dump_program([("pow.Tensor_Scalar", ["$0"], {"exponent": 3.0}),
                               ("mul.Tensor", ["#0", "$2"], {}), ("add.Tensor", ["$0", "#1"], {}),
                               ("mul.Tensor", ["#2", "$3"], {}), ("tanh.default", ["#3"], {}),
                               ("add.Tensor", ["#4", 1.0], {}), ("mul.Tensor", ["$0", "$1"], {}),
                               ("mul.Tensor", ["#6", "#5"], {})])
    assert codegen._gelu_program(onnx_style, {1: 0.5, 2: 0.044715, 3: 0.7978845608028654}) == "tanh"
    assert codegen._gelu_program(onnx_style, {1: 0.5, 2: 0.05, 3: 0.7978845608028654}) is None


@pytest.mark.parametrize("overload", ["default", "tensor"])
@pytest.mark.parametrize("dtype,qmin,qmax,zp", [(torch.uint8, 0, 255, 7), (torch.int8, -128, 127, 0)])
@pytest.mark.parametrize("choice", ["aten", "native"])
def test_quantize_per_tensor_code_is_bitwise_the_reference(overload, dtype, qmin, qmax, zp,
                                                          choice, monkeypatch):
    """The plan's quantize (in-place ATen steps, or the one-pass C kernel where built)
    gives exactly quantized_decomposed's integers, on
    random values, values at rounding ties and values clamped at both ends."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    from deepseek.ir.graph import Graph
    from deepseek.ir.ops import Op
    from deepseek.ir.types import TensorSpec

    qd = torch.ops.quantized_decomposed
    scale = 0.037
    g = Graph()
    x = g.add_input("x", TensorSpec((4, 300), torch.float32))
    if overload == "default":
        node = g.add_node(Op.QUANTIZE_PER_TENSOR, [x], {"scale": scale, "zero_point": zp,
                          "quant_min": qmin, "quant_max": qmax, "dtype": dtype},
                          [TensorSpec((4, 300), dtype)], name="q")
    else:
        s = g.add_constant("s", torch.tensor(scale))
        z = g.add_constant("z", torch.tensor(zp))
        node = g.add_node(Op.QUANTIZE_PER_TENSOR_TENSOR, [x, s, z], {"quant_min": qmin,
                          "quant_max": qmax, "dtype": dtype}, [TensorSpec((4, 300), dtype)],
                          name="q")
    g.outputs = [node.outputs[0]]
    _forcing(monkeypatch, choice)
    engine = ds.compile(g, backend="cpu")
    values = torch.randn(4, 300) * 4
    values[0, :100] = (torch.arange(100) - 50 + 0.5) * scale  # ties
    values[1, :2] = torch.tensor([1e6, -1e6])  # clamped
    got = engine(values)
    want = qd.quantize_per_tensor(values, scale, zp, qmin, qmax, dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    from deepseek.backends.cpu import rowwise

    aten = choice == "aten" or rowwise.library() is None
    assert ("round_()" in _plan_source(engine)) == aten


class _Bottleneck(nn.Module):
    """A ResNet block with a downsample: the residual convolution runs after the main
    path's last convolution in the captured order."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 1)
        self.bn2 = nn.BatchNorm2d(32)
        self.down = nn.Conv2d(8, 32, 1)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.down(x)).mean((2, 3))


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_conv_residual_add_relu_is_one_onednn_call(half_precisions_native, precision, tol):
    torch.manual_seed(0)
    model = _Bottleneck().eval()
    for bn in (model.bn1, model.bn2):  # not the identity: BN folding must be exercised
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 12, 12)
    engine = ds.compile(model, (x,), backend="cpu", precision=precision)
    got = engine(x)
    source = _plan_source(engine)
    onednn = (torch.float32 if precision == "fp32" else torch.bfloat16) in codegen._ONEDNN_DTYPES
    # PyTorch's oneDNN op, or a oneDNN primitive made once (``onednn.conv2d``: called with
    # the convolution's input and the residual), whichever measured faster
    fused = source.count("_convolution_pointwise.binary(") + len(
        re.findall(r"= dnn\d+\(.+, .+\)$", source, re.M))
    assert fused == int(onednn)
    with torch.no_grad():
        assert rel_l2(got, model(x)) < tol
