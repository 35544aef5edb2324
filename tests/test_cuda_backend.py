"""The CUDA backend on a GPU: models match eager fp32 (skipped without a GPU)."""

import pytest
import torch
from torch.utils._pytree import tree_leaves

import deepseek as ds
from benchmarks.models import BENCHMARK_MODELS
from tests.conftest import rel_l2
from tests.model_zoo import ZOO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {"fp32": 1e-3, "tf32": 1e-3, "bf16": 1e-2}
SMALL = {"mnist_cnn": dict(batch=4), "resnet50": dict(batch=2, image=96),
         "bert_base": dict(batch=2, seq=32), "gpt2_small": dict(batch=2, seq=32)}


def _check(model, inputs, precision):
    model = model.cuda().eval()
    inputs = tuple(x.cuda() for x in inputs)
    engine = ds.compile(model, inputs, backend="cuda", precision=precision)
    with torch.no_grad():
        ref = tree_leaves(model(*inputs))
    for _ in range(2):  # the second call replays the captured CUDA graph
        got = tree_leaves(engine(*inputs))
    for g, r in zip(got, ref):
        if r.is_floating_point():
            assert rel_l2(g.float(), r.float()) < TOL[precision]
        else:
            assert torch.equal(g, r)
    return engine


@pytest.mark.parametrize("precision", sorted(TOL))
@pytest.mark.parametrize("name", sorted(BENCHMARK_MODELS))
def test_benchmark_models_on_cuda(name, precision):
    model, inputs = BENCHMARK_MODELS[name](**SMALL[name])
    _check(model, inputs, precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_breadth_models_on_cuda(name, precision):
    model, inputs = ZOO[name]()
    _check(model, inputs, precision)


def test_fused_kernels_run_as_triton_and_graphs_replay():
    model, inputs = ZOO["gpt2_tiny"]()
    engine = _check(model, inputs, "fp32")
    exe = engine._parts[0].executable
    runner = next(iter(exe.runners.values()))
    assert type(runner).__name__ == "_GraphReplay"  # captured as a CUDA graph
    assert "triton" in runner.plan.source  # fused chains launch generated Triton kernels


def test_dynamic_batch_replays_one_graph_per_bucket():
    model, (x,) = BENCHMARK_MODELS["mnist_cnn"](batch=4)
    model = model.cuda()
    engine = ds.compile(model, (x.cuda(),), backend="cuda", dynamic_dims={0: {0: "batch"}})
    calls = []
    for b in (4, 7, 1, 7, 5, 3, 8, 1):
        xb = torch.randn(b, 1, 28, 28, device="cuda")
        with torch.no_grad():
            calls.append((engine(xb), model(xb)))
            assert rel_l2(*calls[-1]) < 1e-3
    # the graphs share one memory pool, replayed out of capture order: every result
    # handed out earlier is still intact
    assert all(rel_l2(got, want) < 1e-3 for got, want in calls)
    exe = engine._parts[0].executable
    assert exe.buckets.enabled  # batch 7 padded to 8 matched the exact plan
    assert sorted(key[0][0][0] for key in exe.runners) == [1, 4, 8]  # 5 ran on 8, 3 on 4
    assert {r.pool for r in exe.runners.values()} == {exe.pool}


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 tensor cores need Ada or Hopper")
@pytest.mark.parametrize("name", ["bert_base", "gpt2_small"])
def test_fp8_gemms_run_on_fp8_tensor_cores(name):
    model, inputs = BENCHMARK_MODELS[name](**SMALL[name])
    model = model.cuda().eval()
    inputs = tuple(x.cuda() for x in inputs)
    engine = ds.compile(model, inputs, backend="cuda", precision="fp8")
    assert any(n.kind == "deepseek::fp8_linear" for n in engine.graph.nodes)
    with torch.no_grad():
        ref = tree_leaves(model(*inputs))[0]
    for _ in range(2):  # the second call replays the captured CUDA graph
        got = tree_leaves(engine(*inputs))[0]
    # e4m3 keeps 3 mantissa bits: ~2-3% per GEMM, 12 layers deep (on the CPU's emulated
    # _scaled_mm: BERT-base 7.0e-2, GPT-2 small 9.5e-2); a wrong scale would give ~1
    assert rel_l2(got.float(), ref.float()) < 0.15


def test_opt_level_3_measures_kernel_choices_and_caches_them(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("DEEPSEEK_CACHE_DIR", str(tmp_path))
    model, inputs = BENCHMARK_MODELS["bert_base"](batch=1, seq=64)
    model = model.cuda().eval()
    inputs = tuple(x.cuda() for x in inputs)
    with torch.no_grad():
        ref = tree_leaves(model(*inputs))[0]
    tuned = ds.compile(model, inputs, backend="cuda", precision="bf16", opt_level=3)
    assert rel_l2(tree_leaves(tuned(*inputs))[0].float(), ref) < 1e-2
    tuner = tuned._parts[0].executable.tuner
    assert tuner.decisions and all(d["how"] == "measured" for d in tuner.decisions[:1])
    (path,) = (tmp_path / "autotune").iterdir()
    table = json.loads(path.read_text())
    entry = table[tuner.decisions[0]["problem"]]
    assert entry["choice"] == min(entry["us"], key=entry["us"].get) and "sdpa" in entry["us"]
    again = ds.compile(model, inputs, backend="cuda", precision="bf16")  # opt_level 2: cached
    again(*inputs)
    assert {d["how"] for d in again._parts[0].executable.tuner.decisions} == {"cached"}


@pytest.mark.parametrize("method", ["symmetric", "asymmetric"])
def test_quantized_resnet_runs_the_int8_kernels_like_the_cpu_engine(method):
    """A calibrated int8 ResNet-50 (int8, or uint8 activations with a zero point) on the
    GPU's int8 kernels computes what the CPU engine computes, to float rounding and a
    rare one-step rounding tie, and stays near the eager quantized module."""
    from deepseek.quantization import QuantConfig, Quantizer

    torch.manual_seed(0)
    model, inputs = BENCHMARK_MODELS["resnet50"](batch=2, image=64)
    calib = [[torch.randn_like(inputs[0])] for _ in range(2)]
    qm = Quantizer(QuantConfig(method=method, weight_method="symmetric", progress=False)) \
        .quantize(model, calib)
    x = torch.randn_like(inputs[0])
    want = ds.compile(qm, inputs, backend="cpu", precision="int8")(x)
    engine = ds.compile(qm.cuda(), (inputs[0].cuda(),), backend="cuda", precision="int8")
    for _ in range(2):  # the second call replays the captured CUDA graph
        got = engine(x.cuda()).cpu()
    assert rel_l2(got, want) < 6e-2  # (a tie rounded the other way moves later layers)
    with torch.no_grad():
        assert rel_l2(got, qm(x.cuda()).cpu()) < 8e-2
