"""Reading ONNX files safely: parsing, external data confined to the model's folder,
tensors and attributes to torch/Python values. Every failure is a CaptureError."""

from __future__ import annotations

import os
from typing import Any

import onnx
import torch
from onnx import AttributeProto, TensorProto

from deepseek.errors import CaptureError, UnsupportedOpError
from deepseek.frontend.onnx_types import numpy_to_torch, storage_dtype

DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------- #
def load_model_proto(source: Any, base_dir: str | None = None) -> onnx.ModelProto:
    """Parse an ONNX model from a path, bytes or a ModelProto, external data included.

    Raises CaptureError for anything that is not a readable ONNX model.
    """
    if isinstance(source, onnx.ModelProto):
        model = source
    else:
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if not os.path.isfile(path):
                raise CaptureError(f"ONNX file {path!r} does not exist or is not a file")
            base_dir = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(path))
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise CaptureError(f"cannot read ONNX file {path!r}: {e}") from None
            label = path
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data, label = bytes(source), "<bytes>"
        else:
            raise CaptureError(f"import_onnx needs a path, bytes or onnx.ModelProto, got "
                               f"{type(source).__name__}")
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except Exception as e:  # protobuf's DecodeError and friends
            raise CaptureError(f"{label} is not a valid ONNX model (truncated or damaged file?): "
                               f"{type(e).__name__}: {e}") from None
        if not data or not model.HasField("graph"):
            raise CaptureError(f"{label} is not an ONNX model: it has no graph")
    _check_model(model)
    _load_external_data(model, base_dir)
    return model


def _check_model(model: onnx.ModelProto) -> None:
    newest = onnx.defs.onnx_opset_version()
    default = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    if model.ir_version < 3 and not model.opset_import:
        raise CaptureError(f"ONNX IR version {model.ir_version} is too old (need 3 or newer)")
    if not default and model.opset_import:
        default = [newest]
    for v in default:
        if v > newest:
            raise CaptureError(f"the model uses ONNX opset {v}, newer than this onnx "
                               f"{onnx.__version__} knows ({newest}); upgrade onnx")
        if v < 1:
            raise CaptureError(f"the model declares ONNX opset {v}, which does not exist")


def _external_tensors(model: onnx.ModelProto):
    for t in model.graph.initializer:
        yield t
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == AttributeProto.TENSOR:
                yield a.t


def _load_external_data(model: onnx.ModelProto, base_dir: str | None) -> None:
    """Read external-data tensors from files inside ``base_dir`` (never outside it)."""
    for t in _external_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        where = f"tensor {t.name!r}"
        if base_dir is None:
            raise CaptureError(f"{where} keeps its data in an external file; load the model from "
                               "a path (or give base_dir) so the file can be found")
        location = info.get("location", "")
        if not location or os.path.isabs(location) or "\0" in location:
            raise CaptureError(f"{where}: external data location {location!r} must be a relative "
                               "path next to the model")
        root = os.path.realpath(base_dir)
        path = os.path.realpath(os.path.join(root, location))
        if os.path.commonpath([root, path]) != root:
            raise CaptureError(f"{where}: external data location {location!r} points outside the "
                               f"model's folder {base_dir!r}; refusing to read it")
        if not os.path.isfile(path):
            raise CaptureError(f"{where}: external data file {location!r} is missing in {base_dir!r}")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise CaptureError(f"{where}: external data offset/length are not integers") from None
        size = os.path.getsize(path)
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            raise CaptureError(f"{where}: external data range offset={offset} length={length} lies "
                               f"outside {location!r} ({size} bytes); the file is truncated or wrong")
        with open(path, "rb") as f:
            f.seek(offset)
            t.raw_data = f.read(length if length is not None else size - offset)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT


def tensor_from_proto(t: TensorProto, where: str = "") -> torch.Tensor:
    """A torch tensor from a TensorProto; CaptureError if its data does not fit its dims."""
    if t.data_location == TensorProto.EXTERNAL:
        raise CaptureError(f"{where}tensor {t.name!r} has external data that was not loaded")
    storage_dtype(t.data_type, where)  # unsupported element types are named first
    n = 1
    for d in t.dims:
        if d < 0:
            raise CaptureError(f"{where}tensor {t.name!r} has a negative dim {d}")
        n *= d
    if n * 8 > 1 << 34:
        raise CaptureError(f"{where}tensor {t.name!r} claims {n} elements; refusing")
    try:
        arr = onnx.numpy_helper.to_array(t)
    except Exception as e:
        raise CaptureError(f"{where}tensor {t.name!r} is malformed (its data does not match dims "
                           f"{list(t.dims)}): {type(e).__name__}: {e}") from None
    return numpy_to_torch(arr)


def attr_value(a: AttributeProto, where: str) -> Any:
    """The Python value of an attribute (tensors as torch tensors, graphs as GraphProto)."""
    T = AttributeProto
    kinds = {T.FLOAT: lambda: a.f, T.INT: lambda: a.i, T.STRING: lambda: a.s.decode("utf-8", "replace"),
             T.TENSOR: lambda: tensor_from_proto(a.t, where), T.GRAPH: lambda: a.g,
             T.FLOATS: lambda: list(a.floats), T.INTS: lambda: list(a.ints),
             T.STRINGS: lambda: [s.decode("utf-8", "replace") for s in a.strings],
             T.TENSORS: lambda: [tensor_from_proto(t, where) for t in a.tensors],
             T.GRAPHS: lambda: list(a.graphs)}
    if a.type not in kinds:
        raise UnsupportedOpError(f"{where}attribute {a.name!r} of type "
                                 f"{AttributeProto.AttributeType.Name(a.type) if a.type in T.AttributeType.values() else a.type} "
                                 "is not supported")
    return kinds[a.type]()
