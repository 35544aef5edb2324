"""Top-1 agreement of int8 engines with float32 on random inputs, on the CPU.

Random weights make every input predict one class (a fixed direction dominates
the logits), so raw top-1 agreement is 100% for any engine. Logits are
re-centered by the float model's mean logit vector over a separate batch (the
same network with its classifier bias moved), whose top-1 class varies with the
input; the number of distinct classes is reported beside the agreement.

    python -m benchmarks.quant_agreement --model resnet50
    python -m benchmarks.quant_agreement --model resnet50 --recalibrate-bn
"""

from __future__ import annotations

import argparse
import sys

import torch

import deepseek as ds
from benchmarks.models import BENCHMARK_MODELS
from deepseek.quantization import QuantConfig, Quantizer


def top1_agreement(model, engines: dict, make_input, batches: int) -> tuple[dict, int]:
    """({name: agreement with ``model`` on re-centered logits}, distinct reference classes)."""
    agree, n, classes = {k: 0 for k in engines}, 0, set()
    with torch.no_grad():
        center = model(make_input()).float().mean(0)
        for _ in range(batches):
            x = make_input()
            want = (model(x).float() - center).argmax(-1)
            for k, e in engines.items():
                agree[k] += int(((e(x).float() - center).argmax(-1) == want).sum())
            n += want.numel()
            classes |= set(want.tolist())
    return {k: v / n for k, v in agree.items()}, len(classes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet50", choices=["resnet50", "mnist_cnn"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="re-estimate batch-norm statistics on random inputs first")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model, (x,) = BENCHMARK_MODELS[a.model](batch=a.batch)

    def make_input():
        return torch.randn(a.batch, *x.shape[1:])

    if a.recalibrate_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches below
        model.train()
        with torch.no_grad():
            for _ in range(4):
                model(make_input())
    model.eval()
    calib = [[make_input()] for _ in range(8)]
    engines = {}
    for name, config in (("int8_symmetric", dict(method="symmetric")),
                         ("int8_uint8_zp", dict(method="asymmetric", weight_method="symmetric"))):
        qm = Quantizer(QuantConfig(progress=False, **config)).quantize(model, calib)
        engines[name] = ds.compile(qm, [x], backend="cpu", precision="int8")
    agreement, classes = top1_agreement(model, engines, make_input, a.batches)
    for k, v in agreement.items():
        print(f"{k:16s} top-1 agreement {v:.3f} ({a.batches * a.batch} inputs, "
              f"{classes} distinct float32 classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
