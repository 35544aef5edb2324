"""``deepseek quantize``: quantize a model, compile it to integer kernels, save a .dsk."""

from __future__ import annotations

import importlib
import json
import os
import tempfile

import torch

from deepseek.errors import DeepseekError
from deepseek.quantization.config import CALIBRATIONS

EXAMPLE = ("deepseek quantize mnist_cnn -o mnist_int8.dsk --method symmetric "
           "--calibration entropy\n"
           "  deepseek quantize mypkg.models:make_model -o m.dsk --calib-data mypkg.data:batches\n"
           "  deepseek quantize bert_base -o bert_dyn.dsk --calibration dynamic\n"
           "  deepseek quantize mypkg.llm:make -o w4.dsk --weight-bits 4 --activation-bits none "
           "--granularity per_group --group-size 64")


def _bits(text: str):
    return None if text.lower() in ("none", "0") else int(text)


def register(command) -> None:
    s = command("quantize", cmd_quantize, "quantize a model (PTQ), compile it to int8 kernels and "
                "save a .dsk", EXAMPLE)
    s.add_argument("model", help="built-in example name or package.module:factory")
    s.add_argument("-o", "--output", required=True, help="the .dsk file to write")
    s.add_argument("--method", default="asymmetric", choices=["asymmetric", "symmetric"])
    s.add_argument("--weight-method", default=None, choices=["asymmetric", "symmetric"],
                   help="weights' method when it differs from --method (symmetric is fastest "
                        "on CPU)")
    s.add_argument("--granularity", default="per_channel",
                   choices=["per_tensor", "per_channel", "per_group"])
    s.add_argument("--group-size", type=int, default=128)
    s.add_argument("--calibration", default="minmax", choices=list(CALIBRATIONS),
                   help="how activation ranges are found; 'dynamic': per row at run time "
                        "(Linear layers; no calibration data)")
    s.add_argument("--weight-bits", type=int, default=8)
    s.add_argument("--activation-bits", type=_bits, default=8,
                   help="bits of activations, or 'none' for weight-only quantization")
    s.add_argument("--skip", action="append", default=[], help="module-name pattern left in float")
    s.add_argument("--embeddings", action="store_true",
                   help="quantize nn.Embedding tables too (weight-only, a scale per row)")
    s.add_argument("--batch", type=int, default=None, help="batch size of the example inputs")
    s.add_argument("--calib-data", default=None, help="package.module:function returning an "
                   "iterable of input batches (default: random inputs like the example, which "
                   "only suits a smoke test)")
    s.add_argument("--calib-batches", type=int, default=8)
    s.add_argument("--report", default=None, help="write the quantization report (JSON) here")


def _calibration_batches(spec: str | None, example: tuple, n: int):
    if spec:
        module, _, name = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), name)()
        except (ImportError, AttributeError, ValueError) as e:
            raise DeepseekError(f"cannot load calibration data {spec!r}: {e}") from None
    gen = torch.Generator().manual_seed(0)

    def like(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return torch.randn(t.shape, generator=gen, dtype=t.dtype)
        return t

    return [tuple(like(t) for t in example) for _ in range(n)]


def cmd_quantize(a) -> int:
    import deepseek as ds
    from deepseek.cli import load_model
    from deepseek.quantization import QuantConfig, Quantizer

    config = QuantConfig(weight_bits=a.weight_bits, activation_bits=a.activation_bits,
                         method=a.method, weight_method=a.weight_method,
                         granularity=a.granularity, group_size=a.group_size,
                         calibration=a.calibration, skip=a.skip, embeddings=a.embeddings)
    model, inputs = load_model(a.model, a.batch)
    static = config.activation_bits is not None and not config.dynamic
    calib = _calibration_batches(a.calib_data, inputs, a.calib_batches) if static else None
    quantizer = Quantizer(config)
    qmodel = quantizer.quantize(model, calib)
    engine = ds.compile(qmodel, inputs, precision="int8")
    engine.save(a.output)
    with tempfile.TemporaryDirectory() as d:
        ds.compile(model, inputs).save(os.path.join(d, "fp32.dsk"))
        fp32 = os.path.getsize(os.path.join(d, "fp32.dsk"))
    size = os.path.getsize(a.output)
    with torch.no_grad():
        ref = model.eval()(*inputs)
        out = engine(*inputs)
    ref, out = (x if isinstance(x, torch.Tensor) else x[0] for x in (ref, out))
    err = float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12))
    print(quantizer.report)
    print(f"wrote {a.output}: {size / 1e6:.2f} MB ({size / fp32:.2f}x the fp32 engine's "
          f"{fp32 / 1e6:.2f} MB); relative error against fp32 on the example: {err:.4f}")
    if a.report:
        with open(a.report, "w") as f:
            json.dump({"config": config.to_dict(), "report": quantizer.report.to_dict(),
                       "bytes": size, "fp32_bytes": fp32, "relative_error": err}, f, indent=1)
    return 0
