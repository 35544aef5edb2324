"""Benchmarks: side-by-side timings of Deepseek and its peers (see BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Callable


def print_case(title: str, median_ms: dict, ratios: dict, extra: dict,
               extra_format: str = "{:.1e}") -> None:
    """One model's result: a line per contender (median ms, a ratio, one more figure)."""
    print(f"\n{title}")
    for k, ms in median_ms.items():
        print(f"  {k:<22} {ms:9.3f} ms  {ratios[k]:5.2f}x  {extra_format.format(extra[k])}")
    sys.stdout.flush()


def save_json(path: str, doc: dict) -> None:
    """Write a results document (machine, versions, results) as indented JSON."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


def machine() -> dict:
    """The CPU, versions of the contenders' libraries and the load when a run starts."""
    import torch

    import deepseek as ds

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "deepseek": ds.__version__}
    for mod in ("onnxruntime", "openvino"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
            "versions": versions}


def cpu_run_setup(description: str, models: list[str], iters: int | None, argv=None,
                  more: Callable[[argparse.ArgumentParser], None] | None = None):
    """Parse a CPU runner's command line (--models, --threads, --iters, --out and ``more``),
    set the thread count for PyTorch and Deepseek, and print the machine; returns
    (args, machine info)."""
    import torch

    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(models))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument("--out", default=None, help="write results as JSON here")
    if more is not None:
        more(p)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ["DEEPSEEK_CPU_THREADS"] = str(a.threads)
    info = machine()
    info["threads"] = a.threads
    print(f"machine: {info['cpu']}, {a.threads} threads, load {info['load_avg_at_start']}")
    return a, info
