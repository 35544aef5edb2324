"""The int8 linear kernel's CUDA path (torch._int_mm) against its reference, and its speed.

Run on a machine with an NVIDIA GPU (never in CI):

    python -m benchmarks.quant_cuda --out benchmarks/results/quantization_cuda.json
"""

from __future__ import annotations

import argparse
import json

import torch

import deepseek.ir.ops  # noqa: F401  (registers the deepseek_quant kernel ops)
from deepseek.quantization import kernels as K


def check(device: str) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for act, asym_w, post, out_dtype in [(torch.uint8, False, "none", None),
                                         (torch.int8, False, "relu", None),
                                         (torch.uint8, True, "none", torch.uint8),
                                         (torch.int8, True, "relu", torch.int8)]:
        lo, hi = (0, 256) if act == torch.uint8 else (-128, 128)
        x = torch.randint(lo, hi, (4, 16, 256), dtype=act, generator=g)
        w = torch.randint(-128, 128, (512, 256), dtype=torch.int8, generator=g)
        s = torch.rand(512, generator=g) * 0.01 + 1e-3
        z = torch.randint(-3, 4, (512,), dtype=torch.int32, generator=g) if asym_w else None
        b = torch.randn(512, generator=g)
        args = (x, 0.02, 7 if act == torch.uint8 else 0, w, s, z, b, post, 0.05,
                3 if out_dtype == torch.uint8 else 0, out_dtype)
        ref = K.reference_linear_int8(*args)
        on = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        out = torch.ops.deepseek_quant.linear_int8(*on).cpu()
        err = float((out.float() - ref.float()).abs().max())
        rows.append({"act": str(act), "asym_weight": asym_w, "post": post,
                     "out": str(out_dtype), "max_abs_err": err})
        print(rows[-1])
    return rows


def speed(device: str) -> dict:
    from torch.utils.benchmark import Timer

    res = {}
    for m, k, n in [(4096, 4096, 4096), (8192, 8192, 8192)]:
        x8 = torch.randint(0, 256, (m, k), dtype=torch.uint8, device=device)
        w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)
        s = torch.rand(n, device=device) * 0.01
        xb = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        wb = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        t_int8 = Timer("f(x8, 0.02, 128, w8, s, None, None, 'none', 1.0, 0, None)",
                       globals={"f": torch.ops.deepseek_quant.linear_int8, "x8": x8, "w8": w8,
                                "s": s}).blocked_autorange(min_run_time=1).median
        t_bf16 = Timer("torch.nn.functional.linear(xb, wb)", globals={"torch": torch, "xb": xb,
                       "wb": wb}).blocked_autorange(min_run_time=1).median
        flops = 2 * m * k * n
        res[f"{m}x{k}x{n}"] = {"int8_linear_ms": t_int8 * 1e3, "bf16_linear_ms": t_bf16 * 1e3,
                               "int8_tops": flops / t_int8 / 1e12,
                               "bf16_tflops": flops / t_bf16 / 1e12}
        print(res)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "check": check("cuda"), "speed": speed("cuda")}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
