"""The ``deepseek`` command: demo, compile, export, run, info, bench.

A MODEL argument is one of: a built-in example name (``mnist_cnn``), a
``package.module:factory`` whose factory returns ``(model, example_inputs)``
(your own code, imported as Python would), a ``.onnx`` file, or a ``.dsk`` file.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from typing import Any

import torch

from deepseek.errors import DeepseekError
from deepseek.numerics import rel_l2

EXAMPLES_TEXT = {
    "demo": "deepseek demo --batch 1",
    "compile": "deepseek compile mnist_cnn -o mnist.dsk --dynamic-batch\n"
               "  deepseek compile mypkg.models:make_model -o model.dsk --backend cpu",
    "run": "deepseek run mnist.dsk --dim batch=4",
    "info": "deepseek info mnist.dsk --graph\n  deepseek info mnist.dsk --memory --dim batch=8",
    "bench": "deepseek bench mnist_cnn --batch 1 --iters 200 --threads 2",
    "export": "deepseek export mnist_cnn --onnx mnist.onnx --dynamic-batch\n"
              "  deepseek export mnist.dsk --onnx mnist.onnx --opset 18",
}


def _factory(spec: str):
    from deepseek.examples import EXAMPLES

    if spec in EXAMPLES:
        return EXAMPLES[spec]
    if ":" not in spec:
        raise DeepseekError(f"unknown model {spec!r}: give a built-in example "
                            f"({', '.join(EXAMPLES)}), package.module:factory, or a .dsk file")
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise DeepseekError(f"cannot import {spec!r}: {e}") from None


def load_model(spec: str, batch: int | None = None) -> tuple[torch.nn.Module, tuple]:
    """(model, example_inputs) from a MODEL argument that names Python code."""
    factory = _factory(spec)
    result = factory(batch) if batch is not None else factory()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise DeepseekError(f"{spec} must return (model, example_inputs)")
    model, inputs = result
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def random_inputs(engine, dims: dict[str, int], int_high: int = 100) -> list[torch.Tensor]:
    """Fresh random tensors matching an engine's input specs (symbols from ``dims``)."""
    out = []
    for v in engine.graph.inputs:
        try:
            shape = v.spec.concrete(dims)
        except DeepseekError:
            raise DeepseekError(f"input {v.name} has symbolic shape {v.spec}; give its sizes with "
                                "--dim NAME=SIZE") from None
        if v.spec.dtype.is_floating_point:
            out.append(torch.randn(shape, dtype=v.spec.dtype))
        elif v.spec.dtype == torch.bool:
            out.append(torch.rand(shape) > 0.5)
        else:
            out.append(torch.randint(0, int_high, shape, dtype=v.spec.dtype))
    return out


def _parse_dims(items: list[str]) -> dict[str, int]:
    dims = {}
    for item in items or []:
        name, _, size = item.partition("=")
        if not size.isdigit():
            raise DeepseekError(f"--dim wants NAME=SIZE, got {item!r}")
        dims[name] = int(size)
    return dims


def _first_tensor(x: Any) -> torch.Tensor:
    from torch.utils._pytree import tree_leaves

    return next(t for t in tree_leaves(x) if isinstance(t, torch.Tensor))


def _compare(model, engine, model_name: str, batch: int, iters: int) -> int:
    from deepseek.timing import time_interleaved

    _, inputs = load_model(model_name, batch)
    with torch.no_grad():
        ref = _first_tensor(model(*inputs))
    got = _first_tensor(engine(*inputs))
    err = rel_l2(got, ref)
    print(f"check vs eager PyTorch on fresh random inputs: relative L2 error {err:.2e} "
          f"({'OK' if err < 1e-4 else 'MISMATCH'})")

    def eager():
        with torch.no_grad():
            model(*inputs)

    times = time_interleaved({"eager": eager, "deepseek": lambda: engine(*inputs)}, iters=iters)
    print(f"eager PyTorch: {times['eager'] * 1e6:9.1f} us/call (median of {iters})")
    print(f"Deepseek:      {times['deepseek'] * 1e6:9.1f} us/call")
    print(f"speed-up:      {times['eager'] / times['deepseek']:.2f}x "
          f"({torch.get_num_threads()} threads)")
    return 0 if err < 1e-4 else 1


