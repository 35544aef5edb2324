"""KServe v2 / Open Inference Protocol: requests and responses as plain data.

Parses infer requests (JSON, and the binary tensor data extension with the
``Inference-Header-Content-Length`` header), checks them against a model's
signature, and encodes responses and metadata. No web framework here: the
server (:mod:`deepseek.serving.server`) moves bytes, this module gives
meaning. Every problem is a :class:`ProtocolError` with an HTTP status and a
message that names the input and the fix.

Per-request scheduling parameters (in the request's ``parameters``):
``deadline_ms`` (relative to arrival), Triton's ``timeout`` (microseconds, what
``tritonclient``'s ``infer(timeout=...)`` sends) and ``priority`` (Triton's
levels: 1 is the most urgent, 0 = default, after every explicit level).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from deepseek.errors import DeepseekError
from deepseek.ir.types import Sym, eval_dim

# KServe v2 datatypes <-> torch dtypes
KSERVE_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8, "INT16": torch.int16,
    "INT32": torch.int32, "INT64": torch.int64, "FP16": torch.float16, "BF16": torch.bfloat16,
    "FP32": torch.float32, "FP64": torch.float64,
}
TORCH_TO_KSERVE = {v: k for k, v in KSERVE_DTYPES.items()}
_NUMPY_FOR = {torch.bfloat16: np.float32}  # numpy has no bfloat16: parse as float32, then cast

MASK_HINT = "mask"  # an input whose name contains this marks padding for its symbolic dims


class ProtocolError(Exception):
    """A request the server must refuse: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple  # ints and Syms

    @property
    def datatype(self) -> str:
        return TORCH_TO_KSERVE[self.dtype]

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype,
                "shape": [d if isinstance(d, int) else -1 for d in self.shape]}


def _plain(d) -> str | None:
    return d.expr if isinstance(d, Sym) and d.expr.isidentifier() else None


def _output_names(structure: dict | None, n: int) -> list[str]:
    """Names for the flat outputs: dict keys / namedtuple fields where the model has
    them, else ``output0``, ``output1``, ..."""
    names: list[str] = []

    def walk(s: dict, path: list[str]) -> None:
        kind = s.get("kind")
        if kind == "leaf":
            names.append(".".join(path))
        elif kind != "none":
            keys = s.get("keys") or s.get("fields")
            for i, child in enumerate(s.get("items", [])):
                walk(child, path + ([str(keys[i])] if keys else []))

    if structure:
        walk(structure, [])
    if len(names) != n or len(set(names)) != n or not all(names):
        return [f"output{i}" for i in range(n)]
    return names


