"""Deepseek's CPU backend vs ONNX Runtime on the same ONNX files, side by side in one run.

Each benchmark model is captured, exported to ONNX by Deepseek's exporter
(checked by onnx.checker), and that one file is run by both contenders:

* ``deepseek``: ``ds.compile("model.onnx", backend="cpu")`` (ONNX import, optimizer,
  generated CPU code), PyTorch limited to ``--threads`` intra-op threads;
* ``onnxruntime``: an ``InferenceSession`` on the file, ``intra_op_num_threads =
  --threads``, ``ORT_ENABLE_ALL`` graph optimizations.

Both get the same fresh random inputs; their outputs are compared (relative
L2) before timing; timing is interleaved round-robin with
``deepseek.timing.time_interleaved``. Results (medians and the ratio) go to
``benchmarks/results/onnx_vs_ort.json``. Run on a quiet machine:

    python -m benchmarks.onnx_vs_ort --threads 2
    python -m benchmarks.onnx_vs_ort --models mnist_cnn resnet50 --iters 3   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

from deepseek.numerics import fresh_like, rel_l2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "onnx_vs_ort.json")

CONFIGS = {  # factory kwargs, iterations
    "mnist_cnn": (dict(batch=1), 400),
    "resnet50": (dict(batch=1, image=224), 20),
    "bert_base": (dict(batch=1, seq=128), 30),
    "gpt2_small": (dict(batch=1, seq=128), 30),
}
SMALL = {"mnist_cnn": dict(batch=1), "resnet50": dict(batch=1, image=64),
         "bert_base": dict(batch=1, seq=16), "gpt2_small": dict(batch=1, seq=16)}


def bench_model(name: str, kwargs: dict, iters: int, threads: int, folder: str) -> dict:
    import onnxruntime as ort

    import deepseek as ds
    from benchmarks.models import BENCHMARK_MODELS
    from deepseek.frontend.onnx_export import export_onnx
    from deepseek.frontend.onnx_types import torch_to_numpy

    model, inputs = BENCHMARK_MODELS[name](**kwargs)
    t0 = time.perf_counter()
    graph = ds.capture(model, inputs)
    path = export_onnx(graph, os.path.join(folder, f"{name}.onnx"))
    export_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    engine = ds.compile(path, backend="cpu")
    import_s = time.perf_counter() - t0

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting between runs: spinning threads would steal the cores from the contender
    # timed next (interleaved timing), as in benchmarks/run.py
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    t0 = time.perf_counter()
    sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    ort_load_s = time.perf_counter() - t0

    x = fresh_like(inputs)
    feeds = {i.name: torch_to_numpy(t) for i, t in zip(sess.get_inputs(), x)}
    out_names = [o.name for o in sess.get_outputs()]
    with torch.no_grad():
        eager = model(*x)
    from torch.utils._pytree import tree_leaves

    eager0 = next(t for t in tree_leaves(eager) if isinstance(t, torch.Tensor))
    ds_out = engine(*x)
    ds0 = ds_out if isinstance(ds_out, torch.Tensor) else ds_out[0]
    ort0 = torch.from_numpy(sess.run(out_names, feeds)[0])
    check = {"deepseek_vs_eager": rel_l2(ds0, eager0), "onnxruntime_vs_eager": rel_l2(ort0, eager0),
             "deepseek_vs_onnxruntime": rel_l2(ds0, ort0)}

    def run_ds():
        engine(*x)

    def run_ort():
        sess.run(out_names, feeds)

    from deepseek.timing import time_interleaved

    times = time_interleaved({"deepseek": run_ds, "onnxruntime": run_ort}, iters=iters,
                             warmup=min(5, iters))
    return {
        "model": name, "config": kwargs, "iters": iters,
        "median_ms": {k: v * 1e3 for k, v in times.items()},
        "speedup_vs_onnxruntime": times["onnxruntime"] / times["deepseek"],
        "rel_l2": check,
        "onnx_bytes": os.path.getsize(path),
        "seconds": {"capture_and_export": export_s, "deepseek_import_and_compile": import_s,
                    "onnxruntime_session": ort_load_s},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of both contenders")
    p.add_argument("--iters", type=int, default=None, help="timing rounds (default: per model)")
    p.add_argument("--small", action="store_true", help="small model sizes (a smoke run)")
    p.add_argument("--out", default=OUT)
    a = p.parse_args(argv)
    import onnx
    import onnxruntime as ort

    torch.set_num_threads(a.threads)
    os.environ["DEEPSEEK_CPU_THREADS"] = str(a.threads)
    folder = tempfile.mkdtemp(prefix="onnx_vs_ort_")
    results = []
    for name in a.models:
        kwargs, iters = CONFIGS[name]
        if a.small:
            kwargs = SMALL[name]
        r = bench_model(name, kwargs, a.iters or iters, a.threads, folder)
        results.append(r)
        m = r["median_ms"]
        print(f"{name:12} deepseek {m['deepseek']:9.3f} ms   onnxruntime {m['onnxruntime']:9.3f} ms   "
              f"ratio {r['speedup_vs_onnxruntime']:.2f}x   rel L2 ds-vs-ort "
              f"{r['rel_l2']['deepseek_vs_onnxruntime']:.1e}", flush=True)
    doc = {"what": "Deepseek CPU backend vs ONNX Runtime on ONNX files exported by Deepseek",
           "threads": a.threads, "small": a.small,
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "cpus": os.cpu_count(), "python": sys.version.split()[0]},
           "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                        "onnxruntime": ort.__version__},
           "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
