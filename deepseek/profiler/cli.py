"""deepseek-profiler: profile a model on a backend and say what to fix.

MODEL is a ``.dsk`` file, an ``.onnx`` file, a built-in example name
(``mnist_cnn``) or ``package.module:factory`` returning ``(model,
example_inputs)``. The model runs ``--warmup`` calls (left out) and then
``--iters`` measured calls; the operator table is printed and, with
``--out DIR``, DIR/trace.json (Chrome trace: chrome://tracing or
ui.perfetto.dev), DIR/report.json and DIR/report.html are written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from deepseek.api import PRECISIONS
from deepseek.errors import DeepseekError

EXAMPLES = """examples:
  deepseek-profiler mnist_cnn --iters 50 --out prof/
  deepseek-profiler benchmarks.models:resnet50 --input-shape 1,3,224,224 --backend cpu --out prof/
  deepseek-profiler benchmarks.models:bert_base --input-shape 128,128 --input-shape 128,128 \
      --backend cuda --precision bf16 --out prof/
  deepseek-profiler model.dsk --dim batch=8 --iters 20 --out prof/
  deepseek-profiler --compare before/report.json after/report.json
"""


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape wants sizes like 1,3,224,224; got {text!r}")
    if not dims or min(dims) < 0:
        raise argparse.ArgumentTypeError(f"--input-shape wants sizes like 1,3,224,224; got {text!r}")
    return dims


def _random_like(shape, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    return torch.randint(1, 100, shape, dtype=dtype)


def _engine_and_inputs(a) -> tuple[object, list[torch.Tensor], str]:
    import deepseek as ds
    from deepseek.cli import _parse_dims, load_model, random_inputs

    shapes = a.input_shape or []
    path = a.model
    if path.endswith((".dsk", ".onnx")):
        if not os.path.exists(path):
            raise DeepseekError(f"no such file: {path}")
        if path.endswith(".dsk"):
            engine = ds.load(path, backend=a.backend)
        else:
            try:
                engine = ds.compile(path, backend=a.backend, opt_level=a.opt_level,
                                    precision=a.precision, disable_passes=a.disable_pass or ())
            except ImportError as e:
                raise DeepseekError(f"ONNX import is not available in this installation ({e}); "
                                    "compile the model with PyTorch and save a .dsk") from None
        if shapes:
            if len(shapes) != len(engine.graph.inputs):
                raise DeepseekError(f"{path} takes {len(engine.graph.inputs)} inputs; give "
                                    f"--input-shape once per input ({len(shapes)} given)")
            inputs = [_random_like(s, v.spec.dtype) for s, v in zip(shapes, engine.graph.inputs)]
        else:
            inputs = random_inputs(engine, _parse_dims(a.dim))
        return engine, inputs, os.path.basename(path)
    if os.getcwd() not in sys.path:  # package.module:factory from the current directory,
        sys.path.insert(0, os.getcwd())  # as `python -m` would find it
    model, example = load_model(path)
    tensors = [x for x in example if isinstance(x, torch.Tensor)]
    if shapes:
        if len(shapes) != len(tensors):
            raise DeepseekError(f"{path} takes {len(tensors)} tensor inputs; give --input-shape "
                                f"once per input ({len(shapes)} given)")
        new = iter(_random_like(s, t.dtype) for s, t in zip(shapes, tensors))
        example = tuple(next(new) if isinstance(x, torch.Tensor) else x for x in example)
    engine = ds.compile(model, example, backend=a.backend, opt_level=a.opt_level,
                        precision=a.precision, disable_passes=a.disable_pass or ())
    inputs = [x for x in example if isinstance(x, torch.Tensor)]
    return engine, inputs, path


def profile_command(a) -> int:
    import deepseek as ds

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    engine, inputs, name = _engine_and_inputs(a)
    with ds.profile(engine, warmup=a.warmup, kernels=a.kernels or None,
                    hotspot_share=a.hotspot, name=name) as prof:
        for _ in range(a.warmup + a.iters):
            engine.run_flat(inputs)  # looked up inside the block, where the profile hooks it
    report = prof.report()
    report.print(top=a.top)
    if a.out:
        paths = report.save(a.out)
        print(f"wrote {paths['trace']} (open in ui.perfetto.dev or chrome://tracing), "
              f"{paths['report']}, {paths['html']}")
    return 0


def compare_command(a) -> int:
    from deepseek.profiler.compare import compare, load_report
    from deepseek.profiler.console import print_compare

    before, after = (load_report(p) for p in a.compare)
    diff = compare(before, after)
    print_compare(diff, top=a.top)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "compare.json"), "w") as f:
            json.dump(diff, f, indent=1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepseek-profiler", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help=".dsk, .onnx, example name or package.module:factory")
    p.add_argument("--input-shape", action="append", type=_shape, metavar="SHAPE",
                   help="sizes of one input, e.g. 1,3,224,224 (once per input, in order)")
    p.add_argument("--dim", action="append", help="NAME=SIZE for a symbolic dim (.dsk/.onnx)")
    p.add_argument("--backend", default="auto", help="cpu, cuda, a plug-in, or auto (default)")
    p.add_argument("--iters", type=int, default=20, help="measured calls (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="calls left out first (default 2)")
    p.add_argument("--out", help="directory for trace.json, report.json and report.html")
    p.add_argument("--opt-level", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="as ds.compile's (a .dsk keeps the precision it was saved with)")
    p.add_argument("--disable-pass", action="append", metavar="NAME",
                   help="compile without this pass (e.g. fuse_conv_bn), to see its effect")
    p.add_argument("--threads", type=int, help="PyTorch intra-op threads")
    p.add_argument("--kernels", action="store_true",
                   help="also capture kernels per node with torch.profiler (on by default on GPUs)")
    p.add_argument("--hotspot", type=float, default=5.0, help="hotspot share in %% (default 5)")
    p.add_argument("--top", type=int, default=25, help="rows of the printed table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                   help="compare two report.json files per operator instead of profiling")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not a.compare and not a.model:
        parser.error("give a MODEL to profile, or --compare BEFORE AFTER")
    if a.iters < 1 or a.warmup < 0:
        parser.error("--iters must be 1 or more and --warmup 0 or more")
    try:
        return compare_command(a) if a.compare else profile_command(a)
    except DeepseekError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
