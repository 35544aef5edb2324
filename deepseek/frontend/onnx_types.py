"""ONNX element types <-> torch dtypes, and tensor conversions both ways.

Shared by the ONNX importer, the exporter, ``deepseek.onnx_backend`` and the
ONNX Runtime backend. The dtypes the IR knows (``deepseek.ir.types.DTYPES``) map.
``EXTENDED`` lists torch dtypes ONNX has that the IR's dtype table does not
name yet (unsigned 16/32/64-bit, the FNUZ float8 variants, float8 e8m0);
each maps as soon as ``DTYPES`` names it (the importer then computes unsigned
arithmetic in int64, as torch lacks most unsigned kernels). Until then, and
for strings, 2- and 4-bit integers and float4 (no torch dtype at all), the
type is reported as unsupported by name.

Sub-byte types (``SUB_BYTE``: int4, uint4, int2, uint2, float4e2m1) have no torch
dtype; they are stored unpacked, one value per byte (int8/uint8; float4 values,
all exactly representable, in float32): as graph inputs, outputs and
initializers, through Cast/CastLike and QuantizeLinear/DequantizeLinear (int4
weight-only quantized models import). Engines built from such models take and
give the storage dtype; ``deepseek.onnx_backend`` converts at the boundary.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto

from deepseek.errors import UnsupportedOpError
from deepseek.ir.types import DTYPES as _IR_DTYPES

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
EXTENDED: dict[int, torch.dtype] = {
    TensorProto.UINT16: torch.uint16,
    TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
    TensorProto.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    TensorProto.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
    TensorProto.FLOAT8E8M0: torch.float8_e8m0fnu,
}
ONNX_TO_TORCH.update({k: v for k, v in EXTENDED.items() if v in _IR_DTYPES.values()})
TORCH_TO_ONNX: dict[torch.dtype, int] = {v: k for k, v in ONNX_TO_TORCH.items()}
UNSIGNED_WIDE = (torch.uint16, torch.uint32, torch.uint64)  # computed in int64

# sub-byte ONNX types: element type -> (storage dtype, (min, max) of integers or None, ml_dtypes name)
SUB_BYTE: dict[int, tuple[torch.dtype, tuple[int, int] | None, str]] = {
    TensorProto.INT4: (torch.int8, (-8, 7), "int4"),
    TensorProto.UINT4: (torch.uint8, (0, 15), "uint4"),
    TensorProto.FLOAT4E2M1: (torch.float32, None, "float4_e2m1fn"),
}
for _name, _lo_hi, _ml in (("INT2", (-2, 1), "int2"), ("UINT2", (0, 3), "uint2")):
    if hasattr(TensorProto, _name):  # onnx >= 1.20
        SUB_BYTE[getattr(TensorProto, _name)] = (torch.int8 if _lo_hi[0] < 0 else torch.uint8, _lo_hi, _ml)


def storage_dtype(elem_type: int, where: str = "") -> torch.dtype:
    """The torch dtype an ONNX element type is held in (sub-byte types: unpacked)."""
    if elem_type in SUB_BYTE:
        return SUB_BYTE[elem_type][0]
    return torch_dtype(elem_type, where)


def to_ml_dtype(arr: np.ndarray, elem_type: int) -> np.ndarray:
    """A numpy array of storage values as the ml_dtypes array of a sub-byte ONNX type."""
    import ml_dtypes

    return np.asarray(arr).astype(getattr(ml_dtypes, SUB_BYTE[elem_type][2]))

# numpy has no bfloat16/float8: those travel as raw bits of this integer type
_BIT_VIEWS = {torch.bfloat16: (torch.int16, np.int16), torch.float8_e4m3fn: (torch.uint8, np.uint8),
              torch.float8_e5m2: (torch.uint8, np.uint8), torch.float8_e4m3fnuz: (torch.uint8, np.uint8),
              torch.float8_e5m2fnuz: (torch.uint8, np.uint8), torch.float8_e8m0fnu: (torch.uint8, np.uint8)}
_ML_NAMES = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn,
             "float8_e5m2": torch.float8_e5m2, "float8_e4m3fnuz": torch.float8_e4m3fnuz,
             "float8_e5m2fnuz": torch.float8_e5m2fnuz, "float8_e8m0fnu": torch.float8_e8m0fnu}


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
    if name in ("int4", "int2"):
        return torch.from_numpy(arr.astype(np.int8))
    if name in ("uint4", "uint2"):
        return torch.from_numpy(arr.astype(np.uint8))
    if name.startswith("float4"):
        return torch.from_numpy(arr.astype(np.float32))
    if name == "bfloat16" or name.startswith("float8"):
        want = _ML_NAMES.get(name)
        if want is None:
            raise UnsupportedOpError(f"numpy dtype {name} has no Deepseek IR dtype")
        bits, np_bits = _BIT_VIEWS[want]
        return torch.from_numpy(np.array(arr, order="C").view(np_bits)).view(want)
    if arr.dtype == object or arr.dtype.kind in "USO":
        raise UnsupportedOpError("string tensors have no Deepseek IR dtype")
    t = torch.from_numpy(np.array(arr, order="C"))  # a copy; keeps 0-d arrays 0-d
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy array of a tensor, bfloat16 and float8 as ml_dtypes arrays."""
    t = t.detach().cpu().contiguous()
    if t.dtype in _BIT_VIEWS:
        import ml_dtypes

        bits, _ = _BIT_VIEWS[t.dtype]
        np_type = getattr(ml_dtypes, {v: k for k, v in _ML_NAMES.items()}[t.dtype])
        return t.view(bits).numpy().view(np_type)
    return t.numpy()