@dataclass
class ModelSignature:
    """What a served model takes and returns, and how its requests batch."""

    name: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    batch_symbol: str | None          # None: the model is served without batching
    padded: dict[str, tuple[int, ...]] = field(default_factory=dict)  # symbol -> length buckets
    max_batch_size: int = 1

    @staticmethod
    def from_engine(engine, name: str, max_batch_size: int = 64,
                    length_buckets: tuple[int, ...] = ()) -> ModelSignature:
        """Read an engine's graph. The model batches if every input and output has the
        same plain symbol as dim 0 (and nowhere else); a symbolic dim other than that
        is padded to length buckets if a ``*mask*`` input carries it and it appears
        only as a whole dim; otherwise requests batch only with equal sizes."""
        g = engine.graph
        names = g.input_names if len(g.input_names) == len(g.inputs) else [v.name for v in g.inputs]
        for v in list(g.inputs) + list(g.outputs):
            if v.spec.dtype not in TORCH_TO_KSERVE:
                raise DeepseekError(f"cannot serve model {name!r}: tensor {v.name} has dtype "
                                    f"{v.spec.dtype}, which KServe v2 cannot carry")
        inputs = [TensorInfo(n, v.spec.dtype, tuple(v.spec.shape)) for n, v in zip(names, g.inputs)]
        outputs = [TensorInfo(n, v.spec.dtype, tuple(v.spec.shape))
                   for n, v in zip(_output_names(g.out_structure, len(g.outputs)), g.outputs)]
        batch = _batch_symbol(inputs, outputs)
        padded = {}
        for s in _mask_symbols(inputs, batch):
            if _only_whole(s, inputs + outputs):
                padded[s] = tuple(length_buckets)
        return ModelSignature(name, inputs, outputs, batch, padded,
                              max_batch_size if batch else 1)

    def validate_shapes(self, shapes: list[list[int]]) -> tuple[int, dict[str, int]]:
        """Check request shapes (in input order); return (rows, symbol bindings)."""
        env: dict[str, int] = {}
        for info, shape in zip(self.inputs, shapes):
            if len(shape) != len(info.shape):
                raise ProtocolError(400, f"input {info.name!r} has shape {shape}, expected rank "
                                         f"{len(info.shape)} ({_shape_text(info)})")
            for d, (want, got) in enumerate(zip(info.shape, shape)):
                s = _plain(want)
                if isinstance(want, int) and want != got:
                    raise ProtocolError(400, f"input {info.name!r} has shape {shape}, expected "
                                             f"{_shape_text(info)}: dim {d} must be {want}")
                if s is not None:
                    if got < 1:
                        raise ProtocolError(400, f"input {info.name!r} dim {d} ({s}) is {got}; "
                                                 "it must be at least 1")
                    if env.setdefault(s, got) != got:
                        raise ProtocolError(400, f"input {info.name!r} dim {d} is {got}, but {s!r}"
                                                 f" is {env[s]} in another input")
        for info, shape in zip(self.inputs, shapes):
            for d, (want, got) in enumerate(zip(info.shape, shape)):
                if isinstance(want, Sym) and _plain(want) is None:
                    try:
                        value = eval_dim(want, env)
                    except DeepseekError:
                        raise ProtocolError(400, f"input {info.name!r} dim {d} ({want}) cannot "
                                                 "be checked: the model's inputs do not bind "
                                                 "its symbols") from None
                    if value != got:
                        raise ProtocolError(400, f"input {info.name!r} dim {d} is {got}, "
                                                 f"expected {want} = {value}")
        rows = env.get(self.batch_symbol, 1) if self.batch_symbol else 1
        if rows > self.max_batch_size:
            raise ProtocolError(400, f"a request of {rows} rows exceeds the max batch size "
                                     f"{self.max_batch_size} of model {self.name!r}; split it")
        return rows, env

    def dim_symbols(self) -> list[list[str | None]]:
        """Per input, the plain symbol of each non-batch dim (None where fixed)."""
        skip = 1 if self.batch_symbol else 0
        return [[_plain(d) for d in info.shape[skip:]] for info in self.inputs]


def _shape_text(info: TensorInfo) -> str:
    return "[" + ", ".join(str(d) for d in info.shape) + "]"


def _batch_symbol(inputs: list[TensorInfo], outputs: list[TensorInfo]) -> str | None:
    firsts = {_plain(t.shape[0]) if t.shape else None for t in inputs + outputs}
    if len(firsts) != 1 or None in firsts:
        return None
    s = firsts.pop()
    rest = [d for t in inputs + outputs for d in t.shape[1:]]
    if any(isinstance(d, Sym) and s in d.symbols() for d in rest):
        return None
    return s


def _mask_symbols(inputs: list[TensorInfo], batch: str | None) -> list[str]:
    out = []
    for t in inputs:
        if MASK_HINT in t.name.lower():
            out += [s for s in map(_plain, t.shape) if s and s != batch and s not in out]
    return out


def _only_whole(symbol: str, tensors: list[TensorInfo]) -> bool:
    return not any(isinstance(d, Sym) and _plain(d) != symbol and symbol in d.symbols()
                   for t in tensors for d in t.shape)


@dataclass
class InferRequest:
    """A checked infer request: tensors in the model's input order."""

    id: str | None
    tensors: list[torch.Tensor]
    rows: int
    env: dict[str, int]
    outputs: list[tuple[int, bool]]  # (output index, binary?) in the order to answer
    deadline_ms: float | None = None
    priority: int = 0


