"""int8 on the CPU at batch 1: ResNet-50 and BERT-base (seq 128), side by side.

Contenders, interleaved in one run: Deepseek fp32; Deepseek int8 (static PTQ,
uint8 activations and symmetric per-channel int8 weights, min-max calibration
on 8 random batches, compiled with ``precision="int8"``), and the same with
7-bit weights (``int8_w7``: what oneDNN's int8 kernels compute exactly on CPUs
without VNNI, where 8-bit weights run the float formula); for BERT also Deepseek
dynamic int8 (``calibration="dynamic"``: each token's row quantized at run time,
asymmetric, and ``_sym`` symmetric; symmetric per-channel weights), ONNX Runtime fp32 and ONNX
Runtime int8 (its dynamic quantization, ``quantize_dynamic``, of the same ONNX file
after ``quant_pre_process``, ONNX Runtime's documented first step: without it the
weights reach MatMul through Transpose nodes and ``quantize_dynamic`` leaves every
MatMul in float; the run checks that the int8 file has ``MatMulInteger`` nodes),
2 intra-op threads, and Deepseek int8 with mixed precision (``accuracy_budget``:
the most sensitive layers stay float until the outputs agree with fp32 within
relative L2 0.009; 7-bit weights without VNNI).
Agreement with fp32: relative L2 of the outputs on fresh random inputs.

    python -m benchmarks.quant_cpu --threads 2 --out benchmarks/results/quant_cpu.json
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

import deepseek as ds
from benchmarks import cpu_run_setup, print_case, save_json
from benchmarks.models import BENCHMARK_MODELS
from deepseek.numerics import rel_l2
from deepseek.quantization import QuantConfig, Quantizer
from deepseek.quantization.kernels import native_int8
from deepseek.timing import time_interleaved

CASES = {"resnet50": dict(batch=1, image=224), "bert_base": dict(batch=1, seq=128)}
MIXED_BUDGET = 0.009  # relative L2 against fp32 that the mixed-precision variant keeps to


def _first(x):
    from torch.utils._pytree import tree_leaves

    return tree_leaves(x)[0]


def _fresh(inputs: tuple, vocab: int | None) -> tuple:
    """New random token ids (the attention mask kept), or new random images."""
    if vocab:
        return (torch.randint(0, vocab, inputs[0].shape), *inputs[1:])
    return tuple(torch.randn_like(x) for x in inputs)


def _ort_sessions(model, inputs, threads: int) -> dict:
    try:
        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        return {}
    from deepseek.frontend.onnx_export import export_onnx

    folder = tempfile.mkdtemp()
    fp32 = export_onnx(ds.capture(model, inputs), os.path.join(folder, "model.onnx"))
    pre, int8 = (os.path.join(folder, f) for f in ("model_pre.onnx", "model_int8.onnx"))
    quant_pre_process(fp32, pre)
    quantize_dynamic(pre, int8, weight_type=QuantType.QInt8)
    integer = sum(n.op_type == "MatMulInteger" for n in onnx.load(int8).graph.node)
    if not integer:
        raise RuntimeError("ONNX Runtime's quantize_dynamic quantized no MatMul of the file: "
                           "its int8 column would time a float model")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    out = {}
    for label, path in (("onnxruntime_fp32", fp32), ("onnxruntime_int8", int8)):
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        out[label] = (lambda s, n: lambda xs: torch.from_numpy(
            s.run(None, {k: x.numpy() for k, x in zip(n, xs)})[0]))(sess, names)
    return out


def bench(name: str, threads: int, iters: int, mixed: bool) -> dict:
    model, inputs = BENCHMARK_MODELS[name](**CASES[name])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    calib = [_fresh(inputs, vocab) for _ in range(8)]
    runs = {"deepseek_fp32": ds.compile(model, inputs, backend="cpu")}
    for label, bits in (("deepseek_int8", 8), ("deepseek_int8_w7", 7)):
        config = QuantConfig(weight_bits=bits, method="asymmetric", weight_method="symmetric",
                             progress=False)
        runs[label] = ds.compile(Quantizer(config).quantize(model, calib), inputs, backend="cpu",
                                 precision="int8")
    if name == "bert_base":  # Linear layers only: what dynamic quantization covers
        for label, method in (("deepseek_int8_dynamic", "asymmetric"),
                              ("deepseek_int8_dynamic_sym", "symmetric")):
            config = QuantConfig(calibration="dynamic", method=method, weight_method="symmetric",
                                 progress=False)
            runs[label] = ds.compile(Quantizer(config).quantize(model), inputs, backend="cpu",
                                     precision="int8")
    mixed_bits = 8 if native_int8() else 7  # the weights this CPU's int8 kernels take
    if mixed:  # mixed precision: the most sensitive layers stay float until the outputs
        # agree with fp32 within MIXED_BUDGET (relative L2, on two held-out batches)
        held_out = [_fresh(inputs, vocab) for _ in range(2)]
        with torch.no_grad():
            refs = [_first(model(*x)) for x in held_out]

        def agreement(m) -> float:  # higher is better, as the quantizer's eval_fn wants
            with torch.no_grad():
                return -max(rel_l2(_first(m(*x)), r) for x, r in zip(held_out, refs))

        q = Quantizer(QuantConfig(weight_bits=mixed_bits, method="asymmetric",
                                  weight_method="symmetric", accuracy_budget=MIXED_BUDGET,
                                  progress=False))
        runs["deepseek_int8_mixed"] = ds.compile(q.quantize(model, calib, eval_fn=agreement),
                                                 inputs, backend="cpu", precision="int8")
        kept_float = q.report.kept_float
    runners = {k: (lambda e: lambda xs: e(*xs))(e) for k, e in runs.items()}
    if name == "bert_base":
        runners.update(_ort_sessions(model, inputs, threads))
    x = _fresh(inputs, vocab)
    with torch.no_grad():
        ref = _first(model(*x))
    agreement = {k: rel_l2(_first(fn(x)), ref) for k, fn in runners.items()}
    times = time_interleaved({k: (lambda f: lambda: f(inputs))(f) for k, f in runners.items()},
                             iters=iters, warmup=3)
    extra = {"int8_mixed_kept_float": kept_float, "int8_mixed_weight_bits": mixed_bits} \
        if mixed else {}
    return {"model": name, "config": CASES[name], "iters": iters, **extra,
            "median_ms": {k: v * 1e3 for k, v in times.items()},
            "speedup_vs_deepseek_fp32": {k: times["deepseek_fp32"] / v for k, v in times.items()},
            "rel_l2_vs_fp32_eager": agreement}


def main(argv=None) -> int:
    a, info = cpu_run_setup(__doc__, list(CASES), 20, argv)
    results = []
    for name in a.models.split(","):
        r = bench(name, a.threads, a.iters, mixed=name == "bert_base")
        results.append(r)
        print_case(f"{name} {r['config']}  (median ms, speed-up vs Deepseek fp32, rel L2 vs fp32)",
                   r["median_ms"], r["speedup_vs_deepseek_fp32"], r["rel_l2_vs_fp32_eager"])
    if a.out:
        save_json(a.out, {"machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
