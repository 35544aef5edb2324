"""The CUDA backend's kernel choices, read from the generated plan's source (runs
without a GPU: generating a plan launches nothing; GPU tests check the numbers)."""

import pytest

import deepseek as ds
from benchmarks.models import BENCHMARK_MODELS
from deepseek.backends.cpu.codegen import generate_plan
from deepseek.ir.interpreter import bind_inputs

# bf16 graphs come from the CPU backend's lowering, whatever this CPU runs natively
pytestmark = pytest.mark.usefixtures("half_precisions_native")


def _cuda_source(name, precision="bf16", **kwargs) -> str:
    model, inputs = BENCHMARK_MODELS[name](**kwargs)
    graph = ds.compile(model.eval(), inputs, backend="cpu", precision=precision).graph
    return generate_plan(graph, bind_inputs(graph, list(inputs)), "cuda").source


def test_resnet_convolutions_run_with_cudnn_epilogues():
    src = _cuda_source("resnet50", batch=1, image=64)
    # 53 convolutions: 33 + ReLU, 16 + residual add + ReLU (4 of them with the
    # downsample's bias added to theirs), the 4 downsamples without bias
    assert src.count("torch.cudnn_convolution_relu(") == 33
    assert src.count("torch.cudnn_convolution_add_relu(") == 16
    assert src.count("bsum") == 4
    plain = [line for line in src.splitlines() if "torch.convolution(" in line]
    assert len(plain) == 4 and all(", None, " in line for line in plain)


def test_float32_convolutions_keep_pytorchs_kernel():
    src = _cuda_source("resnet50", precision="fp32", batch=1, image=64)
    assert "cudnn_convolution" not in src and src.count("torch.convolution(") == 53


def test_gemm_and_gelu_run_as_one_cublaslt_call():
    # BERT's erf GELU (bf16 only) and GPT-2's tanh GELU spelled out element-wise
    assert _cuda_source("bert_base", batch=1, seq=16).count("_addmm_activation(") == 12
    assert _cuda_source("gpt2_small", batch=1, seq=16).count("_addmm_activation(") == 12
    assert "_addmm_activation" not in _cuda_source("bert_base", precision="fp32", batch=1, seq=16)


def test_layer_norm_writes_the_next_gemms_bf16_input_itself():
    # BERT (post-norm): the norm's rows are the next residual (float32) and a GEMM's
    # bf16 input: one kernel writes both; GPT-2 (pre-norm): only the bf16 copy is read
    bert = _cuda_source("bert_base", batch=1, seq=16)
    assert bert.count("also=") == 24  # all but the last norm (the pooler reads one row)
    casts = [line for line in bert.splitlines() if "k_to_copy" in line]
    assert len(casts) == 2 and "attention_mask" in casts[0] and "select" in casts[1]
    gpt2 = _cuda_source("gpt2_small", batch=1, seq=16)
    assert gpt2.count("y_dtype=") == 25  # 24 blocks' norms and the final one
    # post-norm BERT never reads a residual sum (the norm's rows are the residual): not
    # written; pre-norm GPT-2 carries it to the next block, all but after the last one
    assert bert.count("keep_sum=False") == 25 and gpt2.count("keep_sum=False") == 1


def test_norms_and_element_wise_chains_run_as_triton_kernels():
    from tests.model_zoo import ZOO

    def source(name):
        model, inputs = ZOO[name]()
        graph = ds.compile(model.eval(), inputs, backend="cpu", precision="bf16").graph
        return generate_plan(graph, bind_inputs(graph, list(inputs)), "cuda").source

    llama = source("llama_gqa_tiny")  # 2 layers x 2 RMS norms + the final one
    assert llama.count("triton_rms_norm") == 5 and "k_mean" not in llama
    unet = source("unet_tiny")  # group norm: CUDA's kernel wants NCHW input
    assert unet.count("k_group_norm") == 10 and unet.count(".contiguous()") >= 10


def test_fp8_gemms_quantize_their_rows_in_one_triton_kernel():
    src = _cuda_source("bert_base", precision="fp8", batch=1, seq=16)
    # 12 layers x (Q/K/V merged, attention output, two FFN GEMMs) + the pooler
    assert src.count("fp8_linear") == 49 and "k_addmm" not in src and "_addmm_activation" not in src


def test_short_few_head_attention_runs_as_the_triton_kernel():
    # BERT at batch 1: 12 heads x 2 tiles of 64 queries would leave most SMs idle
    assert _cuda_source("bert_base", batch=1, seq=128).count("triton_attention") == 12
    # at batch 8 there are enough tiles: PyTorch's fused kernels
    big = _cuda_source("bert_base", batch=8, seq=128)
    assert "triton_attention" not in big and big.count("= k_scaled_dot_product_attention") == 12


def test_replayed_graph_leaves_its_boundary_casts_to_the_copies_in_and_out():
    import torch

    from deepseek.backends.cuda import strip_boundary_casts
    from deepseek.ir.interpreter import run_graph

    model, (x,) = BENCHMARK_MODELS["mnist_cnn"](batch=2)
    graph = ds.compile(model.eval(), (x,), backend="cpu", precision="bf16").graph
    stripped, in_dtypes, out_dtypes = strip_boundary_casts(graph)
    # float32 in and out of a bf16 graph: the cast in and the cast out go
    assert in_dtypes == [torch.bfloat16] and out_dtypes == [torch.float32]
    assert len(stripped.nodes) == len(graph.nodes) - 2 and len(graph.nodes) > 2
    assert [v.spec.dtype for v in stripped.inputs] == [torch.bfloat16]
    assert [v.spec.dtype for v in stripped.outputs] == [torch.bfloat16]
    x = torch.randn(2, 1, 28, 28)
    (want,) = run_graph(graph, [x])
    (got,) = run_graph(stripped, [x.to(torch.bfloat16)])
    torch.testing.assert_close(got.float(), want, rtol=0, atol=0)
    # a float32 graph has no casts at its boundary: nothing changes
    fp32 = ds.compile(model.eval(), (x,), backend="cpu").graph
    assert strip_boundary_casts(fp32) == (fp32, [None], [None])


