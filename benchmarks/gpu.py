"""GPU benchmark: Deepseek's CUDA backend side by side with PyTorch, in one process.

Contenders (all bf16 weights and activations): eager PyTorch; eager replayed
as a hand-captured CUDA graph; torch.compile (default, and max-autotune with
--max-autotune); Deepseek (precision="bf16"). Each call is timed with CUDA
events; rounds interleave the contenders; medians after warm-up.

    python -m benchmarks.gpu --out benchmarks/results/gpu_h200.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

import deepseek as ds
from benchmarks import save_json
from benchmarks.models import BENCHMARK_MODELS

CASES = [  # (model, factory kwargs, items per call)
    ("resnet50", dict(batch=256, image=224), 256),
    ("resnet50", dict(batch=1, image=224), 1),
    ("bert_base", dict(batch=128, seq=128), 128),
    ("bert_base", dict(batch=1, seq=128), 1),
    ("mnist_cnn", dict(batch=1), 1),
]


def matmul_ceiling(n: int = 8192, iters: int = 20) -> float:
    """The measured bf16 GEMM rate of this GPU (TFLOP/s, median of ``iters`` n^3 GEMMs)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = time_cuda({"mm": lambda: a @ b}, iters)["mm"]
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def model_flops(engine, inputs) -> int:
    """FLOPs of one call of the compiled graph (deepseek.profiler.flops' estimates)."""
    from deepseek.ir.interpreter import bind_inputs
    from deepseek.profiler.flops import node_flops

    env = bind_inputs(engine.graph, list(inputs))
    return sum(node_flops(n, env) for n in engine.graph.nodes)


def _cuda_graph(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()

    def replay():
        g.replay()
        return out

    return replay


def time_cuda(contenders: dict, iters: int, warmup: int = 5) -> dict[str, float]:
    """Median milliseconds per call, CUDA events around each call, interleaved rounds."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    torch.cuda.synchronize()
    samples = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(iters):
        for k in names[r % len(names):] + names[:r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            contenders[k]()
            end.record()
            end.synchronize()
            samples[k].append(start.elapsed_time(end))
    return {k: statistics.median(v) for k, v in samples.items()}


def _first(x):
    from torch.utils._pytree import tree_leaves

    return tree_leaves(x)[0]


def bench(name, kwargs, items, iters, max_autotune, opt_level=2) -> dict:
    model, inputs = BENCHMARK_MODELS[name](**kwargs)
    model = model.cuda().to(torch.bfloat16).eval()
    inputs = tuple(x.cuda().to(torch.bfloat16) if x.is_floating_point() else x.cuda()
                   for x in inputs)
    fp32_model, _ = BENCHMARK_MODELS[name](**kwargs)
    fp32_model = fp32_model.cuda().eval()
    fp32_inputs = tuple(x.float() if x.is_floating_point() else x for x in inputs)

    @torch.no_grad()
    def eager():
        return model(*inputs)

    contenders = {"eager_bf16": eager, "eager_bf16_cudagraph": _cuda_graph(eager)}
    compile_s = {}
    for mode in ["default"] + (["max-autotune"] if max_autotune else []):
        t0 = time.perf_counter()
        # a copy per mode: two torch.compile wrappers of one module share dynamo's cache
        # and recompile on every alternation (seen: 394 ms per BERT call)
        compiled = torch.compile(copy.deepcopy(model), mode=None if mode == "default" else mode)
        with torch.no_grad():
            compiled(*inputs)
        torch.cuda.synchronize()
        compile_s[f"torch.compile_{mode}"] = time.perf_counter() - t0
        contenders[f"torch.compile_{mode}"] = (lambda c=compiled: c(*inputs))
    t0 = time.perf_counter()
    engine = ds.compile(fp32_model, fp32_inputs, backend="cuda", precision="bf16",
                        opt_level=opt_level)
    engine(*fp32_inputs)
    torch.cuda.synchronize()
    compile_s["deepseek"] = time.perf_counter() - t0
    contenders["deepseek_bf16"] = lambda: engine(*fp32_inputs)
    with torch.no_grad():
        ref = _first(fp32_model(*fp32_inputs)).float()
    err = {k: float((_first(fn()).float() - ref).norm() / ref.norm()) for k, fn in contenders.items()}
    ms = time_cuda(contenders, iters)
    return {"model": name, "config": kwargs, "median_ms": ms,
            "items_per_s": {k: items / (v / 1e3) for k, v in ms.items()},
            "deepseek_speedup_vs": {k: v / ms["deepseek_bf16"] for k, v in ms.items()},
            "deepseek_opt_level": opt_level,
            "flops_per_call": model_flops(engine, fp32_inputs),
            "rel_l2_vs_fp32": err, "compile_seconds": compile_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--max-autotune", action="store_true")
    p.add_argument("--opt-level", type=int, default=2, help="Deepseek's (3: measured kernel choices)")
    p.add_argument("--cases", default="all", help="comma-separated indices into CASES")
    p.add_argument("--ceiling", action="store_true",
                   help="also measure the bf16 GEMM rate and each case's fraction of it")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    idx = range(len(CASES)) if a.cases == "all" else [int(i) for i in a.cases.split(",")]
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "driver": os.popen(
                "nvidia-smi --query-gpu=driver_version --format=csv,noheader").read().strip()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if a.ceiling:
        info["bf16_matmul_tflops"] = matmul_ceiling()
    print(info)
    results = []
    for i in idx:
        name, kwargs, items = CASES[i]
        with torch.no_grad():  # every contender: torch.compile guards on grad mode, and with
            # grad on its graphs differ from the no-grad warm-up (seen: recompiles, 146 ms calls)
            r = bench(name, kwargs, items, a.iters, a.max_autotune, a.opt_level)
        if a.ceiling:
            r["tflops"] = {k: r["flops_per_call"] / (v / 1e3) / 1e12
                           for k, v in r["median_ms"].items()}
            r["fraction_of_bf16_ceiling"] = {k: v / info["bf16_matmul_tflops"]
                                             for k, v in r["tflops"].items()}
        results.append(r)
        print(f"\n{name} {kwargs}")
        for k, ms in r["median_ms"].items():
            print(f"  {k:<26} {ms:9.3f} ms  {r['items_per_s'][k]:10.1f}/s  "
                  f"deepseek {r['deepseek_speedup_vs'][k]:.2f}x  relL2 {r['rel_l2_vs_fp32'][k]:.1e}")
        sys.stdout.flush()
    if a.out:
        save_json(a.out, {"machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