def decode_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a gzip/deflate ``Content-Encoding`` (as tritonclient can send), bounded by ``limit``."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(415, f"Content-Encoding {encoding!r} is not supported; send gzip, "
                                 "deflate or identity")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise ProtocolError(400, f"cannot decompress the {encoding} body: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ProtocolError(413, f"the decompressed body exceeds the limit of {limit} bytes")
    return out


def parse_infer_request(body: bytes, header_length: str | None,
                        sig: ModelSignature) -> InferRequest:
    """Parse and check an infer request body against ``sig``."""
    if header_length is not None:
        try:
            hlen = int(header_length)
        except ValueError:
            hlen = -1
        if not 0 <= hlen <= len(body):
            raise ProtocolError(400, f"Inference-Header-Content-Length {header_length!r} must be "
                                     f"an integer between 0 and the body size {len(body)}")
        head, blob = body[:hlen], memoryview(body)[hlen:]
    else:
        head, blob = body, memoryview(b"")
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(400, f"malformed JSON in the request: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise ProtocolError(400, "the request must be a JSON object with an 'inputs' list "
                                 "(KServe v2 infer request)")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError(400, "'id' must be a string")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError(400, "'parameters' must be a JSON object")
    by_name = {}
    for item in req["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError(400, "each input must be an object with a 'name'")
        if item["name"] in by_name:
            raise ProtocolError(400, f"input {item['name']!r} is given twice")
        by_name[item["name"]] = item
    want = [i.name for i in sig.inputs]
    unknown = [n for n in by_name if n not in want]
    missing = [n for n in want if n not in by_name]
    if unknown or missing:
        raise ProtocolError(400, f"model {sig.name!r} takes inputs {want}"
                                 + (f"; unknown: {unknown}" if unknown else "")
                                 + (f"; missing: {missing}" if missing else ""))
    items = [by_name[n] for n in want]
    shapes = []
    for info, item in zip(sig.inputs, items):
        shape = item.get("shape")
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**31 for d in shape)):
            raise ProtocolError(400, f"input {info.name!r}: 'shape' must be a list of "
                                     "non-negative integers")
        if item.get("datatype") != info.datatype:
            raise ProtocolError(400, f"input {info.name!r} has datatype "
                                     f"{item.get('datatype')!r}, model {sig.name!r} expects "
                                     f"{info.datatype}")
        shapes.append(shape)
    rows, env = sig.validate_shapes(shapes)
    tensors, offset = [], 0
    for info, item, shape in zip(sig.inputs, items, shapes):
        t, offset = _tensor_of(info, item, shape, blob, offset)
        tensors.append(t)
    if offset != len(blob):
        raise ProtocolError(400, f"the binary part has {len(blob)} bytes but the inputs' "
                                 f"binary_data_size add up to {offset}")
    return InferRequest(rid, tensors, rows, env, _requested_outputs(req, params, sig),
                        *_schedule_params(params))


