"""Memory accounting of the four reference models before and after the optimizer.

For each model (fp32, the CPU pipeline at opt_level 2) the compile report's
figures for the captured graph ("unoptimized") and the optimized one: the
bytes all kernels read and write, the peak of live intermediate and output
storage, the arena the planner lays all intermediates out in, and the sum of
all intermediate buffers (one buffer per tensor, no reuse). No timing.

    python -m benchmarks.memory --out benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse

import torch

import deepseek as ds
from benchmarks import machine, save_json
from benchmarks.models import BENCHMARK_MODELS

CASES = [  # (model, factory kwargs)
    ("mnist_cnn", dict(batch=1)),
    ("resnet50", dict(batch=1, image=224)),
    ("bert_base", dict(batch=1, seq=128)),
    ("gpt2_small", dict(batch=1, seq=128)),
    ("gpt2_small", dict(batch=4, seq=128)),
]


def account(name: str, kwargs: dict) -> dict:
    model, inputs = BENCHMARK_MODELS[name](**kwargs)
    report = ds.compile(model, inputs, backend="cpu").report().to_dict()
    row = {"model": name, "config": kwargs, "nodes": report["nodes"]}
    for stage in ("unoptimized", "optimized"):
        mem = report["memory"][stage]
        row[stage] = {"bytes_moved": report["bytes_moved"][stage],
                      "peak_memory_bytes": report["peak_memory_bytes"][stage],
                      "arena_bytes": mem["arena_bytes"], "total_bytes": mem["total_bytes"]}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write results as JSON here")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    mb = 1e6
    print(f"{'model':<22}{'stage':<13}{'bytes moved':>14}{'peak':>10}{'arena':>10}{'sum':>10}  (MB)")
    for name, kwargs in CASES:
        row = account(name, kwargs)
        rows.append(row)
        label = f"{name} b{kwargs['batch']}"
        for stage in ("unoptimized", "optimized"):
            r = row[stage]
            print(f"{label:<22}{stage:<13}{r['bytes_moved'] / mb:14.1f}"
                  f"{r['peak_memory_bytes'] / mb:10.1f}{r['arena_bytes'] / mb:10.1f}"
                  f"{r['total_bytes'] / mb:10.1f}")
    if a.out:
        save_json(a.out, {"what": "compile-report memory accounting, CPU, fp32",
                          "machine": machine(), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