def test_quantized_resnet_plan_runs_int8_kernels_and_matches_the_cpu_engine(monkeypatch):
    """A quantized ResNet-50's CUDA plan: the stem's convolution writes int8 for an int8
    max pool; every block end's convolution takes the residual
    add, ReLU and the next block's quantization into its int8 kernel's epilogue; the
    block's float output is written only where a float reader needs it, in float16 where
    those are later residual adds. The graph's quantize nodes run in one pass each. Run
    on CPU tensors (the Triton kernels under the interpreter, the other int8
    convolutions through the op's CPU kernel), it computes what the CPU engine computes
    up to the float16 residual stream's rounding (the kernel's arithmetic is checked
    exactly in test_triton_kernels; wiring errors here would be off by O(1))."""
    import torch

    from deepseek.numerics import rel_l2
    from deepseek.quantization import QuantConfig, Quantizer

    torch.manual_seed(0)
    model, inputs = BENCHMARK_MODELS["resnet50"](batch=1, image=32)
    calib = [[torch.randn_like(inputs[0])] for _ in range(2)]
    qm = Quantizer(QuantConfig(method="symmetric", progress=False)).quantize(model, calib)
    engine = ds.compile(qm, inputs, backend="cpu", precision="int8")
    plan = generate_plan(engine.graph, bind_inputs(engine.graph, list(inputs)), "cuda")
    lines = plan.source.splitlines()
    stem, *fused = [line for line in lines if "int8_conv" in line]
    # the stem writes its quantized output, max-pooled on the integers
    assert "quant=" in stem and stem.endswith("[1]")
    assert sum("max_pool_int8" in line for line in lines) == 1
    assert len(fused) == 16 and all("'relu', v_" in line for line in fused)
    # all but the last block's end write the next block's int8 input (its convolutions
    # and downsample read it); the float output: float16 for the 12 blocks followed by
    # an identity block, none before a downsample block (3), float32 at the end (pooled)
    quantized = [line for line in fused if line.split("=")[0].count(",") == 1]
    assert len(quantized) == 15
    dtypes = [plan.__globals__.get(line.split(", (")[0].rsplit(", ", 1)[1]) for line in quantized]
    assert dtypes.count(torch.float16) == 12 and dtypes.count(None) == 3
    assert "[0]" in fused[-1]
    assert not any("torch.mul(" in line and "round_" in line for line in lines)
    x = torch.randn_like(inputs[0])
    assert rel_l2(plan([x])[0], engine(x)) < 6e-2


def test_kernel_choices_on_disk_merge_and_survive_bad_files(tmp_path):
    """The int8 convolution's own choices (Triton or cuDNN, cuDNN's plan) kept on disk:
    two processes' tables merge into one file, a corrupt file reads as empty, and a cache
    that cannot be written keeps the choice for this process only."""
    import os

    from deepseek.backends.cuda.autotune import KernelChoices

    path = str(tmp_path / "autotune" / "gpu-int8_conv.json")
    a, b = KernelChoices(path), KernelChoices(path)
    assert a.get("conv 1") is None
    a.put("conv 1", {"kernel": "cudnn", "plan": 3})
    b.put("conv 2", {"kernel": "triton", "plan": None})  # b read nothing before: merged
    fresh = KernelChoices(path)
    assert fresh.get("conv 1") == {"kernel": "cudnn", "plan": 3}
    assert fresh.get("conv 2") == {"kernel": "triton", "plan": None}
    with open(path, "w") as f:
        f.write("{not json")
    assert KernelChoices(path).get("conv 1") is None
    with open(path, "w") as f:
        f.write('{"conv 1": "cudnn"}')  # not a record: ignored
    assert KernelChoices(path).get("conv 1") is None
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory would go")
    c = KernelChoices(str(blocked / "autotune" / "x.json"))
    c.put("conv 3", {"kernel": "triton", "plan": None})  # cannot be written: no error
    assert c.get("conv 3") == {"kernel": "triton", "plan": None}
    assert not os.path.exists(blocked / "autotune")


class _Tuner:
    """Answers every kernel choice with ``pick`` where it is a candidate (no measuring)."""

    def __init__(self, pick):
        self.pick, self.problems = pick, []

    def choose(self, problem, candidates, default):
        self.problems.append(problem)
        return self.pick if self.pick in candidates else default


@pytest.mark.parametrize("pick", ["triton", "aten"])
def test_float_max_pool_runs_the_kernel_the_tuner_chose(pick):
    model, inputs = BENCHMARK_MODELS["resnet50"](batch=1, image=64)
    graph = ds.compile(model.eval(), inputs, backend="cpu", precision="bf16").graph
    tuner = _Tuner(pick)
    src = generate_plan(graph, bind_inputs(graph, list(inputs)), "cuda", tuner=tuner).source
    assert any(p.startswith("max_pool2d x(1, 64, 32, 32) torch.bfloat16") for p in tuner.problems)
    assert ("= max_pool" in src) == (pick == "triton")