def _tensor_of(info: TensorInfo, item: dict, shape: list[int], blob: memoryview,
               offset: int) -> tuple[torch.Tensor, int]:
    numel = math.prod(shape)
    p = item.get("parameters") or {}
    if not isinstance(p, dict):
        raise ProtocolError(400, f"input {info.name!r}: 'parameters' must be an object")
    if any(k.startswith("shared_memory") for k in p):
        raise ProtocolError(400, "the shared-memory extension is not supported; send the data "
                                 "in the body")
    size = p.get("binary_data_size")
    if size is not None:
        nbytes = numel * info.dtype.itemsize
        if type(size) is not int or size != nbytes:
            raise ProtocolError(400, f"input {info.name!r}: binary_data_size is {size!r}, but "
                                     f"shape {shape} of {info.datatype} needs {nbytes} bytes")
        if "data" in item:
            raise ProtocolError(400, f"input {info.name!r} has both 'data' and binary data")
        if offset + size > len(blob):
            raise ProtocolError(400, f"input {info.name!r}: the binary part ends after "
                                     f"{len(blob) - offset} of its {size} bytes")
        raw = bytearray(blob[offset:offset + size])  # writable copy, one per input
        t = torch.frombuffer(raw, dtype=info.dtype) if size else torch.empty(0, dtype=info.dtype)
        return t.reshape(shape), offset + size
    if "data" not in item:
        raise ProtocolError(400, f"input {info.name!r} has neither 'data' nor binary_data_size")
    np_dtype = _NUMPY_FOR.get(info.dtype) or torch.empty(0, dtype=info.dtype).numpy().dtype
    try:
        arr = np.asarray(item["data"], dtype=np_dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise ProtocolError(400, f"input {info.name!r}: 'data' is not a list of "
                                 f"{info.datatype} values ({e})") from None
    if arr.size != numel:
        raise ProtocolError(400, f"input {info.name!r}: 'data' has {arr.size} values, shape "
                                 f"{shape} needs {numel}")
    return torch.from_numpy(arr.reshape(shape)).to(info.dtype), offset


def _requested_outputs(req: dict, params: dict, sig: ModelSignature) -> list[tuple[int, bool]]:
    binary_all = bool(params.get("binary_data_output", False))
    names = [o.name for o in sig.outputs]
    asked = req.get("outputs")
    if asked is None:
        return [(i, binary_all) for i in range(len(names))]
    if not isinstance(asked, list):
        raise ProtocolError(400, "'outputs' must be a list")
    out = []
    for o in asked:
        if not isinstance(o, dict) or o.get("name") not in names:
            raise ProtocolError(400, f"unknown output {o.get('name') if isinstance(o, dict) else o!r};"
                                     f" model {sig.name!r} returns {names}")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise ProtocolError(400, f"output {o['name']!r}: 'parameters' must be an object")
        if any(k.startswith("shared_memory") for k in p):
            raise ProtocolError(400, "the shared-memory extension is not supported")
        out.append((names.index(o["name"]), bool(p.get("binary_data", binary_all))))
    return out


def _schedule_params(params: dict) -> tuple[float | None, int]:
    deadline = None
    if "deadline_ms" in params:
        d = params["deadline_ms"]
        if type(d) not in (int, float) or not d > 0 or not math.isfinite(d):
            raise ProtocolError(400, f"parameters.deadline_ms must be a positive number of "
                                     f"milliseconds, got {d!r}")
        deadline = float(d)
    elif "timeout" in params:  # Triton's per-request timeout, in microseconds; 0 = none
        t = params["timeout"]
        if type(t) is not int or t < 0:
            raise ProtocolError(400, f"parameters.timeout must be a non-negative integer of "
                                     f"microseconds, got {t!r}")
        deadline = t / 1000.0 if t else None
    prio = params.get("priority", 0)
    if type(prio) is not int or prio < 0:
        raise ProtocolError(400, f"parameters.priority must be a non-negative integer (1 = most "
                                 f"urgent, 0 = default), got {prio!r}")
    return deadline, prio


def encode_infer_response(sig: ModelSignature, req: InferRequest, outputs: list[torch.Tensor],
                          parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """The response body and headers for ``outputs`` (all of the model's, in order)."""
    items, blobs = [], []
    for idx, binary in req.outputs:
        info, t = sig.outputs[idx], outputs[idx].detach().cpu().contiguous()
        item = {"name": info.name, "datatype": info.datatype, "shape": list(t.shape)}
        if binary:
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            item["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            flat = t.reshape(-1)
            if flat.dtype in (torch.float16, torch.bfloat16):
                flat = flat.float()
            item["data"] = flat.tolist()
        items.append(item)
    resp = {"model_name": sig.name, "model_version": "1", "outputs": items}
    if req.id is not None:
        resp["id"] = req.id
    if parameters:
        resp["parameters"] = parameters
    head = json.dumps(resp, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream",
                                    "inference-header-content-length": str(len(head))}


def model_metadata(sig: ModelSignature) -> dict:
    return {"name": sig.name, "versions": ["1"], "platform": "deepseek",
            "inputs": [i.to_json() for i in sig.inputs],
            "outputs": [o.to_json() for o in sig.outputs]}


def model_config(sig: ModelSignature, batch) -> dict:
    """A Triton-style model configuration (what ``get_model_config`` reads)."""
    skip = 1 if sig.batch_symbol else 0

    def dims(t: TensorInfo) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in t.shape[skip:]]

    cfg = {"name": sig.name, "platform": "deepseek", "max_batch_size":
           sig.max_batch_size if sig.batch_symbol else 0,
           "input": [{"name": i.name, "data_type": "TYPE_" + i.datatype, "dims": dims(i)}
                     for i in sig.inputs],
           "output": [{"name": o.name, "data_type": "TYPE_" + o.datatype, "dims": dims(o)}
                      for o in sig.outputs]}
    if sig.batch_symbol:
        cfg["dynamic_batching"] = {
            "preferred_batch_size": list(batch.preferred_batch_sizes),
            "max_queue_delay_microseconds": int(batch.max_queue_delay * 1e6),
            "deadline_aware": True,
            "padded_dims": {s: list(b) or "powers of two" for s, b in sig.padded.items()}}
    return cfg
