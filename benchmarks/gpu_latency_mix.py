"""Batch-1 GPU latency with and without other PyTorch work between calls.

``benchmarks.gpu`` interleaves its contenders round-robin (so drift hits all
alike); for a model of a few microseconds of GPU work, the host-side Python of
each call then runs with caches that the eager contenders' calls just
displaced, and the GPU waits for it. This times Deepseek's engine against the
hand-captured CUDA graph of eager PyTorch, first alone, then with the eager
model (and a torch.compile'd one) called between every two calls:

    python -m benchmarks.gpu_latency_mix --model mnist_cnn
"""

from __future__ import annotations

import argparse

import torch

import deepseek as ds
from benchmarks.gpu import _cuda_graph, time_cuda
from benchmarks.models import BENCHMARK_MODELS


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="mnist_cnn")
    p.add_argument("--iters", type=int, default=300)
    a = p.parse_args(argv)
    model, inputs = BENCHMARK_MODELS[a.model](batch=1)
    bf16 = model.cuda().to(torch.bfloat16).eval()
    xs = tuple(x.cuda().to(torch.bfloat16) if x.is_floating_point() else x.cuda() for x in inputs)
    fp32_model, _ = BENCHMARK_MODELS[a.model](batch=1)
    x32 = tuple(x.float() if x.is_floating_point() else x for x in xs)
    with torch.no_grad():
        engine = ds.compile(fp32_model.cuda().eval(), x32, backend="cuda", precision="bf16")
        engine(*x32)

        def eager():
            return bf16(*xs)

        pair = {"deepseek_bf16": lambda: engine(*x32), "eager_bf16_cudagraph": _cuda_graph(eager)}
        print("alone:", time_cuda(pair, a.iters))
        compiled = torch.compile(bf16)
        compiled(*xs)
        mixed = dict(pair, eager_bf16=eager, **{"torch.compile": lambda: compiled(*xs)})
        print("with eager and torch.compile calls between:", time_cuda(mixed, a.iters))


if __name__ == "__main__":
    main()
