"""Import an ONNX model into the Deepseek IR.

``import_onnx(path)`` reads an ONNX file (opsets 13 to the newest the installed
``onnx`` knows are the supported range; older models import where the op
handlers know the older form) and maps every node onto the existing IR ops
(``deepseek.ir.ops.Op``). One ONNX node may become several IR nodes (Gemm with
transA/alpha/beta, Resize, Slice with negative steps, LSTM...). An ONNX op
without a handler whose schema defines it as a function (Attention,
SoftmaxCrossEntropyLoss, ...) is expanded into its function body; model-local
functions likewise. Handlers live in :mod:`deepseek.frontend.onnx_ops`.

* Initializers become graph constants; external-data weights are read from
  files inside the model's folder (:mod:`deepseek.frontend.onnx_load`).
* Any node whose inputs are all constants is evaluated once at import (results
  up to 64 MB; quantize/dequantize excepted, so QDQ on weights survives).
* Symbolic dims: ``dim_param`` dims, unnamed dims, and dims named in
  ``dynamic_dims`` become :class:`~deepseek.ir.types.Sym` dims (names made
  identifiers: ``"batch size"`` -> ``batch_size``). Output shapes are then
  inferred with PyTorch's symbolic shapes (a ShapeEnv; symbols are assumed
  >= 2 where PyTorch must decide). ``Shape``/``Size`` of symbolic tensors and
  integer arithmetic on them (Gather, Slice, Concat, Unsqueeze, Squeeze, Reshape,
  Add/Sub/Mul/Div/Mod, Max/Min, comparisons, Where, ReduceProd/ReduceSum, Cast)
  are evaluated at import, so ``Shape -> Gather -> Concat -> Reshape`` chains
  become symbolic ``view``/``expand``/``full``/``arange`` attributes. Not
  supported on symbolic dims: negative-step slices, reflect/edge padding, Resize,
  equal splits (``num_outputs``), auto_pad SAME, and anything whose output shape
  depends on tensor *data* (NonZero, Unique, Compress on run-time values).
* QuantizeLinear / DequantizeLinear become the IR's quantize/dequantize ops
  (:mod:`deepseek.frontend.onnx_ops.quant`).
* Control flow is resolved at import: ``If`` on a known condition, ``Loop`` and
  ``Scan`` unrolled (:mod:`deepseek.frontend.onnx_ops.control`).

Errors: a model with unsupported ops raises one UnsupportedOpError listing
every unsupported op with its node name (``error.value_inputs`` names graph
inputs whose *values* the import would need, e.g. a Reshape's shape fed as an
input: pass them as ``input_values``). A malformed, truncated or hostile file
raises CaptureError. Nothing else escapes.

Example::

    graph = import_onnx("model.onnx", dynamic_dims={0: {0: "batch"}})
    engine = ds.compile("model.onnx", backend="cpu")
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import AttributeProto

from deepseek.errors import CaptureError, DeepseekError, UnsupportedOpError
from deepseek.frontend.onnx_functions import defined_in, rename_outer, schema_function
from deepseek.frontend.onnx_load import (DEFAULT_DOMAINS, attr_value, load_model_proto,
                                         tensor_from_proto)
from deepseek.frontend.onnx_types import SUB_BYTE, UNSIGNED_WIDE, storage_dtype
from deepseek.ir.graph import Graph, Value
from deepseek.ir.ops import Op, Prop, opdef
from deepseek.ir.types import Sym, TensorSpec

log = logging.getLogger(__name__)

MAX_FOLD_BYTES = 64 << 20  # import-time evaluation never builds constants bigger than this
MAX_TABLE_ELEMENTS = 1 << 24  # index/weight tables a handler may build at import
_QUANT = getattr(Prop, "QUANT", Prop.NONE)
MAX_FUNCTION_DEPTH = 16
_SYMBOL_HINT = 8  # the size symbolic dims are assumed to have when PyTorch must decide (never 0/1)

Handler = Callable[["NodeContext"], Sequence[Any]]
HANDLERS: dict[str, Handler] = {}


def onnx_op(*names: str):
    """Register a handler for the ONNX ops ``names`` (default domain)."""
    def deco(fn: Handler) -> Handler:
        for n in names:
            HANDLERS[n] = fn
        return fn
    return deco


def _load_handlers() -> None:
    from deepseek.frontend.onnx_ops import (control, elementwise, nn, quant, reduce, resize,  # noqa: F401
                                            rnn, tensor)


@dataclass
class SymArray:
    """A small integer tensor whose values are known at import time, some symbolic.

    ``values`` is a numpy object array of ints and ``torch.SymInt``s (e.g. the
    result of ``Shape`` on a tensor with symbolic dims).
    """

    values: np.ndarray
    dtype: torch.dtype = torch.int64

    def __post_init__(self) -> None:
        if not isinstance(self.values, np.ndarray) or self.values.dtype != object:
            v = np.empty((), dtype=object) if np.ndim(self.values) == 0 else None
            if v is not None:  # a single SymInt/int: a 0-d object array (numpy would unwrap it)
                v[()] = self.values.item() if isinstance(self.values, np.ndarray) else self.values
                self.values = v
            else:
                self.values = np.asarray(self.values, dtype=object)


def _sanitize_symbol(name: str, taken: set[str]) -> str:
    from deepseek.ir.types import _FUNCS

    s = re.sub(r"\W", "_", name) or "dim"
    if s[0].isdigit():
        s = f"d_{s}"
    if s in _FUNCS or re.fullmatch(r"[a-z]+\d+", s):  # function names; torch's own s0/u1...
        s = f"{s}_"
    base, i = s, 1
    while s in taken:
        s, i = f"{base}_{i}", i + 1
    return s


# --------------------------------------------------------------------------- #
# the importer
# --------------------------------------------------------------------------- #
class NodeContext:
    """What a handler sees of one ONNX node: its inputs, attributes and the emitters."""

    def __init__(self, imp: "OnnxImporter", node: onnx.NodeProto, opset: int, source: str):
        self.imp = imp
        self.node = node
        self.op_type = node.op_type
        self.opset = opset
        self.source = source
        self.name = node.name or (node.output[0] if node.output else node.op_type)
        self.attrs = {a.name: a for a in node.attribute}
        self.n_outputs = len(node.output)
        self.widen = False  # unsigned 16/32/64-bit inputs are read as int64 (see _import_node)
        self._wide: dict[int, Value] = {}

    # --- inputs -----------------------------------------------------------------
    @property
    def n_inputs(self) -> int:
        return len(self.node.input)

    def has(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] != ""

    def x(self, i: int) -> Value:
        """Input ``i`` as an IR Value (CaptureError if it is missing)."""
        if not self.has(i):
            raise CaptureError(f"{self.op_type} node {self.name!r} needs input {i}")
        v = self.imp.value(self.node.input[i])
        if self.widen and v.spec.dtype in UNSIGNED_WIDE:
            if i not in self._wide:
                self._wide[i] = self.imp.emit(Op.TO_COPY, [v], {"dtype": torch.int64}, self.name,
                                              self.source)[0]
            return self._wide[i]
        return v

    def logical(self, i: int) -> int | None:
        """The sub-byte ONNX element type input ``i`` holds unpacked (int4...), or None."""
        return self.imp.logical.get(id(self.imp.value(self.node.input[i]))) if self.has(i) else None

    def mark(self, v: Value, elem_type: int | None) -> Value:
        """Record that ``v`` holds values of the sub-byte ONNX type ``elem_type``."""
        if elem_type in SUB_BYTE:
            self.imp.logical[id(v)] = elem_type
        return v

    def opt(self, i: int) -> Value | None:
        return self.x(i) if self.has(i) else None

    def known(self, i: int):
        """Input ``i``'s value when known at import: a torch.Tensor, a SymArray, or None."""
        if not self.has(i):
            return None
        return self.imp.known(self.node.input[i])

    def ints(self, i: int, what: str = "") -> list:
        """A shape-like input (ints or SymInts) that must be known at import."""
        k = self.known(i)
        if k is None:
            self.imp.needs_value(self.node.input[i])
            raise UnsupportedOpError(f"input {i}{' (' + what + ')' if what else ''} is computed at "
                                     "run time; Deepseek needs it known when the model is imported "
                                     "(a constant or a shape computation)")
        if isinstance(k, SymArray):
            return [v if not isinstance(v, np.integer) else int(v) for v in k.values.reshape(-1)]
        return [int(v) for v in k.reshape(-1).tolist()]

    def scalar(self, i: int, default=None):
        """A known scalar input as a Python number (``default`` when absent)."""
        if not self.has(i):
            return default
        k = self.known(i)
        if k is None or isinstance(k, SymArray):
            self.imp.needs_value(self.node.input[i])
            raise UnsupportedOpError(f"input {i} must be known when the model is imported (a "
                                     "constant)")
        if k.numel() != 1:
            raise CaptureError(f"{self.op_type} node {self.name!r}: input {i} must be a scalar, "
                               f"has shape {list(k.shape)}")
        return k.reshape(-1)[0].item()

    # --- attributes ---------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        a = self.attrs.get(name)
        if a is None:
            return default
        return attr_value(a, f"{self.op_type} node {self.name!r}: ")

    # --- types ----------------------------------------------------------------------
    def shape(self, v: Value) -> list:
        return self.imp.shape(v)

    def rank(self, v: Value) -> int:
        return v.spec.rank

    def dtype(self, v: Value) -> torch.dtype:
        return v.spec.dtype

    def axis(self, axis: int, rank: int) -> int:
        if not -rank <= axis < max(rank, 1):
            raise CaptureError(f"{self.op_type} node {self.name!r}: axis {axis} is out of range "
                               f"for rank {rank}")
        return axis % rank if rank else 0

    # --- emitting ---------------------------------------------------------------------
    def emit(self, op: Op, inputs: list, attrs: dict | None = None):
        """Add ``op(*inputs, **attrs)``; returns its Value (or list for multi-output ops)."""
        outs = self.imp.emit(op, inputs, attrs or {}, self.name, self.source)
        return outs[0] if opdef(op).n_outputs == 1 else outs

    def const(self, value, dtype: torch.dtype | None = None) -> Value:
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return self.imp.constant(t, self.name)

    def budget(self, *sizes, what: str = "a table") -> None:
        """Refuse to build an import-time table of ``prod(sizes)`` elements if it is huge
        (the sizes come from the model: a hostile file must not make the import allocate)."""
        numel = 1
        for s in sizes:
            if not isinstance(s, (int, np.integer)):
                raise UnsupportedOpError(f"{what} needs static sizes")
            numel *= max(int(s), 0)
        if numel > MAX_TABLE_ELEMENTS:
            raise CaptureError(f"{self.op_type} node {self.name!r}: {what} of {numel} elements "
                               "would be built at import; the sizes are unreasonable")

    def fail(self, msg: str) -> UnsupportedOpError:
        return UnsupportedOpError(msg)

    def bad(self, msg: str) -> CaptureError:
        return CaptureError(f"{self.op_type} node {self.name!r}: {msg}")