def cmd_demo(a) -> int:
    import deepseek as ds

    if a.threads:
        torch.set_num_threads(a.threads)
    model, inputs = load_model("mnist_cnn", a.batch)
    print(f"Compiling the bundled MNIST CNN (batch {a.batch}) for the CPU backend...")
    engine = ds.compile(model, inputs, backend="cpu", dynamic_dims={0: {0: "batch"}} if a.batch > 1
                        else None)
    print(engine.report())
    return _compare(model, engine, "mnist_cnn", a.batch, a.iters)


def _onnx_dynamic_batch(path: str) -> dict:
    """dynamic_dims making dim 0 of every (non-scalar) input of an ONNX file symbolic."""
    from deepseek.frontend.onnx_import import load_model_proto

    proto = load_model_proto(path)
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    return {k: {0: "batch"} for k, i in enumerate(inputs) if len(i.type.tensor_type.shape.dim)}


def _compile_any(a):
    """An Engine for a MODEL argument (.onnx file, built-in example or package.module:factory)."""
    import deepseek as ds

    if a.model.endswith(".onnx"):
        dyn = _onnx_dynamic_batch(a.model) if a.dynamic_batch else None
        return ds.compile(a.model, backend=a.backend, opt_level=a.opt_level, dynamic_dims=dyn)
    model, inputs = load_model(a.model, a.batch)
    dyn = {i: {0: "batch"} for i, x in enumerate(inputs)
           if isinstance(x, torch.Tensor) and x.dim() > 0} if a.dynamic_batch else None
    return ds.compile(model, inputs, backend=a.backend, opt_level=a.opt_level,
                      dynamic_dims=dyn, strict=a.strict)


def cmd_compile(a) -> int:
    engine = _compile_any(a)
    engine.save(a.output)
    print(engine.report())
    print(f"saved {a.output}")
    return 0


def cmd_run(a) -> int:
    import deepseek as ds

    torch.manual_seed(a.seed)
    engine = ds.load(a.model, backend=a.backend)
    inputs = random_inputs(engine, _parse_dims(a.dim))
    flat = engine.run_flat(inputs)
    for v, t in zip(engine.graph.outputs, flat):
        print(f"{v.name}: shape {tuple(t.shape)} {t.dtype}  mean {t.double().mean():.5g} "
              f"std {t.double().std() if t.numel() > 1 else 0:.5g}")
    return 0


def cmd_export(a) -> int:
    import deepseek as ds

    if not a.onnx:
        raise DeepseekError("deepseek export needs a target format: --onnx PATH")
    engine = ds.load(a.model, backend=a.backend) if a.model.endswith(".dsk") else _compile_any(a)
    engine.export_onnx(a.onnx, opset=a.opset)
    print(f"exported {len(engine.graph.nodes)} IR nodes of {a.model} to {a.onnx} "
          f"(ONNX opset {a.opset or 17}, checked by onnx.checker)")
    return 0


def cmd_info(a) -> int:
    import deepseek as ds

    engine = ds.load(a.model)
    if a.json:
        print(json.dumps(engine.report().to_dict(), indent=2))
        return 0
    print(repr(engine))
    print(engine.report())
    if a.graph:
        print(engine.graph)
    if a.memory:
        _print_memory(engine, _parse_dims(a.dim))
    return 0


def _print_memory(engine, dims: dict[str, int]) -> None:
    """Per kernel: bytes read + written and FLOPs, with totals (the optimized graph)."""
    from deepseek.profiler.flops import node_flops
    from deepseek.runtime.plan import node_bytes, plan_memory

    g = engine.graph
    try:
        for v in g.inputs:
            v.spec.concrete(dims)
    except DeepseekError:
        raise DeepseekError("the graph has symbolic dims: give their sizes with --dim NAME=SIZE")
    print(f"\n{'kernel':<40} {'op':<34} {'bytes moved':>14} {'FLOPs':>14}")
    total_b = total_f = 0
    for n in g.nodes:
        b, f = node_bytes(n, dims), node_flops(n, dims)
        total_b, total_f = total_b + b, total_f + f
        print(f"%{n.name[:39]:<39} {n.kind[:34]:<34} {b:>14,} {f:>14,}")
    plan = plan_memory(g, dims)
    print(f"{'total':<75} {total_b:>14,} {total_f:>14,}")
    print(f"memory plan: arena {plan.arena_bytes:,} B, peak live {plan.peak_live_bytes:,} B, "
          f"{plan.total_bytes:,} B if every tensor had its own buffer")


