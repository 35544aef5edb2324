"""JSON encoding of attribute values (graph.json and fused-kernel programs)."""

from __future__ import annotations

import math
from typing import Any

import torch

from deepseek.errors import IRError
from deepseek.ir.types import Sym, dtype_from_name, dtype_name

_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format,
                   "channels_last": torch.channels_last,
                   "channels_last_3d": torch.channels_last_3d,
                   "preserve_format": torch.preserve_format}


def encode_attr(x: Any) -> Any:
    """JSON-able form of an attribute value (Syms, dtypes, memory formats, inf/nan tagged)."""
    if isinstance(x, Sym):
        return {"sym": x.expr}
    if isinstance(x, torch.dtype):
        return {"dtype": dtype_name(x)}
    if isinstance(x, torch.memory_format):
        return {"memory_format": str(x).removeprefix("torch.")}
    if isinstance(x, float) and not math.isfinite(x):
        return {"float": repr(x)}
    if isinstance(x, (list, tuple)):
        return [encode_attr(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise IRError(f"cannot serialize attribute value {x!r} ({type(x).__name__})")


def decode_attr(x: Any) -> Any:
    """The attribute value of ``encode_attr``'s output; IRError for anything else."""
    if isinstance(x, list):
        return [decode_attr(v) for v in x]
    if isinstance(x, dict):
        if set(x) == {"sym"} and isinstance(x["sym"], str):
            Sym(x["sym"]).symbols()  # parses and whitelists the expression now
            return Sym(x["sym"])
        if set(x) == {"dtype"}:
            return dtype_from_name(x["dtype"])
        if set(x) == {"memory_format"} and x["memory_format"] in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[x["memory_format"]]
        if set(x) == {"float"} and x["float"] in ("inf", "-inf", "nan"):
            return float(x["float"])
        raise IRError(f"unknown attribute encoding {x!r}")
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise IRError(f"bad attribute value {x!r}")
