"""precision= in ds.compile: bf16/fp16 graphs keep the float32 interface and stay accurate."""

import pytest
import torch
from torch.utils._pytree import tree_leaves

import deepseek as ds
from deepseek.ir.ops import Op, Prop
from tests.conftest import rel_l2
from tests.model_zoo import ZOO

pytestmark = pytest.mark.usefixtures("half_precisions_native")


@pytest.mark.parametrize("name", ["bert_tiny_padded", "llama_gqa_tiny", "mobilenetv2_tiny",
                                  "lstm_classifier"])
def test_bf16_matches_fp32_eager_within_bf16_tolerance(name):
    model, inputs = ZOO[name]()
    engine = ds.compile(model, inputs, backend="cpu", precision="bf16")
    assert "map_to_tensorcore" in [p["name"] for p in engine.report().passes]
    matmuls = [n for n in engine.graph.nodes if n.opdef.has(Prop.MATMUL)]
    assert matmuls and all(x.spec.dtype == torch.bfloat16 for n in matmuls
                           for x in n.input_values() if x.spec.dtype.is_floating_point)
    with torch.no_grad():
        ref = tree_leaves(model(*inputs))[0]
    got = tree_leaves(engine(*inputs))[0]
    assert got.dtype == torch.float32  # the model's interface is kept
    assert rel_l2(got, ref) < 1e-2


def test_fp16_and_unknown_precisions():
    model, inputs = ZOO["small_cnn"]()
    engine = ds.compile(model, inputs, backend="cpu", precision="fp16")
    assert any(n.op is Op.TO_COPY for n in engine.graph.nodes)
    assert rel_l2(engine(*inputs), model(*inputs)) < 1e-2
    with pytest.raises(ds.DeepseekError, match="precision must be one of"):
        ds.compile(model, inputs, backend="cpu", precision="int4")


def test_bf16_on_a_cpu_without_native_bf16_compiles_fp32_and_says_so(monkeypatch):
    import deepseek.backends.cpu as cpu

    monkeypatch.setattr(cpu, "native_precisions", lambda: frozenset())
    model, inputs = ZOO["small_cnn"]()
    with pytest.warns(ds.DeepseekWarning, match="precision='bf16' compiled as fp32"):
        engine = ds.compile(model, inputs, backend="cpu", precision="bf16")
    report = engine.report()
    assert report.precision == "fp32" and "map_to_tensorcore" not in [p["name"] for p in report.passes]
    assert "no native bf16 kernels" in str(report) and report.to_dict()["notes"]
    assert all(v.spec.dtype != torch.bfloat16 for n in engine.graph.nodes for v in n.outputs)
    assert rel_l2(engine(*inputs), model(*inputs)) < 1e-5


def test_bf16_does_not_touch_the_captured_graph():
    model, inputs = ZOO["small_cnn"]()
    graph = ds.capture(model, inputs)
    before = str(graph)
    ds.compile(graph, backend="cpu", precision="bf16")
    assert str(graph) == before


