"""Tensor types of the IR: dtypes, symbolic dims and TensorSpec.

A dim is an ``int`` or a :class:`Sym`, an integer expression over named
symbols (``"batch"``, ``"2*seq + 1"``). Expressions are evaluated by a small
whitelisting evaluator, never by ``eval``: graph files come from users.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import Mapping, Union

import torch

from deepseek.errors import IRError

# The dtypes the IR knows, by their stable names (used in graph.json).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2fnuz": torch.float8_e5m2fnuz,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
}
if hasattr(torch, "float8_e8m0fnu"):  # newer torch only
    DTYPES["float8_e8m0fnu"] = torch.float8_e8m0fnu
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise IRError(f"dtype {dtype} is not supported by the Deepseek IR") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise IRError(f"unknown dtype name {name!r}; known: {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class Sym:
    """A symbolic integer: a symbol name or an expression over symbols."""

    expr: str

    def __str__(self) -> str:
        return self.expr

    def __repr__(self) -> str:
        return f"Sym({self.expr!r})"

    def symbols(self) -> set[str]:
        return {n.id for n in ast.walk(_parse(self.expr)) if isinstance(n, ast.Name)}


Dim = Union[int, Sym]

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_FUNCS = {
    "Max": max,
    "Min": min,
    "Mod": operator.mod,
    "PythonMod": operator.mod,
    "FloorDiv": operator.floordiv,
    "CeilDiv": lambda a, b: -(-a // b),
    "Abs": abs,
}
_PARSED: dict[str, ast.Expression] = {}


def _parse(expr: str) -> ast.Expression:
    tree = _PARSED.get(expr)
    if tree is None:
        try:
            tree = ast.parse(expr, mode="eval")
        except SyntaxError:
            raise IRError(f"malformed symbolic dim {expr!r}") from None
        for node in ast.walk(tree):
            ok = isinstance(
                node,
                (ast.Expression, ast.BinOp, ast.UnaryOp, ast.USub, ast.Name, ast.Load, ast.Call)
                + tuple(_BINOPS),
            ) or (isinstance(node, ast.Constant) and type(node.value) is int)
            if isinstance(node, ast.Call):
                ok = isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
                # sizes are small powers at most; an unbounded exponent could hang evaluation
                ok = isinstance(node.right, ast.Constant) and 0 <= node.right.value <= 8
            if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) > 2**62:
                ok = False
            if not ok:
                raise IRError(f"symbolic dim {expr!r} uses {type(node).__name__}, which is not allowed")
        _PARSED[expr] = tree
    return tree


def _eval(node: ast.AST, env: Mapping[str, int]) -> int:
    if isinstance(node, ast.Expression):
        return _eval(node.body, env)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        try:
            return env[node.id]
        except KeyError:
            raise IRError(f"symbol {node.id!r} has no value; bound: {dict(env)}") from None
    if isinstance(node, ast.UnaryOp):
        return -_eval(node.operand, env)
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.Call):
        return _FUNCS[node.func.id](*(_eval(a, env) for a in node.args))
    raise IRError(f"cannot evaluate {ast.dump(node)}")


def eval_dim(dim: Dim, env: Mapping[str, int]) -> int:
    """The concrete value of ``dim`` under the symbol bindings ``env``."""
    if isinstance(dim, Sym):
        return int(_eval(_parse(dim.expr), env))
    return dim


def bind(value, env: Mapping[str, int]):
    """Replace every Sym inside a (nested list/tuple) attribute by its value."""
    if isinstance(value, Sym):
        return eval_dim(value, env)
    if isinstance(value, (list, tuple)):
        return type(value)(bind(v, env) for v in value)
    return value


def has_sym(value) -> bool:
    if isinstance(value, Sym):
        return True
    if isinstance(value, (list, tuple)):
        return any(has_sym(v) for v in value)
    return False


@dataclass(frozen=True)
class TensorSpec:
    """Shape (ints or Syms) and dtype of a tensor value."""

    shape: tuple[Dim, ...]
    dtype: torch.dtype

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return not any(isinstance(d, Sym) for d in self.shape)

    def concrete(self, env: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, env) for d in self.shape)

    def nbytes(self, env: Mapping[str, int] | None = None) -> int:
        numel = 1
        for d in self.concrete(env or {}):
            numel *= d
        return numel * self.dtype.itemsize

    def __str__(self) -> str:
        short = {
            "float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16",
            "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
        }
        name = dtype_name(self.dtype)
        return f"{short.get(name, name)}[{','.join(str(d) for d in self.shape)}]"

    @staticmethod
    def of(tensor: torch.Tensor) -> "TensorSpec":
        return TensorSpec(tuple(int(d) for d in tensor.shape), tensor.dtype)


# An optional output the op does not compute (convolution_backward with a False
# ``output_mask`` entry, whose kernel returns None there): a zero-size placeholder,
# so it holds no memory.
ABSENT = TensorSpec((0,), torch.float32)
