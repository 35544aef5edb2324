"""ONNX element types <-> torch dtypes, and tensor conversions both ways.

Shared by the ONNX importer, the exporter, ``deepseek.onnx_backend`` and the
ONNX Runtime backend. Only the dtypes the IR knows (``deepseek.ir.types.DTYPES``)
map; every other ONNX type (strings, unsigned 16/32/64-bit, 4-bit, float4,
the FNUZ float8 variants) is reported as unsupported by name.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from deepseek.errors import UnsupportedOpError

ONNX_TO_TORCH: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT64: torch.int64,
    TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
    TensorProto.COMPLEX64: torch.complex64,
    TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
    TensorProto.FLOAT8E5M2: torch.float8_e5m2,
}
TORCH_TO_ONNX: dict[torch.dtype, int] = {v: k for k, v in ONNX_TO_TORCH.items()}

# numpy has no bfloat16/float8: those travel as raw bits of this integer type
_BIT_VIEWS = {torch.bfloat16: (torch.int16, np.int16), torch.float8_e4m3fn: (torch.uint8, np.uint8),
              torch.float8_e5m2: (torch.uint8, np.uint8)}


def onnx_type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"unknown element type {elem_type}"


def torch_dtype(elem_type: int, where: str = "") -> torch.dtype:
    """The torch dtype of an ONNX element type; UnsupportedOpError when the IR has none."""
    try:
        return ONNX_TO_TORCH[elem_type]
    except KeyError:
        raise UnsupportedOpError(f"{where}element type {onnx_type_name(elem_type)} has no "
                                 "Deepseek IR dtype") from None


def onnx_elem_type(dtype: torch.dtype) -> int:
    try:
        return TORCH_TO_ONNX[dtype]
    except KeyError:
        raise UnsupportedOpError(f"dtype {dtype} has no ONNX element type") from None


def numpy_to_torch(arr: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A torch tensor (owning a copy) from a numpy array, ml_dtypes types included."""
    arr = np.asarray(arr)
    name = arr.dtype.name
    if name == "bfloat16" or name.startswith("float8"):
        want = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn,
                "float8_e5m2": torch.float8_e5m2}.get(name)
        if want is None:
            raise UnsupportedOpError(f"numpy dtype {name} has no Deepseek IR dtype")
        bits, np_bits = _BIT_VIEWS[want]
        return torch.from_numpy(np.ascontiguousarray(arr).view(np_bits).copy()).view(want)
    if arr.dtype == object or arr.dtype.kind in "USO":
        raise UnsupportedOpError("string tensors have no Deepseek IR dtype")
    if arr.dtype in (np.uint16, np.uint32, np.uint64):
        raise UnsupportedOpError(f"element type {arr.dtype} has no Deepseek IR dtype")
    t = torch.from_numpy(np.ascontiguousarray(arr).copy())
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy array of a tensor, bfloat16 and float8 as ml_dtypes arrays."""
    t = t.detach().cpu().contiguous()
    if t.dtype in _BIT_VIEWS:
        import ml_dtypes

        bits, _ = _BIT_VIEWS[t.dtype]
        np_type = {torch.bfloat16: ml_dtypes.bfloat16, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
                   torch.float8_e5m2: ml_dtypes.float8_e5m2}[t.dtype]
        return t.view(bits).numpy().view(np_type)
    return t.numpy()
