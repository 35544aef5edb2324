"""Side-by-side CPU benchmark: eager PyTorch, torch.compile, ONNX Runtime, OpenVINO, Deepseek.

OpenVINO and Deepseek also run in bf16 (``openvino_bf16``, ``deepseek_bf16``:
matmul-class ops in bf16) on CPUs with native bf16 kernels (AVX-512/AMX; elsewhere
both would run float32); their relative L2 against eager float32 is reported.

All contenders run in this one process on the same inputs, interleaved
round-robin (so drift hits all alike); the medians and the ratios against
eager are printed and written as JSON. Run on a quiet machine:

    python -m benchmarks.run --threads 2 --out benchmarks/results/cpu.json
    python -m benchmarks.run --models mnist_cnn --iters 500
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Callable

import torch

import deepseek as ds
from deepseek.backends.cpu import native_precisions
from benchmarks import cpu_run_setup, print_case, save_json
from benchmarks.models import BENCHMARK_MODELS
from deepseek.numerics import rel_l2
from deepseek.timing import time_interleaved

CONFIGS = {  # (factory kwargs, iterations)
    "mnist_cnn": (dict(batch=1), 400),
    "resnet50": (dict(batch=1, image=224), 20),
    "bert_base": (dict(batch=1, seq=128), 30),
    "gpt2_small": (dict(batch=1, seq=128), 30),
}


def _first(x):
    from torch.utils._pytree import tree_leaves

    return tree_leaves(x)[0]


def _onnxruntime(model, inputs, threads: int) -> Callable | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    names = [f"input{i}" for i in range(len(inputs))]
    try:
        torch.onnx.export(model, inputs, path, input_names=names, opset_version=17, dynamo=False)
    except Exception as e:  # torch's exporter fails on some transformers models: use ours
        print(f"  onnxruntime: torch.onnx.export failed ({type(e).__name__}: {str(e)[:80]}); "
              "running ORT on Deepseek's ONNX export of the captured graph")
        from deepseek.frontend.onnx_export import export_onnx

        export_onnx(ds.capture(model, inputs), path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting between runs: spinning threads would steal the cores from the
    # contender timed next (interleaved timing)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feeds = {n: x.numpy() for n, x in zip([i.name for i in sess.get_inputs()], inputs)}
    return lambda: torch.from_numpy(sess.run(None, feeds)[0])


def _openvino(model, inputs, threads: int) -> dict[str, Callable]:
    """OpenVINO in float32 and in bf16 (its default on CPUs with AVX512-BF16/AMX),
    latency hint, ``threads`` inference threads; {} when it is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return {}
    try:
        converted = ov.convert_model(model, example_input=inputs)
    except Exception as e:  # the converter is OpenVINO's: report and go on
        print(f"  openvino: conversion failed ({type(e).__name__}: {str(e)[:120]})")
        return {}
    out = {}
    precisions = [("openvino", "f32")] + [("openvino_bf16", "bf16")] * ("bf16" in native_precisions())
    for label, precision in precisions:
        compiled = ov.compile_model(converted, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": precision})
        out[label] = (lambda c: lambda: torch.from_numpy(c(list(inputs))[0]))(compiled)
    return out


def bench_model(name: str, threads: int, iters: int | None, skip: set[str]) -> dict:
    kwargs, default_iters = CONFIGS[name]
    iters = iters or default_iters
    model, inputs = BENCHMARK_MODELS[name](**kwargs)
    with torch.no_grad():
        ref = _first(model(*inputs))

    def eager():
        with torch.no_grad():
            return model(*inputs)

    contenders: dict[str, Callable] = {"eager": eager}
    compile_s = {}
    t0 = time.perf_counter()
    engine = ds.compile(model, inputs, backend="cpu")
    engine(*inputs)  # builds the plan (and its autotuning) for this shape
    compile_s["deepseek"] = time.perf_counter() - t0
    contenders["deepseek"] = lambda: engine(*inputs)
    if "torch.compile" not in skip:
        t0 = time.perf_counter()
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(*inputs)
        compile_s["torch.compile"] = time.perf_counter() - t0

        def inductor():
            with torch.no_grad():
                return compiled(*inputs)

        contenders["torch.compile"] = inductor
    if "onnxruntime" not in skip:
        fn = _onnxruntime(model, inputs, threads)
        if fn is not None:
            contenders["onnxruntime"] = fn
    if "openvino" not in skip:
        contenders.update(_openvino(model, inputs, threads))
    if "deepseek_bf16" not in skip and "bf16" in native_precisions():
        engine_bf16 = ds.compile(model, inputs, backend="cpu", precision="bf16")
        engine_bf16(*inputs)
        contenders["deepseek_bf16"] = lambda: engine_bf16(*inputs)
    errors = {k: rel_l2(_first(fn()), ref) for k, fn in contenders.items()}
    times = time_interleaved(contenders, iters=iters, warmup=3)
    return {
        "model": name, "config": kwargs, "iters": iters,
        "median_ms": {k: v * 1e3 for k, v in times.items()},
        "speedup_vs_eager": {k: times["eager"] / v for k, v in times.items()},
        "deepseek_vs": {k: v / times["deepseek"] for k, v in times.items() if k != "deepseek"},
        "rel_l2_vs_eager": errors,
        "compile_seconds": compile_s,
    }


def main(argv=None) -> int:
    def skip(p):
        p.add_argument("--skip", default="",
                       help="contenders to skip, e.g. torch.compile,openvino,deepseek_bf16")

    a, info = cpu_run_setup(__doc__, list(CONFIGS), None, argv, skip)
    results = []
    for name in a.models.split(","):
        r = bench_model(name, a.threads, a.iters, set(filter(None, a.skip.split(","))))
        results.append(r)
        print_case(f"{name} {r['config']}  (median ms, speed-up vs eager, rel L2 vs eager)",
                   r["median_ms"], r["speedup_vs_eager"], r["rel_l2_vs_eager"])
    if a.out:
        save_json(a.out, {"machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