class _RotaryLike(torch.nn.Module):
    """Angles from integer positions (a float32 island, as in rotary embeddings) scale
    a linear layer's output."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.freq = torch.nn.Parameter(torch.randn(1, 8))

    def forward(self, x, positions):
        angles = positions.float()[:, None] @ self.freq  # (T, 8): float32 on purpose
        return self.lin(x) * torch.cos(angles)


def test_bf16_data_flow_keeps_float32_islands():
    torch.manual_seed(0)
    model = _RotaryLike().eval()
    x, pos = torch.randn(5, 8), torch.randint(0, 4000, (5,))
    engine = ds.compile(model, (x, pos), backend="cpu", precision="bf16")
    dtypes = {n.kind: n.outputs[0].spec.dtype for n in engine.graph.nodes}
    # the linear layer runs in bf16, the angle GEMM of two float32 operands in float32
    gemms = [n for n in engine.graph.nodes if n.opdef.has(Prop.MATMUL)]
    assert sorted(str(n.outputs[0].spec.dtype) for n in gemms) == ["torch.bfloat16", "torch.float32"]
    assert dtypes["_to_copy"] in (torch.float32, torch.bfloat16)
    # at positions in the thousands, angles in bf16 would be off by whole radians
    assert rel_l2(engine(x, pos), model(x, pos)) < 1e-2


def test_bf16_output_dtypes_and_inputs_cast_once():
    model, inputs = ZOO["small_cnn"]()
    engine = ds.compile(model, inputs, backend="cpu", precision="bf16")
    floats = [o.spec.dtype for n in engine.graph.nodes for o in n.outputs
              if o.spec.dtype.is_floating_point]
    # one cast in, one cast back out: everything else is bf16
    assert floats.count(torch.float32) == 1 and floats[-1] == torch.float32
    assert engine.graph.nodes[0].op is Op.TO_COPY
    assert all(t.dtype == torch.bfloat16 for t in engine.graph.constants.values()
               if t.dtype.is_floating_point)


def test_fp8_linear_matches_a_float_gemm_within_fp8_error():
    from deepseek.ir.fused import FP8_MAX, fp8_linear

    torch.manual_seed(0)
    x = torch.randn(37, 64, dtype=torch.bfloat16)  # rows: not a multiple of 16
    w, b = torch.randn(48, 64) * 0.1, torch.randn(48, dtype=torch.bfloat16)
    scale = w.abs().amax(1) / FP8_MAX
    q = (w / scale[:, None]).to(torch.float8_e4m3fn)
    y = fp8_linear(x, q, scale, b)
    assert y.dtype == torch.bfloat16 and y.shape == (37, 48)
    ref = x.float() @ w.t() + b.float()
    assert rel_l2(y.float(), ref) < 4e-2  # e4m3 keeps 3 mantissa bits: ~2-3% per GEMM
    # the activation's scale is per row: a row 1000x larger does not coarsen the others
    x[0] *= 1000
    y = fp8_linear(x, q, scale, b)
    ref = x.float() @ w.t() + b.float()
    assert rel_l2(y[1:].float(), ref[1:]) < 4e-2


def test_fp8_precision_runs_gemms_in_fp8_and_the_rest_in_bf16(tmp_path):
    model, inputs = ZOO["bert_tiny_padded"]()
    engine = ds.compile(model, inputs, backend="cpu", precision="fp8")
    names = [p["name"] for p in engine.report().passes]
    assert names.index("map_to_fp8") == names.index("map_to_tensorcore") + 1
    fp8 = [n for n in engine.graph.nodes if n.op is Op.FP8_LINEAR]
    assert fp8 and not any(n.op in (Op.ADDMM, Op.MM) for n in engine.graph.nodes)
    assert all(n.inputs[1].spec.dtype == torch.float8_e4m3fn for n in fp8)
    with torch.no_grad():
        ref = tree_leaves(model(*inputs))[0]
    got = tree_leaves(engine(*inputs))[0]
    assert got.dtype == torch.float32 and rel_l2(got, ref) < 2e-2
    engine.save(tmp_path / "fp8.dsk")  # float8 weights in the artifact
    assert torch.equal(tree_leaves(ds.load(str(tmp_path / "fp8.dsk"), backend="cpu")(*inputs))[0], got)
    with pytest.raises(ds.UnsupportedOpError, match="fp8_linear"):
        engine.export_onnx(str(tmp_path / "fp8.onnx"))


def test_fp8_leaves_gemms_fp8_tensor_cores_cannot_take_in_bf16():
    # MobileNetV2-tiny's classifier: a GEMM whose sizes are not multiples of 16
    model, inputs = ZOO["mobilenetv2_tiny"]()
    engine = ds.compile(model, inputs, backend="cpu", precision="fp8")
    gemms = [n for n in engine.graph.nodes if n.op is Op.ADDMM]
    assert gemms and all(n.outputs[0].spec.dtype == torch.bfloat16 for n in gemms)
    assert not any(n.op is Op.FP8_LINEAR for n in engine.graph.nodes)


def test_fp8_gemm_flops_are_counted_as_the_gemms_they_replace():
    from deepseek.profiler.flops import node_flops

    model, inputs = ZOO["bert_tiny_padded"]()
    fp8 = ds.compile(model, inputs, backend="cpu", precision="fp8").graph
    bf16 = ds.compile(model, inputs, backend="cpu", precision="bf16").graph

    def gemm_flops(graph, ops):
        return sum(node_flops(n, {}) for n in graph.nodes if n.op in ops)

    assert gemm_flops(fp8, (Op.FP8_LINEAR,)) == gemm_flops(bf16, (Op.ADDMM,)) > 0


def test_optimize_graph_runs_the_hardware_stage_for_its_target():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 100), torch.nn.GELU(),
                                torch.nn.Linear(100, 30)).eval()
    x = torch.randn(4, 1024)
    graph = ds.capture(model, (x,))
    cuda = ds.optimize_graph(ds.capture(model, (x,)), target="cuda", precision="bf16")
    gemms = [n for n in cuda.nodes if n.opdef.has(Prop.MATMUL)]
    assert all(n.outputs[0].spec.dtype == torch.bfloat16 for n in gemms)
    # pad_gemm_dims (CUDA only): the 1024 x 100 weight's 100 columns padded to 104
    assert any(n.outputs[0].spec.shape[-1] == 104 for n in gemms)
    cpu = ds.optimize_graph(ds.capture(model, (x,)), target="cpu", precision="bf16")
    assert not any(n.outputs[0].spec.shape[-1] == 104 for n in cpu.nodes)
    engine = ds.compile(cuda, backend="cpu", opt_level=0)
    assert rel_l2(engine(x), model(x)) < 1e-2
    fp32 = ds.optimize_graph(graph, target="cuda")  # fp32: nothing to rewrite
    assert all(n.outputs[0].spec.dtype == torch.float32 for n in fp32.nodes
               if n.opdef.has(Prop.MATMUL))
    with pytest.raises(ValueError, match="target must be"):
        ds.optimize_graph(ds.capture(model, (x,)), target="tpu")
    with pytest.raises(ValueError, match="precision must be"):
        ds.optimize_graph(ds.capture(model, (x,)), precision="int4")
