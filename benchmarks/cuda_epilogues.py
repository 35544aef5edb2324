"""Why the CUDA backend fuses epilogues into cuDNN/cuBLASLt calls: kernel timings (bf16).

ResNet-50's convolution shapes at batch 256 (channels-last): PyTorch's
convolution with bias, without, + ReLU, + residual add + ReLU, against cuDNN's
fused ``cudnn_convolution_relu`` / ``cudnn_convolution_add_relu`` (with their
errors against the unfused result); BERT-base's GEMM shapes at batch 128 x 128:
mm, addmm (bias epilogue), + GELU as a separate kernel, against cuBLASLt's GELU
epilogue (``_addmm_activation``). CUDA events, medians of 30 calls.

    python -m benchmarks.cuda_epilogues --out benchmarks/results/cuda_epilogues_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

F = torch.nn.functional
# (in channels, out channels, kernel, stride, input size): ResNet-50's convolutions
CONVS = [(3, 64, 7, 2, 224), (64, 64, 1, 1, 56), (64, 64, 3, 1, 56), (64, 256, 1, 1, 56),
         (128, 128, 3, 1, 28), (128, 512, 1, 1, 28), (256, 256, 3, 1, 14), (256, 1024, 1, 1, 14),
         (512, 512, 3, 1, 7), (512, 2048, 1, 1, 7), (1024, 256, 1, 1, 14)]
GEMMS = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # BERT-base's (K, N)


def _ms(fn, iters: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).norm() / ref.norm())


def conv_case(cin, cout, k, s, hw, batch, dtype=torch.bfloat16) -> dict:
    cl = torch.channels_last
    x = torch.randn(batch, cin, hw, hw, device="cuda", dtype=dtype).contiguous(memory_format=cl)
    w = (torch.randn(cout, cin, k, k, device="cuda", dtype=dtype) * 0.05).contiguous(memory_format=cl)
    b = torch.randn(cout, device="cuda", dtype=dtype)
    geo = ([s, s], [k // 2, k // 2], [1, 1])

    def conv(bias):
        return torch.convolution(x, w, bias, *geo, False, [0, 0], 1)

    y = conv(b)
    z = torch.randn_like(y)
    return {
        "conv_bias": _ms(lambda: conv(b)), "conv_nobias": _ms(lambda: conv(None)),
        "conv_bias_relu": _ms(lambda: torch.relu_(conv(b))),
        "conv_bias_add_relu": _ms(lambda: torch.relu_(conv(b).add_(z))),
        "cudnn_relu": _ms(lambda: torch.cudnn_convolution_relu(x, w, b, *geo, 1)),
        "cudnn_add_relu": _ms(lambda: torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, *geo, 1)),
        "cudnn_relu_err": _rel(torch.cudnn_convolution_relu(x, w, b, *geo, 1), torch.relu(y.float())),
        "cudnn_add_relu_err": _rel(torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, *geo, 1),
                                   torch.relu(y.float() + z.float())),
    }


def gemm_case(m, k, n, dtype=torch.bfloat16) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(k, n, device="cuda", dtype=dtype) * 0.03
    b = torch.randn(n, device="cuda", dtype=dtype)
    ref = F.gelu(torch.addmm(b, x, w).float(), approximate="tanh")
    r = {
        "mm": _ms(lambda: torch.mm(x, w)), "addmm": _ms(lambda: torch.addmm(b, x, w)),
        "addmm_gelu_erf_separate": _ms(lambda: F.gelu(torch.addmm(b, x, w))),
        "addmm_gelu_tanh_separate": _ms(lambda: F.gelu(torch.addmm(b, x, w), approximate="tanh")),
        "addmm_activation_gelu": _ms(lambda: torch._addmm_activation(b, x, w, use_gelu=True)),
        "addmm_activation_relu": _ms(lambda: torch._addmm_activation(b, x, w)),
        "addmm_activation_gelu_err_vs_tanh": _rel(torch._addmm_activation(b, x, w, use_gelu=True), ref),
    }
    r["addmm_tflops"] = 2 * m * k * n / r["addmm"] / 1e9
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="ResNet-50 batch")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    results = {}
    for cin, cout, k, s, hw in CONVS:
        results[f"conv {cin}->{cout} k{k} s{s} {hw}"] = conv_case(cin, cout, k, s, hw, a.batch)
    for k, n in GEMMS:
        results[f"gemm {128 * 128}x{k}x{n}"] = gemm_case(128 * 128, k, n)
    for name, r in results.items():
        print(name, {key: round(v, 4) for key, v in r.items()})
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
