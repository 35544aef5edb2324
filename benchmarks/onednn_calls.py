"""One oneDNN convolution or GEMM per call: PyTorch's op (``mkldnn._convolution_pointwise``,
``_linear_pointwise``: the primitive descriptor made again each call) against the same
computation as a primitive made once (``deepseek.backends.cpu.onednn``) on each oneDNN
runtime available (PyTorch's own, ``made_torch``, and the ``onednn`` extra's,
``made_extra``), per layer shape, interleaved rounds, medians.

    python -m benchmarks.onednn_calls --threads 2 [--dtype bf16] [--out F.json]
"""

from __future__ import annotations

import sys

import torch

from benchmarks import cpu_run_setup, save_json
from deepseek.backends.cpu import onednn
from deepseek.timing import time_interleaved

# (label, c_in, c_out, kernel, stride, image size, residual)
CONVS = [("tiny 1x1", 64, 64, 1, 1, 2, None),
         ("64->256 1x1 @56", 64, 256, 1, 1, 56, None),
         ("64->256 1x1 @56 + residual", 64, 256, 1, 1, 56, "add"),
         ("256->64 1x1 @56", 256, 64, 1, 1, 56, None),
         ("64->64 3x3 @56", 64, 64, 3, 1, 56, None),
         ("128->128 3x3/2 @56", 128, 128, 3, 2, 56, None),
         ("256->256 3x3/2 @28", 256, 256, 3, 2, 28, None),
         ("512->512 3x3/2 @14", 512, 512, 3, 2, 14, None),
         ("512->2048 1x1 @7 + residual", 512, 2048, 1, 1, 7, "add"),
         ("3->64 7x7/2 @224", 3, 64, 7, 2, 224, None)]
GEMMS = [("BERT qkv 128x768x2304", 128, 768, 2304), ("BERT ffn 128x768x3072", 128, 768, 3072),
         ("GEMV 1x768x768", 1, 768, 768)]


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])

    a, info = cpu_run_setup(__doc__, [], None, argv, extra)
    if not onednn.available():
        print("oneDNN not built (pip install 'deepseek[onednn]')", file=sys.stderr)
        return 1
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    rows = []
    for label, cin, cout, k, s, hw, res in CONVS:
        x = torch.randn(1, cin, hw, hw).to(dt).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(cout, cin, k, k).to(dt), torch.randn(cout).to(dt)
        p = [k // 2] * 2
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), p, [s, s], [1, 1], 1,
                                                            list(x.shape))
        made = {r: onednn.conv2d(w, b, (s, s), p, (1, 1), 1, x.shape, dt, "relu", res,
                                 choose=lambda c, r=r: r) for r in onednn.runtimes()}
        z = torch.randn(next(iter(made.values())).shape).to(dt).contiguous(
            memory_format=torch.channels_last)
        if res:
            contenders = {"pytorch": lambda: torch.ops.mkldnn._convolution_pointwise.binary(
                x, z, packed, b, p, [s, s], [1, 1], 1, "add", None, "relu", [], ""),
                **{f"made_{r}": (lambda k=k: k(x, z)) for r, k in made.items()}}
        else:
            contenders = {"pytorch": lambda: torch.ops.mkldnn._convolution_pointwise(
                x, packed, b, p, [s, s], [1, 1], 1, "relu", [], ""),
                **{f"made_{r}": (lambda k=k: k(x)) for r, k in made.items()}}
        rows.append({"layer": label, **time_interleaved(contenders, iters=200, warmup=20)})
    for label, m, kk, n in GEMMS:
        x, w, b = torch.randn(m, kk).to(dt), torch.randn(kk, n).to(dt), torch.randn(n).to(dt)
        packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), m)
        made = {r: onednn.linear(w, b, m, dt, choose=lambda c, r=r: r)
                for r in onednn.runtimes()}
        rows.append({"layer": label, **time_interleaved({
            "pytorch": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""),
            **{f"made_{r}": (lambda k=k: k(x)) for r, k in made.items()}},
            iters=200, warmup=20)})
    for row in rows:
        names = [k for k in row if k != "layer"]
        for k in names:
            row[f"{k}_us"] = row.pop(k) * 1e6
        print(f"{row['layer']:30s} " + "   ".join(
            f"{k} {row[k + '_us']:8.1f} us ({row['pytorch_us'] / row[k + '_us']:.2f}x)"
            for k in names))
    if a.out:
        save_json(a.out, {"machine": info, "dtype": a.dtype, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
