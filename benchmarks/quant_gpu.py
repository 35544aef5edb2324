"""int8 ResNet-50 on a GPU: Deepseek's int8 engine (a calibrated QDQ model whose
convolutions run as the Triton implicit-GEMM int8 kernel or cuDNN's, whichever agrees
and measures faster per call signature) against Deepseek bf16 (``--without-pass``: also
with one of its passes off), in one process: CUDA events, interleaved rounds, medians
after warm-up; top-1 agreement of each with eager float32 on fresh random images
(logits re-centered: ``benchmarks.quant_agreement``).

Run on a machine with an NVIDIA GPU (never in CI):

    python -m benchmarks.quant_gpu --out benchmarks/results/quant_gpu_h200.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import deepseek as ds
from benchmarks import machine, save_json
from benchmarks.gpu import time_cuda
from benchmarks.models import BENCHMARK_MODELS
from benchmarks.quant_agreement import top1_agreement
from deepseek.quantization import QuantConfig, Quantizer

CONFIGS = {  # activations: int8 (symmetric) or uint8 with a zero point; weights symmetric
    "deepseek_int8": dict(method="symmetric"),
    "deepseek_uint8_zp": dict(method="asymmetric", weight_method="symmetric"),
}


LAYERS = [  # ResNet-50's convolutions at batch 256: (c_in, c_out, kernel, stride, input size)
    (64, 64, 1, 1, 56), (64, 64, 3, 1, 56), (64, 256, 1, 1, 56), (256, 64, 1, 1, 56),
    (128, 128, 3, 1, 28), (512, 128, 1, 1, 28), (256, 256, 3, 1, 14), (1024, 256, 1, 1, 14),
    (512, 512, 3, 1, 7), (512, 2048, 1, 1, 7), (3, 64, 7, 2, 224)]


def kernel_choices() -> dict[str, int]:
    """How many int8 convolution call signatures chose each kernel (Triton's or cuDNN's)."""
    from collections import Counter

    from deepseek.backends.cuda.triton_int8 import Conv2dInt8
    from deepseek.quantization.kernels import _CACHE

    return dict(Counter(choice for _, _, built in _CACHE.values() for obj in built.values()
                        if isinstance(obj, Conv2dInt8) for choice in obj.choices.values()))


def layers(batch: int, iters: int) -> list[dict]:
    """Each layer alone: the int8 kernels (int8 in, + bias + ReLU, int8 out: Triton's, and
    cuDNN's where ``nvidia-cudnn-frontend`` is installed and builds it) against cuDNN's
    bf16 convolution + bias + ReLU on channels-last tensors."""
    from deepseek.backends.cuda.cudnn_int8 import frontend
    from deepseek.backends.cuda.triton_int8 import Conv2dInt8

    rows = []
    for cin, cout, k, s, size in LAYERS:
        x = torch.randn(batch, cin, size, size, device="cuda").contiguous(
            memory_format=torch.channels_last)
        w = torch.randn(cout, cin, k, k, device="cuda")
        b = torch.randn(cout, device="cuda")
        xq = (x * 20).clamp(-128, 127).to(torch.int8)
        wq = (w * 20).clamp(-128, 127).to(torch.int8)
        xb, wb, bb = (t.to(torch.bfloat16) for t in (x, w.contiguous(
            memory_format=torch.channels_last), b))
        contenders = {"bf16_cudnn": lambda: torch.cudnn_convolution_relu(
            xb, wb, bb, (s, s), (k // 2, k // 2), (1, 1), 1)}
        for kernel in ("triton", "cudnn") if frontend() is not None else ("triton",):
            conv = Conv2dInt8(wq, torch.full((cout,), 0.01, device="cuda"), 0.05, b, (s, s),
                              (k // 2, k // 2), (1, 1))
            conv.prefer = kernel
            conv(xq, 0, "relu", quant=(0.1, 0, torch.int8))
            if set(conv.choices.values()) == {kernel}:  # cuDNN may build no plan for it
                contenders[f"int8_{kernel}"] = (
                    lambda c=conv: c(xq, 0, "relu", quant=(0.1, 0, torch.int8)))
        ms = time_cuda(contenders, iters)
        size_out = (size + 2 * (k // 2) - k) // s + 1
        tops = 2 * batch * size_out ** 2 * cout * cin * k * k / 1e9
        row = {"layer": f"{cin}->{cout} {k}x{k}/{s} @{size}", "bf16_tflops":
               tops / ms["bf16_cudnn"], **{f"{n}_ms": v for n, v in ms.items()}}
        for n in ms:
            if n.startswith("int8"):
                row[f"{n}_speedup"] = ms["bf16_cudnn"] / ms[n]
                row[f"{n}_tops"] = tops / ms[n]
        rows.append(row)
        print(f"{row['layer']:24s} bf16 {ms['bf16_cudnn']:.3f} ms "
              f"({row['bf16_tflops']:.0f} TFLOP/s)" + "".join(
                  f"  {n} {v:.3f} ms ({row[n + '_tops']:.0f} TOP/s, "
                  f"{row[n + '_speedup']:.2f}x)" for n, v in ms.items() if n != "bf16_cudnn"),
              flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--calibration", type=int, default=8, help="batches of 16 images")
    p.add_argument("--agreement", type=int, default=4, help="batches checked for top-1")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--profile", action="store_true", help="print the first int8 engine's profile")
    p.add_argument("--layers", action="store_true", help="also time ResNet-50's layers alone")
    p.add_argument("--without-pass", action="append", default=[], metavar="PASS",
                   help="also time Deepseek bf16 with this pass off (repeatable)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model, (x,) = BENCHMARK_MODELS["resnet50"](batch=a.batch)
    model = model.eval()
    # calibrated on the CPU (observers keep their statistics there), then moved
    calib = [[torch.randn(16, *x.shape[1:])] for _ in range(a.calibration)]
    quantized = {name: Quantizer(QuantConfig(progress=False, **CONFIGS[name]))
                 .quantize(model, calib).cuda() for name in a.configs.split(",")}
    model, x = model.cuda(), x.cuda()
    engines, compile_s = {}, {}
    t0 = time.perf_counter()
    engines["deepseek_bf16"] = ds.compile(model, [x], backend="cuda", precision="bf16")
    engines["deepseek_bf16"](x)
    compile_s["deepseek_bf16"] = time.perf_counter() - t0
    for name in a.without_pass:  # ablation: the bf16 engine with one pass off
        t0 = time.perf_counter()
        label = f"deepseek_bf16_without_{name}"
        engines[label] = ds.compile(model, [x], backend="cuda", precision="bf16",
                                    disable_passes=[name])
        engines[label](x)
        compile_s[label] = time.perf_counter() - t0
    for name, qm in quantized.items():
        t0 = time.perf_counter()
        engines[name] = ds.compile(qm, [x], backend="cuda", precision="int8")
        engines[name](x)  # autotunes the kernels and captures the CUDA graph
        compile_s[name] = time.perf_counter() - t0
        print(f"{name}: compiled in {compile_s[name]:.1f} s", flush=True)
    choices = kernel_choices()
    print(f"int8 convolutions by kernel (per call signature): {choices}", flush=True)
    agree, classes = top1_agreement(model, engines, lambda: torch.randn_like(x), a.agreement)
    ms = time_cuda({k: (lambda e=e: e(x)) for k, e in engines.items()}, a.iters)
    base = ms["deepseek_bf16"]
    rows = {k: {"ms": v, "images_per_s": a.batch / v * 1e3, "speedup_vs_bf16": base / v,
                "top1_agreement_vs_fp32": agree[k], "compile_s": compile_s[k],
                "distinct_top1_classes": classes}
            for k, v in ms.items()}
    for k, r in rows.items():
        print(f"{k:20s} {r['ms']:8.3f} ms  {r['images_per_s']:9.0f} img/s  "
              f"{r['speedup_vs_bf16']:.2f}x bf16  "
              f"top-1 agreement {r['top1_agreement_vs_fp32']:.4f}")
    layer_rows = layers(a.batch, a.iters) if a.layers else []
    if a.profile:
        engine = engines[next(iter(quantized))]
        with ds.profile(engine) as prof:
            for _ in range(5):
                engine(x)
        prof.report().print(top=30)
    if a.out:
        import triton

        save_json(a.out, {"machine": machine(), "gpu": torch.cuda.get_device_name(),
                          "triton": triton.__version__,
                          "batch": a.batch, "results": rows, "layers": layer_rows,
                          "int8_conv_kernels": choices})
    return 0


if __name__ == "__main__":
    sys.exit(main())