def cmd_bench(a) -> int:
    import deepseek as ds
    from deepseek.timing import time_interleaved

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model.endswith(".dsk"):
        engine = ds.load(a.model)
        inputs = random_inputs(engine, _parse_dims(a.dim))
        t = time_interleaved({"deepseek": lambda: engine.run_flat(inputs)}, iters=a.iters)
        print(f"Deepseek: {t['deepseek'] * 1e6:.1f} us/call (median of {a.iters})")
        return 0
    model, inputs = load_model(a.model, a.batch)
    engine = ds.compile(model, inputs, backend=a.backend, opt_level=a.opt_level)
    return _compare(model, engine, a.model, a.batch, a.iters)


# Sub-commands that live with their part of the system: each module has
# ``register(command)`` where ``command(name, fn, help, example) -> subparser``.
EXTENSION_MODULES = ("deepseek.serving.cli", "deepseek.quantization.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepseek", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log what the compiler does")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, fn, help_, example=None):
        s = sub.add_parser(name, help=help_, description=help_,
                           epilog=f"example:\n  {example or EXAMPLES_TEXT[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.set_defaults(fn=fn)
        return s

    s = command("demo", cmd_demo, "compile the bundled MNIST CNN, check it against eager, "
                                  "print the speed-up")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--iters", type=int, default=300)
    s.add_argument("--threads", type=int, default=None)

    s = command("compile", cmd_compile, "compile a model into a .dsk artifact")
    s.add_argument("model")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--backend", default="auto")
    s.add_argument("--opt-level", type=int, default=2)
    s.add_argument("--batch", type=int, default=None, help="batch size of the example inputs")
    s.add_argument("--dynamic-batch", action="store_true", help="make dim 0 of every input "
                   "symbolic ('batch'); use an example batch of 2 or more")
    s.add_argument("--strict", action="store_true", help="fail on ops without a Deepseek kernel")

    s = command("export", cmd_export, "export a model (example, factory, .onnx or .dsk) to ONNX")
    s.add_argument("model")
    s.add_argument("--onnx", metavar="PATH", help="write an ONNX model (checked by onnx.checker)")
    s.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    s.add_argument("--backend", default="cpu")
    s.add_argument("--opt-level", type=int, default=2)
    s.add_argument("--batch", type=int, default=None, help="batch size of the example inputs")
    s.add_argument("--dynamic-batch", action="store_true", help="make dim 0 of every input "
                   "symbolic ('batch', a dim_param in the ONNX file)")
    s.add_argument("--strict", action="store_true", help="fail on ops without a Deepseek kernel")

    s = command("run", cmd_run, "run a .dsk artifact on random inputs and summarize the outputs")
    s.add_argument("model")
    s.add_argument("--backend", default="auto")
    s.add_argument("--dim", action="append", help="NAME=SIZE for a symbolic dim")
    s.add_argument("--seed", type=int, default=0)

    s = command("info", cmd_info, "show a .dsk artifact's inputs, report and graph")
    s.add_argument("model")
    s.add_argument("--graph", action="store_true", help="print the IR")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--memory", action="store_true", help="bytes moved and FLOPs of every kernel, "
                   "and the memory plan")
    s.add_argument("--dim", action="append", help="NAME=SIZE for a symbolic dim (with --memory)")

    s = command("bench", cmd_bench, "time Deepseek against eager PyTorch, side by side")
    s.add_argument("model")
    s.add_argument("--batch", type=int, default=None)
    s.add_argument("--iters", type=int, default=100)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--backend", default="auto")
    s.add_argument("--opt-level", type=int, default=2)
    s.add_argument("--dim", action="append", help="NAME=SIZE for a symbolic dim (.dsk)")
    for module in EXTENSION_MODULES:
        package = module.rpartition(".")[0]
        if importlib.util.find_spec(package) and importlib.util.find_spec(module):
            importlib.import_module(module).register(command)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except DeepseekError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
