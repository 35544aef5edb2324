"""Compile time, cold and warm: Deepseek and torch.compile, each start in a fresh process.

For each model, in this order, every step a new Python process (imports not counted):

- ``deepseek cold``: ``ds.compile(model, inputs, backend=..., precision=...)`` and the first
  call, with empty kernel caches (``DEEPSEEK_CACHE_DIR`` and ``TRITON_CACHE_DIR`` fresh);
- ``deepseek warm``: the same with the caches the cold run left;
- ``deepseek load``: ``ds.load(saved.dsk, backend=...)`` and the first call (caches warm):
  what a server does when it restarts;
- ``torch.compile cold`` / ``warm``: ``torch.compile(model)`` (default mode) and the first
  call, with a fresh and then the same ``TORCHINDUCTOR_CACHE_DIR``/``TRITON_CACHE_DIR``.

    python -m benchmarks.compile_time --device cuda --out benchmarks/results/compile_time_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MODELS = {  # name -> factory kwargs (batch 1, the latency case a restarted server sees first)
    "mnist_cnn": dict(batch=1),
    "resnet50": dict(batch=1, image=224),
    "bert_base": dict(batch=1, seq=128),
    "gpt2_small": dict(batch=1, seq=128),
}
STEPS = ["deepseek_cold", "deepseek_warm", "deepseek_load", "torch.compile_cold",
         "torch.compile_warm"]


def _model(name: str, device: str, precision: str):
    import torch

    from benchmarks.models import BENCHMARK_MODELS

    model, inputs = BENCHMARK_MODELS[name](**MODELS[name])
    model = model.to(device).eval()
    return model, tuple(x.to(device) for x in inputs), torch


def worker(step: str, name: str, device: str, precision: str, artifact: str) -> float:
    """Seconds from the start of compilation to the end of the first call, in this process."""
    import deepseek as ds

    model, inputs, torch = _model(name, device, precision)
    backend = "cuda" if device == "cuda" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        if step == "torch.compile_cold" or step == "torch.compile_warm":
            if precision == "bf16":
                model = model.to(torch.bfloat16)
                inputs = tuple(x.to(torch.bfloat16) if x.is_floating_point() else x
                               for x in inputs)
            t0 = time.perf_counter()
            torch.compile(model)(*inputs)
        elif step == "deepseek_load":
            t0 = time.perf_counter()
            ds.load(artifact, backend=backend)(*inputs)
        else:
            t0 = time.perf_counter()
            engine = ds.compile(model, inputs, backend=backend, precision=precision)
            engine(*inputs)
            sync()
            seconds = time.perf_counter() - t0
            if step == "deepseek_cold":
                engine.save(artifact)
            return seconds
        sync()
        return time.perf_counter() - t0


def run(names, device: str, precision: str, step_timeout: float, out: str | None,
        info: dict, steps=STEPS) -> list[dict]:
    """Every step of every model; a step over ``step_timeout`` seconds is recorded as None
    and the rest go on. The results are written to ``out`` after each step."""
    from benchmarks import save_json

    results = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, DEEPSEEK_CACHE_DIR=os.path.join(tmp, "ds"),
                       TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
                       TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))
            row = {"model": name, "config": MODELS[name], "seconds": {}}
            results.append(row)
            for step in steps:
                if step == "torch.compile_cold":  # its own fresh Triton cache, not Deepseek's
                    env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton_inductor")
                cmd = [sys.executable, "-m", "benchmarks.compile_time", "--worker", step,
                       "--models", name, "--device", device, "--precision", precision,
                       "--artifact", os.path.join(tmp, f"{name}.dsk")]
                try:
                    p = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                       timeout=step_timeout)
                except subprocess.TimeoutExpired:
                    row["seconds"][step] = None
                    print(f"{name:<11} {step:<20} over {step_timeout:.0f} s", flush=True)
                else:
                    if p.returncode != 0:
                        raise RuntimeError(f"{step} {name} failed:\n{p.stderr[-3000:]}")
                    row["seconds"][step] = float(p.stdout.strip().splitlines()[-1])
                    print(f"{name:<11} {step:<20} {row['seconds'][step]:8.2f} s", flush=True)
                if out:
                    save_json(out, {"machine": info, "results": results})
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--precision", default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default=None, help="JSON results, rewritten after each step")
    p.add_argument("--step-timeout", type=float, default=600.0,
                   help="seconds one step may take; a slower one is recorded as null")
    p.add_argument("--steps", default=",".join(STEPS),
                   help="comma-separated steps to run, in this order (default: all)")
    p.add_argument("--worker", default=None, choices=STEPS, help=argparse.SUPPRESS)
    p.add_argument("--artifact", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    precision = a.precision or ("bf16" if a.device == "cuda" else "fp32")
    names = a.models.split(",")
    if a.worker:
        print(worker(a.worker, names[0], a.device, precision, a.artifact))
        return 0
    import torch

    info = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
            "torch": torch.__version__, "precision": precision}
    steps = a.steps.split(",")
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {STEPS}")
    run(names, a.device, precision, a.step_timeout, a.out, info, steps)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
