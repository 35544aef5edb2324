"""Triton kernels generated from ``fused_pointwise`` programs.

One kernel per (program, rank): every external input is loaded once with
its own strides (0 on broadcast dims), the steps run in float32 registers,
and the single output is stored once. Generated sources are written to an
on-disk cache keyed by the program, Triton's version and the device, and
imported from there (Triton's JIT reads kernel source from files).

Runs under Triton's interpreter too (``TRITON_INTERPRET=1``), on CPU
tensors, which is how CI checks every generated kernel without a GPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from typing import Callable, Sequence

import torch

from deepseek.ir.fused import parse_program
from deepseek.runtime.cache import cache_root

# IR op -> Triton expression over its operands {0}, {1}, ... (float32 values)
_EXPR = {
    "add.Tensor": "({0} + {1})", "add.Scalar": "({0} + {1})",
    "sub.Tensor": "({0} - {1})", "sub.Scalar": "({0} - {1})",
    "rsub.Scalar": "({1} - {0})", "rsub.Tensor": "({1} - {0})",
    "mul.Tensor": "({0} * {1})", "mul.Scalar": "({0} * {1})",
    "div.Tensor": "({0} / {1})", "div.Scalar": "({0} / {1})",
    "neg.default": "(-{0})", "abs.default": "tl.abs({0})",
    "exp.default": "tl.exp({0})", "log.default": "tl.log({0})",
    "sqrt.default": "tl.sqrt({0})", "rsqrt.default": "tl.rsqrt({0})",
    "reciprocal.default": "(1.0 / {0})",
    "sigmoid.default": "tl.sigmoid({0})",
    "tanh.default": "(2.0 * tl.sigmoid(2.0 * {0}) - 1.0)",
    "relu.default": "tl.maximum({0}, 0.0)",
    "silu.default": "({0} * tl.sigmoid({0}))",
    "erf.default": "tl.erf({0})",
    "sin.default": "tl.sin({0})", "cos.default": "tl.cos({0})",
    "maximum.default": "tl.maximum({0}, {1})", "minimum.default": "tl.minimum({0}, {1})",
    "where.self": "tl.where({0} != 0, {1}, {2})",
    "eq.Tensor": "({0} == {1})", "eq.Scalar": "({0} == {1})",
    "ne.Tensor": "({0} != {1})", "ne.Scalar": "({0} != {1})",
    "lt.Tensor": "({0} < {1})", "lt.Scalar": "({0} < {1})",
    "le.Tensor": "({0} <= {1})", "le.Scalar": "({0} <= {1})",
    "gt.Tensor": "({0} > {1})", "gt.Scalar": "({0} > {1})",
    "ge.Tensor": "({0} >= {1})", "ge.Scalar": "({0} >= {1})",
}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IN_DTYPES = _FLOAT_DTYPES + (torch.bool,)


def _step_expr(op: str, args: list[str], attrs: dict) -> str | None:
    """The Triton expression of one step, or None if the generator lacks it."""
    if op in _EXPR:
        if op.endswith(".Scalar") and "other" in attrs:  # the scalar operand is an attribute
            args = [*args, repr(float(attrs["other"]))]
        if op.startswith(("add.", "sub.")) and attrs.get("alpha", 1) != 1:
            args = [args[0], f"({attrs['alpha']!r} * {args[1]})"]
        return _EXPR[op].format(*args)
    if op == "pow.Tensor_Scalar" and isinstance(attrs.get("exponent"), (int, float)):
        e = attrs["exponent"]
        if float(e).is_integer() and 1 <= e <= 4:
            return "(" + " * ".join([args[0]] * int(e)) + ")"
        if e == 0.5:
            return f"tl.sqrt({args[0]})"
        return None
    if op == "gelu.default":
        x = args[0]
        if attrs.get("approximate", "none") == "tanh":
            inner = f"0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})"
            return f"(0.5 * {x} * (1.0 + (2.0 * tl.sigmoid(2.0 * ({inner})) - 1.0)))"
        return f"(0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476)))"
    if op == "clamp.default":
        x, lo, hi = args[0], attrs.get("min"), attrs.get("max")
        if lo is not None:
            x = f"tl.maximum({x}, {float(lo)!r})"
        if hi is not None:
            x = f"tl.minimum({x}, {float(hi)!r})"
        return x
    if op == "_to_copy.default" and set(attrs) <= {"dtype"}:
        return args[0]  # values stay float32 in registers; the store casts
    return None


def generate_source(program: str, n_inputs: int, rank: int) -> str | None:
    """Triton source of the kernel for ``program``, or None if a step is unsupported."""
    steps = parse_program(program)
    body = []
    for i in range(n_inputs):
        idx = " + ".join(f"i{d} * st{i}_{d}" for d in range(rank)) or "0"
        body.append(f"    x{i} = tl.load(in{i} + ({idx}), mask=mask, other=0).to(tl.float32)")
    for j, (op, args, attrs) in enumerate(steps):
        refs = []
        for a in args:
            if isinstance(a, str) and a[:1] == "$":
                refs.append(f"x{int(a[1:])}")
            elif isinstance(a, str) and a[:1] == "#":
                refs.append(f"t{int(a[1:])}")
            elif isinstance(a, (bool, int, float)):
                refs.append(repr(float(a)))
            else:
                return None
        expr = _step_expr(op, refs, attrs)
        if expr is None:
            return None
        body.append(f"    t{j} = ({expr}).to(tl.float32)")
    ins = ", ".join(f"in{i}" for i in range(n_inputs))
    strides = ", ".join(f"st{i}_{d}" for i in range(n_inputs) for d in range(rank))
    dims = ", ".join(f"d{d}" for d in range(rank))
    unravel = []
    rest = "offs"
    for d in reversed(range(rank)):
        unravel.append(f"    i{d} = {rest} % d{d}")
        rest = f"({rest} // d{d})"
    params = ", ".join(p for p in (ins, "out", "n", dims, strides) if p)
    return "\n".join([
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def kernel({params}, BLOCK: tl.constexpr):",
        "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < n",
        *unravel,
        *body,
        f"    tl.store(out + offs, t{len(steps) - 1}.to(out.dtype.element_ty), mask=mask)",
        "",
    ])


def _cache_dir() -> str:
    import triton

    base = cache_root()
    device = "interpreter"
    if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
        device = torch.cuda.get_device_name().replace(" ", "_") + f"_cuda{torch.version.cuda}"
    path = os.path.join(base, "kernels", f"triton{triton.__version__}_{device}")
    os.makedirs(path, exist_ok=True)
    return path


_LOADED: dict[str, Callable] = {}


def load_kernel(source: str):
    """Import the kernel from the on-disk cache (written once per source)."""
    key = hashlib.sha256(source.encode()).hexdigest()[:20]
    if key in _LOADED:
        return _LOADED[key]
    path = os.path.join(_cache_dir(), f"pointwise_{key}.py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, path)  # atomic: concurrent compilers never see half a file
    name = f"deepseek_kernel_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    _LOADED[key] = module.kernel
    return module.kernel


class PointwiseKernel:
    """A launcher for one fused program at one output shape."""

    BLOCK = 1024

    def __init__(self, program: str, inputs: Sequence[torch.Tensor | float], out_shape, out_dtype):
        self.shape = tuple(out_shape)
        self.out_dtype = out_dtype
        self.n_inputs = len(inputs)
        self.source = generate_source(program, len(inputs), len(self.shape))
        self.kernel = load_kernel(self.source) if self.source else None
        # inputs all of the output's shape and one dense layout: index memory directly
        flat = generate_source(program, len(inputs), 1)
        self.flat_kernel = load_kernel(flat) if flat else None

    @staticmethod
    def supported(program: str, inputs: Sequence, out_dtype) -> bool:
        return (out_dtype in _FLOAT_DTYPES
                and all(isinstance(x, torch.Tensor) and x.dtype in _IN_DTYPES for x in inputs)
                and generate_source(program, len(inputs), 1) is not None)

    def __call__(self, *inputs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        import triton

        first = inputs[0]
        if all(x.shape == self.shape and x.stride() == first.stride() for x in inputs) and (
                first.is_contiguous() or first.is_contiguous(memory_format=torch.channels_last)):
            # same dense layout everywhere (channels-last included): a flat loop, layout kept
            out = torch.empty_like(first, dtype=self.out_dtype) if out is None else out
            n = out.numel()
            if n:
                self.flat_kernel[(triton.cdiv(n, self.BLOCK),)](
                    *inputs, out, n, n, *([1] * self.n_inputs), BLOCK=self.BLOCK)
            return out
        if out is None:
            out = torch.empty(self.shape, dtype=self.out_dtype, device=inputs[0].device)
        strides = []
        for x in inputs:
            x = x.expand(self.shape) if x.dim() <= len(self.shape) else x
            strides += [s if size != 1 else 0 for s, size in zip(x.stride(), x.shape)]
        n = out.numel()
        if n == 0:
            return out
        grid = (triton.cdiv(n, self.BLOCK),)
        self.kernel[grid](*inputs, out, n, *self.shape, *strides, BLOCK=self.BLOCK)
        return out
