"""Top-1 agreement of int8 engines with float32, on the CPU.

- ``efficientnet_lite0``: the trained ImageNet EfficientNet-Lite0 on random crops
  of the two photographs that ship with scikit-learn (a temple, a flower),
  resized to 224x224: a model and inputs whose top-1 class varies.
- ``resnet50``: the random-weight benchmark ResNet-50 on random images. Random
  weights make every input predict one class (a fixed direction dominates the
  logits), so its logits are re-centered by the float model's mean logit vector
  over a separate batch (the same network with its classifier bias moved).

The number of distinct float32 classes is reported beside the agreement.

    python -m benchmarks.quant_agreement --model efficientnet_lite0
    python -m benchmarks.quant_agreement --model resnet50
    python -m benchmarks.quant_agreement --calibration mse --accuracy-budget 0.01
"""

from __future__ import annotations

import argparse
import sys

import torch

import deepseek as ds
from benchmarks.models import BENCHMARK_MODELS, efficientnet_lite0
from deepseek.quantization import QuantConfig, Quantizer


def top1_agreement(model, engines: dict, make_input, batches: int,
                   center: bool = True) -> tuple[dict, int]:
    """({name: top-1 agreement with ``model``}, distinct reference classes); ``center``:
    on logits less the float model's mean logits over one more batch."""
    agree, n, classes = {k: 0 for k in engines}, 0, set()
    with torch.no_grad():
        shift = model(make_input()).float().mean(0) if center else 0.0
        for _ in range(batches):
            x = make_input()
            want = (model(x).float() - shift).argmax(-1)
            for k, e in engines.items():
                agree[k] += int(((e(x).float() - shift).argmax(-1) == want).sum())
            n += want.numel()
            classes |= set(want.tolist())
    return {k: v / n for k, v in agree.items()}, len(classes)


def photo_crops(batch: int, seed: int = 0):
    """A function returning ``batch`` random crops (120-420 pixels, resized to 224) of
    scikit-learn's sample photographs, ImageNet-normalized."""
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255
              for im in load_sample_images().images]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    g = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=g))

    def crops():
        out = []
        for _ in range(batch):
            im = photos[draw(0, len(photos))]
            s = draw(120, 420)
            y, x = draw(0, im.shape[1] - s), draw(0, im.shape[2] - s)
            c = torch.nn.functional.interpolate(im[None, :, y:y + s, x:x + s], size=224,
                                                mode="bilinear", align_corners=False)[0]
            out.append((c - mean) / std)
        return torch.stack(out)

    return crops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="efficientnet_lite0", choices=["efficientnet_lite0",
                                                                     "resnet50"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--accuracy-budget", type=float,
                   help="mixed precision: the largest drop of top-1 agreement on two held-out "
                        "batches (the most sensitive layers stay float)")
    p.add_argument("--calibration", default="minmax",
                   choices=["minmax", "percentile", "entropy", "mse"])
    p.add_argument("--configs", default="int8_symmetric,int8_uint8_zp",
                   help="which of int8_symmetric, int8_uint8_zp to run")
    p.add_argument("--bias-correction", action="store_true",
                   help="QuantConfig(bias_correction=True): each layer's mean output shift "
                        "on the calibration data added back to its bias")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    if a.model == "efficientnet_lite0":
        model, (x,) = efficientnet_lite0(a.batch)
        make_input, calibrate, center = photo_crops(a.batch), photo_crops(a.batch, 1), False
    else:
        model, (x,) = BENCHMARK_MODELS[a.model](batch=a.batch)
        make_input = calibrate = lambda: torch.randn_like(x)  # noqa: E731
        center = True
    calib = [[calibrate()] for _ in range(8)]
    held_out = [calibrate() for _ in range(2)]  # the mixed-precision search's data

    def eval_fn(m) -> float:  # top-1 agreement with float32 on the held-out batches
        with torch.no_grad():
            return sum(float((m(h).argmax(-1) == model(h).argmax(-1)).float().mean())
                       for h in held_out) / len(held_out)

    engines = {}
    configs = {"int8_symmetric": dict(method="symmetric"),
               "int8_uint8_zp": dict(method="asymmetric", weight_method="symmetric")}
    for name in a.configs.split(","):
        config = configs[name]
        qm = Quantizer(QuantConfig(progress=False, calibration=a.calibration,
                                   accuracy_budget=a.accuracy_budget,
                                   bias_correction=a.bias_correction, **config)) \
            .quantize(model, calib, eval_fn=eval_fn if a.accuracy_budget is not None else None)
        engines[name] = ds.compile(qm, [x], backend="cpu", precision="int8")
    agreement, classes = top1_agreement(model, engines, make_input, a.batches, center)
    for k, v in agreement.items():
        print(f"{a.model} {k:16s} {a.calibration:10s}{' +bias' if a.bias_correction else ''} "
              f"top-1 agreement {v:.3f} ({a.batches * a.batch} inputs, "
              f"{classes} distinct float32 classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
