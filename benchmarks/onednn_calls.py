"""One oneDNN convolution or GEMM per call: PyTorch's op (``mkldnn._convolution_pointwise``,
``_linear_pointwise``: the primitive descriptor made again each call) against the same
computation as a primitive made once (``deepseek.backends.cpu.onednn``), per layer shape,
interleaved rounds, medians.

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
        made = onednn.conv2d(w, b, (s, s), p, (1, 1), 1, x.shape, dt, "relu", res)
        z = torch.randn(made.shape).to(dt).contiguous(memory_format=torch.channels_last)
        if res:
            contenders = {"pytorch": lambda: torch.ops.mkldnn._convolution_pointwise.binary(
                x, z, packed, b, p, [s, s], [1, 1], 1, "add", None, "relu", [], ""),
                "made_once": lambda: made(x, z)}
        else:
            contenders = {"pytorch": lambda: torch.ops.mkldnn._convolution_pointwise(
                x, packed, b, p, [s, s], [1, 1], 1, "relu", [], ""),
                "made_once": lambda: made(x)}
        rows.append({"layer": label, **time_interleaved(contenders, iters=200, warmup=20)})
    for label, m, kk, n in GEMMS:
        x, w, b = torch.randn(m, kk).to(dt), torch.randn(kk, n).to(dt), torch.randn(n).to(dt)
        packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), m)
        made = onednn.linear(w, b, m, dt)
        rows.append({"layer": label, **time_interleaved({
            "pytorch": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""),
            "made_once": lambda: made(x)}, iters=200, warmup=20)})
    for r in rows:
        r["pytorch_us"], r["made_once_us"] = r.pop("pytorch") * 1e6, r.pop("made_once") * 1e6
        print(f"{r['layer']:30s} pytorch {r['pytorch_us']:8.1f} us   made once "
              f"{r['made_once_us']:8.1f} us   {r['pytorch_us'] / r['made_once_us']:.2f}x")
    if a.out:
        save_json(a.out, {"machine": info, "dtype": a.dtype, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