class OnnxImporter:
    """Builds a Graph from a ModelProto; see :func:`import_onnx`."""

    def __init__(self, model: onnx.ModelProto, dynamic_dims: Mapping | None = None,
                 input_values: Mapping[str, torch.Tensor] | None = None):
        self.model = model
        self.dynamic_dims = dict(dynamic_dims or {})
        self.input_values = dict(input_values or {})
        self.value_inputs: set[str] = set()  # graph inputs whose values the import would need
        self.producer: dict[str, onnx.NodeProto] = {}
        self.logical: dict[int, int] = {}  # id(Value) -> sub-byte ONNX type it holds unpacked
        self.graph = Graph()
        self.env: dict[str, Value | SymArray] = {}
        self.failed: set[str] = set()
        self.unsupported: list[str] = []
        self.opsets = {o.domain or "": o.version for o in model.opset_import}
        self.opsets.setdefault("", self.opsets.get("ai.onnx", onnx.defs.onnx_opset_version()))
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.symbolic = False
        self.fake: dict[int, torch.Tensor] = {}
        self._materialized: dict[str, Value] = {}
        self._counter = 0

    # --- symbolic shapes ----------------------------------------------------------------
    def _start_symbolic(self) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        from deepseek.frontend.fx import SymbolNamer

        self.symbolic = True
        self.shape_env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.namer = SymbolNamer()
        self.symbols: dict[str, torch.SymInt] = {}

    def symint(self, name: str) -> torch.SymInt:
        if name not in self.symbols:
            from torch._dynamo.source import ConstantSource
            from torch.fx.experimental.symbolic_shapes import DimDynamic

            src = ConstantSource(f"onnx_dim_{name}")
            s = self.shape_env.create_symbol(_SYMBOL_HINT, source=src, dynamic_dim=DimDynamic.DYNAMIC)
            self.symbols[name] = self.shape_env.create_symintnode(s, hint=_SYMBOL_HINT, source=src)
            self.namer.name(str(s), name)
        return self.symbols[name]

    def to_attr(self, x):
        """Attributes for the IR: SymInts become Sym expressions, lists recursively."""
        if isinstance(x, dict):
            return {k: self.to_attr(v) for k, v in x.items()}
        if isinstance(x, torch.SymInt):
            return self.namer.dim(x)
        if isinstance(x, (list, tuple)):
            return type(x)(self.to_attr(v) for v in x)
        if isinstance(x, np.integer):
            return int(x)
        if isinstance(x, np.floating):
            return float(x)
        return x

    def abstract(self, v: Value) -> torch.Tensor:
        if self.symbolic:
            return self.fake[id(v)]
        return torch.empty(v.spec.shape, dtype=v.spec.dtype, device="meta")

    def shape(self, v: Value) -> list:
        if self.symbolic:
            return [d if not isinstance(d, torch.SymInt) or not d.node.expr.is_number
                    else int(d) for d in self.fake[id(v)].shape]
        return list(v.spec.shape)

    def _spec(self, t: torch.Tensor) -> TensorSpec:
        if self.symbolic:
            return self.namer.spec(t)
        return TensorSpec.of(t)

    # --- values ---------------------------------------------------------------------------
    def constant(self, t: torch.Tensor, hint: str = "c") -> Value:
        v = self.graph.add_constant(hint, t)
        if self.symbolic:
            with self.mode:
                self.fake[id(v)] = torch.empty(t.shape, dtype=t.dtype)
        return v

    def value(self, name: str) -> Value:
        if name not in self.env:
            raise CaptureError(f"value {name!r} is read before it is defined (the ONNX graph is "
                               "malformed or not topologically sorted)")
        v = self.env[name]
        if isinstance(v, SymArray):
            if name not in self._materialized:
                self._materialized[name] = self._materialize(v, name)
            return self._materialized[name]
        return v

    def value_of(self, v) -> Value:
        """A Value for a Value or a SymArray (materialized, or a constant when all ints)."""
        if not isinstance(v, SymArray):
            return v
        if all(isinstance(x, (int, np.integer)) for x in v.values.reshape(-1)):
            return self.constant(torch.tensor(v.values.astype(np.int64).tolist(), dtype=torch.int64)
                                 .reshape(v.values.shape).to(v.dtype), "shape")
        return self._materialize(v, "shape")

    def needs_value(self, name: str) -> None:
        """Record the graph inputs ``name`` is computed from (its value is needed at import)."""
        graph_inputs = {i.name for i in self.model.graph.input}
        todo, seen = [name], set()
        while todo and len(seen) < 10000:
            x = todo.pop()
            if x in seen or not x:
                continue
            seen.add(x)
            if x in graph_inputs and x not in self.input_values:
                self.value_inputs.add(x)
            elif x in self.producer:
                todo.extend(self.producer[x].input)

    def known(self, name: str):
        v = self.env.get(name)
        if isinstance(v, SymArray):
            return v
        if isinstance(v, Value) and self.graph.is_constant(v):
            return self.graph.constants[v.name]
        return None

    def set(self, name: str, v) -> None:
        if not name:
            return
        if isinstance(v, SymArray):
            if all(isinstance(x, (int, np.integer)) for x in v.values.reshape(-1)):
                v = self.constant(torch.tensor(v.values.astype(np.int64).tolist(),
                                               dtype=torch.int64).reshape(v.values.shape).to(v.dtype),
                                  name)
        self.env[name] = v

    def _materialize(self, s: SymArray, hint: str) -> Value:
        """Nodes that compute a symbolic SymArray at run time (full() of each symbol, cat)."""
        parts = []
        for x in s.values.reshape(-1):
            if isinstance(x, torch.SymInt):
                parts.append(self.emit(Op.FULL, [], {"size": [1], "fill_value": x, "dtype": s.dtype},
                                       hint, "shape computation")[0])
            else:
                parts.append(self.constant(torch.tensor([int(x)], dtype=s.dtype), hint))
        flat = self.emit(Op.CAT, parts, {"dim": 0}, hint, "shape computation")[0] if len(parts) != 1 \
            else parts[0]
        if list(s.values.shape) != [s.values.size]:
            flat = self.emit(Op.RESHAPE, [flat], {"shape": list(s.values.shape)}, hint,
                             "shape computation")[0]
        return flat

    # --- emitting nodes -------------------------------------------------------------------
    def _run_abstract(self, d, inputs: list, attrs: dict):
        """An op's reference kernel on abstract tensors: fake (symbolic dims) or meta."""
        abstract = [self.abstract(x) if isinstance(x, Value) else x for x in inputs]
        if self.symbolic:
            with self.mode:
                return d.reference(abstract, attrs, device="cpu")
        return d.reference(abstract, attrs, device="meta")

    def emit(self, op: Op, inputs: list, attrs: dict, hint: str, source: str) -> list[Value]:
        d = opdef(op)
        attrs = _fill_positional_defaults(d, attrs)
        ir_attrs = self.to_attr(attrs)
        try:
            out = self._run_abstract(d, inputs, attrs)
        except DeepseekError:
            raise
        except Exception as e:
            shapes = ", ".join(str(x.spec) if isinstance(x, Value) else repr(x) for x in inputs)
            raise CaptureError(f"{source}: {d.name} rejects its inputs ({shapes}) with {attrs}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        specs = [self._spec(t) for t in outs]
        values = [x for x in inputs if isinstance(x, Value)]
        # quantize/dequantize stay nodes (lowering matches QDQ on weights to integer kernels)
        if (not d.has(Prop.RANDOM) and not d.has(_QUANT) and all(self.graph.is_constant(v) for v in values)
                and all(s.is_static for s in specs) and ir_attrs == attrs_static(ir_attrs)):
            out_bytes = sum(s.nbytes() for s in specs)
            if out_bytes <= MAX_FOLD_BYTES:
                real = [self.graph.constants[x.name] if isinstance(x, Value) else x for x in inputs]
                try:
                    with torch.no_grad():
                        res = d.reference(real, attrs, device="cpu")
                except Exception as e:
                    raise CaptureError(f"{source}: {d.name} fails on its constant inputs: "
                                       f"{type(e).__name__}: {e}") from None
                res = list(res) if isinstance(res, (tuple, list)) else [res]
                return [self.constant(t.contiguous(), hint) for t in res]
        node = self.graph.add_node(op, inputs, ir_attrs, specs, name=hint, source=source)
        if self.symbolic:
            for o, t in zip(node.outputs, outs):
                self.fake[id(o)] = t
        return node.outputs

    def emit_fallback(self, target: str, inputs: list, attrs: dict, hint: str,
                      source: str) -> list[Value]:
        """A node running an ATen op outside the IR's op set through PyTorch (``fallback``).

        Used for the few ONNX ops with no IR op (Einsum, Det, 3-D GridSample); the
        CPU backend leaves such nodes to the reference kernels, and
        ``engine.report()['fallback_nodes']`` lists them.
        """
        from deepseek.ir.graph import fallback_opdef

        d = fallback_opdef(target)
        try:
            out = self._run_abstract(d, inputs, attrs)
        except Exception as e:
            raise CaptureError(f"{source}: {target} rejects its inputs: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        node = self.graph.add_node(None, inputs, self.to_attr(attrs), [self._spec(t) for t in outs],
                                   name=hint, source=source, fallback=target)
        if self.symbolic:
            for o, t in zip(node.outputs, outs):
                self.fake[id(o)] = t
        return node.outputs

    # --- the model ------------------------------------------------------------------------
    def run(self) -> Graph:
        g = self.model.graph
        init_names = {t.name for t in g.initializer}
        unknown = set(self.input_values) - {i.name for i in g.input}
        if unknown:
            raise CaptureError(f"input_values names {sorted(unknown)}, which are not graph inputs")
        for name, t in self.input_values.items():
            self.env[name] = self.constant(t, name)
        inputs = [i for i in g.input if i.name not in init_names and i.name not in self.input_values]
        shapes = [self._input_shape(k, i) for k, i in enumerate(inputs)]
        if any(isinstance(d, str) for s in shapes for d in s[1]):
            self._start_symbolic()
        for i, (dtype, shape) in zip(inputs, shapes):
            dims = tuple(Sym(d) if isinstance(d, str) else d for d in shape)
            v = self.graph.add_input(i.name or "input", TensorSpec(dims, dtype))
            self.graph.input_names.append(i.name)
            if self.symbolic:
                with self.mode:
                    self.fake[id(v)] = torch.empty([self.symint(d) if isinstance(d, str) else d
                                                    for d in shape], dtype=dtype)
            self.env[i.name] = v
            if i.type.tensor_type.elem_type in SUB_BYTE:
                self.logical[id(v)] = i.type.tensor_type.elem_type
        for t in g.initializer:
            try:
                self.env[t.name] = self.constant(tensor_from_proto(t, "initializer: "), t.name or "w")
                if t.data_type in SUB_BYTE:
                    self.logical[id(self.env[t.name])] = t.data_type
            except UnsupportedOpError as e:
                self.unsupported.append(f"initializer {t.name!r}: {e}")
                self.failed.add(t.name)
        self.import_nodes(list(g.node), {"": self.opsets[""], **self.opsets}, prefix="", depth=0)
        outputs = []
        for o in g.output:
            if o.name in self.failed:
                continue
            if o.name not in self.env:
                raise CaptureError(f"graph output {o.name!r} is never computed; the model is malformed")
            outputs.append(self.value(o.name))
        if self.unsupported:
            lines = "\n  ".join(self.unsupported)
            err = UnsupportedOpError(f"the ONNX model uses {len(self.unsupported)} unsupported "
                                     f"op(s) or attribute(s):\n  {lines}")
            err.value_inputs = sorted(self.value_inputs)  # type: ignore[attr-defined]
            raise err
        self.graph.outputs = outputs
        return self.graph

    def _input_shape(self, k: int, vi) -> tuple[torch.dtype, list]:
        where = f"graph input {vi.name!r}: "
        if not vi.type.HasField("tensor_type"):
            raise UnsupportedOpError(f"{where}only tensor inputs are supported "
                                     f"(got {vi.type.WhichOneof('value')})")
        tt = vi.type.tensor_type
        dtype = storage_dtype(tt.elem_type, where)
        if not tt.HasField("shape"):
            raise CaptureError(f"{where}the model gives no shape (not even a rank); re-export it "
                               "with shapes")
        want = self.dynamic_dims.get(k, {})
        taken = getattr(self, "_taken_syms", set())
        self._taken_syms = taken
        self._sym_names = getattr(self, "_sym_names", {})
        shape: list = []
        for d, dim in enumerate(tt.shape.dim):
            if d in want:
                shape.append(self._sym_name(str(want[d])))
            elif dim.HasField("dim_value") and dim.dim_value >= 0:
                shape.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param:
                shape.append(self._sym_name(dim.dim_param))
            else:
                shape.append(self._sym_name(f"{vi.name}_dim{d}"))
        bad = set(want) - set(range(len(tt.shape.dim)))
        if bad:
            raise CaptureError(f"dynamic_dims names dims {sorted(bad)} of input {k} ({vi.name!r}), "
                               f"which has rank {len(tt.shape.dim)}")
        return dtype, shape

    def _sym_name(self, param: str) -> str:
        if param not in self._sym_names:
            self._sym_names[param] = _sanitize_symbol(param, self._taken_syms)
            self._taken_syms.add(self._sym_names[param])
        return self._sym_names[param]

    # --- nodes ------------------------------------------------------------------------------
    def import_nodes(self, nodes: list, opsets: dict, prefix: str, depth: int) -> None:
        from deepseek.frontend.onnx_ops.symbolic import try_symbolic

        if depth > MAX_FUNCTION_DEPTH:
            raise CaptureError(f"functions nest deeper than {MAX_FUNCTION_DEPTH} levels (recursive "
                               "function definitions?)")
        for node in nodes:
            for o in node.output:
                self.producer[o] = node
            domain = node.domain or ""
            opset = opsets.get(domain if domain != "ai.onnx" else "", opsets.get("", 0))
            label = node.name or (node.output[0] if node.output else "")
            source = f"{prefix}onnx node {label!r} ({node.op_type})"
            if any(i in self.failed for i in node.input if i):
                if not self._known_op(node, opset):
                    self.unsupported.append(f"{node.op_type} (node {label!r}): no Deepseek mapping")
                self.failed.update(o for o in node.output if o)
                continue
            try:
                self._import_node(node, domain, opset, opsets, source, depth, try_symbolic)
            except UnsupportedOpError as e:
                self.unsupported.append(f"{node.op_type} (node {label!r}): {e}")
                self.failed.update(o for o in node.output if o)
            except DeepseekError as e:
                if isinstance(e, CaptureError) and str(e).startswith(prefix + "onnx node"):
                    raise
                raise CaptureError(f"{source}: {e}") from None
            except RecursionError:
                raise CaptureError(f"{source}: the model nests too deeply") from None
            except Exception as e:  # a malformed node must not crash the importer
                raise CaptureError(f"{source}: malformed or unsupported node: "
                                   f"{type(e).__name__}: {e}") from None

    def import_subgraph(self, g: onnx.GraphProto, bindings: list, opset: int, source: str,
                        depth: int = 1) -> list:
        """Import a subgraph once (an If branch, one Loop/Scan iteration).

        ``bindings`` are the values of the subgraph's inputs, in order. Every
        name the subgraph defines is renamed apart, so a body can be imported
        once per iteration; outer names stay visible. Returns its outputs.
        """
        self._nesting = getattr(self, "_nesting", 0) + 1
        try:
            return self._import_subgraph(g, bindings, opset, source)
        finally:
            self._nesting -= 1

    def _import_subgraph(self, g, bindings, opset, source):
        depth = self._nesting
        if depth > MAX_FUNCTION_DEPTH:
            raise CaptureError(f"subgraphs nest deeper than {MAX_FUNCTION_DEPTH} levels")
        self._counter += 1
        tag = f"{source}#{self._counter}/"
        inner = defined_in(g)
        body = onnx.GraphProto()
        body.CopyFrom(g)
        ren = {x: tag + x for x in inner}
        for n in body.node:
            n.input[:] = [ren.get(x, x) if x else "" for x in n.input]
            n.output[:] = [ren.get(x, x) if x else "" for x in n.output]
            for a in n.attribute:
                subs = [a.g] if a.type == AttributeProto.GRAPH else \
                    list(a.graphs) if a.type == AttributeProto.GRAPHS else []
                for sub in subs:
                    rename_outer(sub, lambda x: ren.get(x, x))
        if len(bindings) != len(body.input):
            raise CaptureError(f"{source}: the subgraph takes {len(body.input)} inputs, "
                               f"{len(bindings)} were given")
        for i, v in zip(body.input, bindings):
            self.env[ren.get(i.name, i.name)] = v
        for t in body.initializer:
            self.env[ren[t.name]] = self.constant(tensor_from_proto(t), t.name)
        self.import_nodes(list(body.node), {"": opset, **self.opsets}, prefix=f"{source} > ",
                          depth=depth)
        outs = []
        for o in body.output:
            name = ren.get(o.name, o.name)
            if name in self.failed:
                raise UnsupportedOpError("its subgraph uses unsupported ops")
            v = self.env.get(name)
            if v is None:
                raise CaptureError(f"{source}: subgraph output {o.name!r} is never computed")
            outs.append(v)
        return outs

    def _known_op(self, node, opset: int) -> bool:
        domain = node.domain or ""
        if (domain, node.op_type) in self.functions:
            return True
        if domain not in DEFAULT_DOMAINS:
            return False
        return node.op_type in HANDLERS or schema_function(node.op_type, opset) is not None

    def _import_node(self, node, domain, opset, opsets, source, depth, try_symbolic) -> None:
        if (domain, node.op_type) in self.functions:
            self._expand(node, self.functions[(domain, node.op_type)], opsets, source, depth)
            return
        if domain not in DEFAULT_DOMAINS:
            raise UnsupportedOpError(f"domain {domain!r} is not supported (only the default ONNX "
                                     "domain)")
        ctx = NodeContext(self, node, opset, source)
        handler = HANDLERS.get(node.op_type)
        if handler is None:
            fn = schema_function(node.op_type, opset)
            if fn is None:
                raise UnsupportedOpError("no Deepseek mapping")
            self._expand(node, fn(self, node), opsets, source, depth)
            return
        outs = try_symbolic(ctx)
        unsigned = None
        if outs is None:
            if node.op_type not in _UNSIGNED_NATIVE:
                unsigned = next((self.env[i].spec.dtype for i in node.input if i and
                                 isinstance(self.env.get(i), Value) and
                                 self.env[i].spec.dtype in UNSIGNED_WIDE), None)
                ctx.widen = unsigned is not None
            outs = handler(ctx)
        outs = list(outs)
        if unsigned is not None:  # unsigned values were computed in int64: narrow them back
            keep = _INDEX_OUTPUTS.get(node.op_type, ())
            outs = [self.emit(Op.TO_COPY, [v], {"dtype": unsigned}, ctx.name, source)[0]
                    if isinstance(v, Value) and v.spec.dtype == torch.int64 and k not in keep
                    else v for k, v in enumerate(outs)]
        if len(outs) < len([o for o in node.output if o]):
            raise UnsupportedOpError(f"output {len(outs)} is not supported")
        for name, v in zip(node.output, outs):
            if name and v is not None:
                self.set(name, v)

    def _expand(self, node, fn: onnx.FunctionProto, opsets: dict, source: str, depth: int) -> None:
        """Import ``node`` as the body of its function, names renamed apart."""
        self._counter += 1
        tag = f"{node.name or node.op_type}#{self._counter}/"
        rename = {}
        for formal, actual in zip(fn.input, node.input):
            rename[formal] = actual
        for formal in fn.input[len(node.input):]:
            rename[formal] = ""
        for formal, actual in zip(fn.output, node.output):
            rename[formal] = actual
        caller_attrs = {a.name: a for a in node.attribute}
        defaults = {a.name: a for a in fn.attribute_proto}
        body = []
        for n in fn.node:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            del m.input[:], m.output[:], m.attribute[:]
            m.input.extend([rename.get(i, tag + i) if i else "" for i in n.input])
            m.output.extend([rename.get(o, tag + o) if o else "" for o in n.output])
            m.name = tag + (n.name or n.op_type)
            for a in n.attribute:
                if a.type == AttributeProto.GRAPH and not a.ref_attr_name:
                    b = onnx.AttributeProto()
                    b.CopyFrom(a)
                    rename_outer(b.g, lambda x: rename.get(x, tag + x) if x else "")
                    m.attribute.append(b)
                    continue
                if a.ref_attr_name:
                    src = caller_attrs.get(a.ref_attr_name) or defaults.get(a.ref_attr_name)
                    if src is None:
                        continue
                    b = onnx.AttributeProto()
                    b.CopyFrom(src)
                    b.name = a.name
                    m.attribute.append(b)
                else:
                    m.attribute.append(a)
            body.append(m)
        inner = dict(opsets)
        inner.update({o.domain or "": o.version for o in fn.opset_import})
        self.import_nodes(body, inner, prefix=f"{source} > ", depth=depth + 1)


# ops that handle unsigned 16/32/64-bit tensors themselves; others compute them in int64
_UNSIGNED_NATIVE = {"Cast", "CastLike", "Identity", "Shape", "Size", "Constant", "BitCast",
                    "QuantizeLinear", "DequantizeLinear"}
# outputs that are int64 indices whatever the input type
_INDEX_OUTPUTS = {"ArgMax": (0,), "ArgMin": (0,), "TopK": (1,), "NonZero": (0,), "Unique": (1, 2, 3)}


def _fill_positional_defaults(d, attrs: dict) -> dict:
    """Give defaulted positional attributes before a given one their default explicitly.

    ``OpDef.call_args`` skips absent defaulted attributes, which would shift
    later positional ones (``elu(x, alpha, input_scale=...)``).
    """
    positional = [a for a in d.attr_args if not a.kwarg_only]
    given = [i for i, a in enumerate(positional) if a.name in attrs]
    if not given:
        return attrs
    out = dict(attrs)
    for a in positional[:given[-1]]:
        if a.name not in out and a.has_default:
            out[a.name] = a.default
    return out


def attrs_static(attrs):
    """``attrs`` with every Sym removed (used to test whether attrs are static)."""
    if isinstance(attrs, dict):
        return {k: attrs_static(v) for k, v in attrs.items()}
    if isinstance(attrs, (list, tuple)):
        return type(attrs)(attrs_static(v) for v in attrs)
    return None if isinstance(attrs, Sym) else attrs


def import_onnx(source: Any, dynamic_dims: Mapping[int, Mapping[int, str]] | None = None, *,
                base_dir: str | None = None,
                input_values: Mapping[str, torch.Tensor] | None = None) -> Graph:
    """Import an ONNX model (path, bytes or ModelProto) into a Deepseek Graph.

    ``dynamic_dims`` (``{input_index: {dim: "name"}}``) makes dims symbolic in
    addition to the model's own ``dim_param`` dims. ``base_dir`` is where
    external-data files live (default: the model file's folder).
    ``input_values`` (``{input name: tensor}``) fixes graph inputs to given
    values: they become constants. A model that takes a shape, axes or sizes
    as a run-time input needs this; its UnsupportedOpError then names those
    inputs in ``error.value_inputs``.

    Example::

        graph = import_onnx("resnet50.onnx")
        print(graph)
    """
    _load_handlers()
    model = load_model_proto(source, base_dir)
    try:
        return OnnxImporter(model, dynamic_dims, input_values).run()
    except DeepseekError:
        raise
    except RecursionError:
        raise CaptureError("the ONNX model nests too deeply to import") from None
    except Exception as e:  # never let a hostile model crash the caller with a foreign error
        raise CaptureError(f"cannot import the ONNX model: {type(e).__name__}: {e}") from None


__all__ = ["import_onnx", "load_model_proto", "onnx_op", "HANDLERS", "NodeContext", "SymArray",
           "tensor_from_proto"]
