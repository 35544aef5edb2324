"""Profiling overhead on ResNet-50 (CPU): the profiled engine against the plain one.

Both run the very same generated plans (the profiled twin shares the plain
engine's kernels, packed weights and per-shape choices; only its partitions
are swapped for their instrumented twins), interleaved round-robin so load
drift hits both alike. The issue's bar: at most 10% slower. Run on a quiet
machine:

    python -m benchmarks.profiler_overhead --threads 2 --iters 30
    python -m benchmarks.profiler_overhead --iters 2 --warmup 1 --repeat 1 --image 64  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys

import torch

import deepseek as ds
from benchmarks.models import resnet50
from deepseek.timing import time_interleaved

BAR = 1.10  # profiled / plain


def twin_of(engine):
    """A second Engine over the same partitions' executables (so the same plans run)."""
    twin = copy.copy(engine)
    twin._parts = [copy.copy(p) for p in engine._parts]
    return twin


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=30, help="interleaved rounds (default 30)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs; the median ratio counts")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--kernels", action="store_true", help="also run torch.profiler (kernel mode)")
    p.add_argument("--out", help="write the result as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, (x,) = resnet50(batch=a.batch, image=a.image)
    engine = ds.compile(model, (x,), backend="cpu")
    engine(x)  # generate the plan for this shape once, shared by both
    twin = twin_of(engine)
    runs = []
    with ds.profile(twin, warmup=0, kernels=a.kernels) as prof:
        for _ in range(a.repeat):  # several interleaved runs: one run can catch a load spike
            runs.append(time_interleaved({"plain": lambda: engine(x),
                                          "profiled": lambda: twin(x)},
                                         iters=a.iters, warmup=a.warmup))
    ratios = sorted(r["profiled"] / r["plain"] for r in runs)
    ratio = statistics.median(ratios)
    times = {k: statistics.median(r[k] for r in runs) for k in ("plain", "profiled")}
    nodes = len(engine.graph.nodes)
    print(f"ResNet-50 batch {a.batch} {a.image}x{a.image}, {nodes} nodes, "
          f"{torch.get_num_threads()} threads, {a.repeat} x {a.iters} interleaved rounds")
    print(f"plain:    {times['plain'] * 1e3:9.3f} ms/call (median)")
    print(f"profiled: {times['profiled'] * 1e3:9.3f} ms/call (median)")
    print(f"overhead: {100 * (ratio - 1):+.2f}% (median of runs: "
          f"{', '.join(f'{100 * (r - 1):+.1f}%' for r in ratios)})  "
          f"({'within' if ratio <= BAR else 'OVER'} the {100 * (BAR - 1):.0f}% bar)")
    report = prof.report()
    top = ", ".join(f"%{h['name']} {h['share']:.1f}%" for h in report.hotspots[:5])
    print(f"profile: {report.meta['iterations']} calls recorded; hotspots: {top or 'none'}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": "resnet50", "batch": a.batch, "image": a.image,
                       "threads": torch.get_num_threads(), "iters": a.iters,
                       "plain_s": times["plain"], "profiled_s": times["profiled"],
                       "ratio": ratio, "ratios": ratios, "torch": torch.__version__,
                       "machine": platform.processor() or platform.machine()}, f, indent=1)
    return 0 if ratio <= BAR else 1


if __name__ == "__main__":
    sys.exit(main())
