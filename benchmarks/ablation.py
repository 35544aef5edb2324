"""What each optimizer pass contributes: the opt-level-2 pipeline with one pass off at a time.

For each benchmark model (CPU, batch 1), the full pipeline, each pass
disabled in turn (``ds.compile(..., disable_passes=[name])``) and no passes
at all (``opt_level=0``) are compiled and timed side by side in interleaved
rounds; the table gives each variant's latency relative to the full
pipeline (above 1.00: slower without that pass) and the bytes its kernels
move. Passes that change nothing on a model show ratios within noise.

    python -m benchmarks.ablation --threads 2 --out benchmarks/results/ablation.json
"""

from __future__ import annotations

import sys


import deepseek as ds
from benchmarks import cpu_run_setup, print_case, save_json
from benchmarks.models import BENCHMARK_MODELS
from benchmarks.run import CONFIGS
from deepseek.passes import PIPELINES
from deepseek.timing import time_interleaved


def pass_names() -> list[str]:
    names: list[str] = []
    for p in PIPELINES[2]:
        if p.__name__ not in names:
            names.append(p.__name__)
    return names


def bench_model(name: str, iters: int | None) -> dict:
    kwargs, default_iters = CONFIGS[name]
    model, inputs = BENCHMARK_MODELS[name](**kwargs)
    variants = {"full": {}, "no passes": {"opt_level": 0}}
    variants.update({f"-{p}": {"disable_passes": [p]} for p in pass_names()})
    engines, moved = {}, {}
    for label, options in variants.items():
        engine = ds.compile(model, inputs, backend="cpu", **options)
        engine(*inputs)  # the plan and its kernel choices for this shape
        engines[label] = engine
        moved[label] = engine.report().to_dict()["bytes_moved"]["optimized"]
    times = time_interleaved({k: (lambda e: lambda: e(*inputs))(e) for k, e in engines.items()},
                             iters=max(5, (iters or default_iters) // 2), warmup=2)
    return {"model": name, "config": kwargs,
            "median_ms": {k: v * 1e3 for k, v in times.items()},
            "time_vs_full": {k: v / times["full"] for k, v in times.items()},
            "bytes_moved": moved}


def main(argv=None) -> int:
    a, info = cpu_run_setup(__doc__, list(CONFIGS), None, argv)
    results = []
    for name in a.models.split(","):
        r = bench_model(name, a.iters)
        results.append(r)
        print_case(f"{name} {r['config']}  (median ms, time vs full pipeline, MB moved)",
                   r["median_ms"], r["time_vs_full"],
                   {k: b / 1e6 for k, b in r["bytes_moved"].items()}, "{:9.1f}")
    if a.out:
        save_json(a.out, {"machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
