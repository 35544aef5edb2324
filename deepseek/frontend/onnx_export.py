"""Export a Deepseek Graph to ONNX.

``export_onnx(graph, path, opset=17)`` writes a model that
``onnx.checker.check_model(model, full_check=True)`` accepts and ONNX Runtime
runs with the same outputs. Each IR op maps to one or a few ONNX nodes
(:mod:`deepseek.frontend.onnx_export_ops`); ops newer than the target opset
(LayerNormalization before 17, Gelu before 20, ...) are decomposed.

* Constants become initializers (external data files when the model would
  pass protobuf's 2 GB limit).
* Symbolic dims become ``dim_param``s named like the symbols; attributes that
  depend on them (``view`` sizes, ``slice`` ends, ``full`` sizes...) become
  shape computations (``Shape`` -> ``Gather`` -> arithmetic -> ``Concat``).
* Type promotion is explicit: ONNX needs equal operand types, so operands are
  cast to the type the op computes in, as PyTorch would promote them.
* Quantize/dequantize nodes export as QuantizeLinear/DequantizeLinear (QDQ).

An IR op without a mapping raises one UnsupportedOpError listing every such
node.

Example::

    engine = ds.compile(model, (x,))
    engine.export_onnx("model.onnx")            # or export_onnx(graph, "model.onnx", opset=18)
"""

from __future__ import annotations

import ast
import logging
import os
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from deepseek.errors import DeepseekError, UnsupportedOpError
from deepseek.frontend.onnx_types import onnx_elem_type, torch_to_numpy
from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.ops import Op
from deepseek.ir.types import Sym, TensorSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 13
_LARGE_MODEL_BYTES = 1_800_000_000  # protobuf refuses messages of 2 GB and more

Exporter = Callable[["ExportContext", Node], list]
EXPORTERS: dict[Op, Exporter] = {}


def exports(*ops: Op):
    """Register an exporter for IR ops; it returns the ONNX names of the node's outputs."""
    def deco(fn: Exporter) -> Exporter:
        for op in ops:
            EXPORTERS[op] = fn
        return fn
    return deco


def _load_exporters() -> None:
    from deepseek.frontend import onnx_export_nn, onnx_export_ops, onnx_export_tensor  # noqa: F401


class ExportContext:
    """The ONNX graph under construction: nodes, initializers and value names."""

    def __init__(self, graph: Graph, opset: int):
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.names: dict[int, str] = {}
        self.taken: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._sym_cache: dict[str, str] = {}
        self.current: Node | None = None

    # --- names ----------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        hint = hint or "v"
        name, i = hint, 0
        while name in self.taken:
            i += 1
            name = f"{hint}_{i}"
        self.taken.add(name)
        return name

    def name(self, v: Value) -> str:
        try:
            return self.names[id(v)]
        except KeyError:
            raise DeepseekError(f"value %{v.name} is used before it is defined") from None

    # --- building -------------------------------------------------------------------------
    def add(self, op_type: str, inputs: list, n_out: int = 1, outputs: list[str] | None = None,
            **attrs) -> list[str]:
        """Append a node; ``inputs`` are ONNX names ('' for a missing optional input)."""
        hint = self.current.outputs[0].name if self.current is not None and self.current.outputs \
            else op_type.lower()
        outs = outputs or [self.fresh(f"{hint}_{op_type.lower()}") for _ in range(n_out)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs,
                                           name=self.fresh(f"{op_type}_{hint}"), **attrs))
        return outs

    def one(self, op_type: str, inputs: list, **attrs) -> str:
        return self.add(op_type, inputs, 1, **attrs)[0]

    def initializer(self, t: torch.Tensor, hint: str) -> str:
        name = self.fresh(hint)
        arr = torch_to_numpy(t)
        proto = onnx.numpy_helper.from_array(np.ascontiguousarray(arr) if arr.ndim else arr, name)
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            proto.data_type = onnx_elem_type(t.dtype)
        self.initializers.append(proto)
        return name

    def const(self, value, dtype: torch.dtype) -> str:
        """A small constant (deduplicated): a Python number or list, of ``dtype``."""
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)
        t = t.to(dtype)
        key = (str(dtype), tuple(t.shape), tuple(t.reshape(-1).tolist())) if t.numel() <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self.initializer(t, "const")
        if key is not None:
            self._consts[key] = name
        return name

    def i64(self, values: list) -> str:
        """A 1-D int64 tensor of ints and Syms (computed from the inputs' shapes if symbolic)."""
        if all(isinstance(v, int) for v in values):
            return self.const([int(v) for v in values], torch.int64)
        parts = [self.sym([v]) if isinstance(v, Sym) else self.const([int(v)], torch.int64)
                 for v in values]
        return self.one("Concat", parts, axis=0)

    def scalar_i64(self, v) -> str:
        """A 0-d int64 tensor of an int or Sym."""
        if isinstance(v, int):
            return self.const(v, torch.int64)
        return self.one("Squeeze", [self.sym([v]), self.const([0], torch.int64)])

    def sym(self, v: list) -> str:
        """A [1] int64 tensor computing the Sym ``v[0]`` from the graph inputs' shapes."""
        expr = v[0].expr
        if expr not in self._sym_cache:
            tree = ast.parse(expr, mode="eval").body
            self._sym_cache[expr] = self._sym_expr(tree)
        return self._sym_cache[expr]

    def _sym_expr(self, t) -> str:
        if isinstance(t, ast.Name):
            return self._symbol(t.id)
        if isinstance(t, ast.Constant):
            return self.const([int(t.value)], torch.int64)
        if isinstance(t, ast.UnaryOp):
            return self.one("Neg", [self._sym_expr(t.operand)])
        if isinstance(t, ast.BinOp):
            a, b = self._sym_expr(t.left), self._sym_expr(t.right)
            if isinstance(t.op, ast.Pow):
                out = a
                for _ in range(int(t.right.value) - 1):
                    out = self.one("Mul", [out, a])
                return out if int(t.right.value) else self.const([1], torch.int64)
            if isinstance(t.op, ast.FloorDiv):
                return self._floordiv(a, b)
            if isinstance(t.op, ast.Mod):
                return self.one("Mod", [a, b], fmod=0)
            op = {ast.Add: "Add", ast.Sub: "Sub", ast.Mult: "Mul"}[type(t.op)]
            return self.one(op, [a, b])
        if isinstance(t, ast.Call):
            args = [self._sym_expr(a) for a in t.args]
            f = t.func.id
            if f in ("Max", "Min"):
                return self.one(f, args)
            if f in ("FloorDiv",):
                return self._floordiv(*args)
            if f == "CeilDiv":
                neg = self.one("Neg", [args[0]])
                return self.one("Neg", [self._floordiv(neg, args[1])])
            if f in ("Mod", "PythonMod"):
                return self.one("Mod", args, fmod=0)
            if f == "Abs":
                return self.one("Abs", args)
        raise UnsupportedOpError(f"symbolic expression {ast.dump(t)} cannot be exported")

    def _floordiv(self, a: str, b: str) -> str:
        rem = self.one("Mod", [a, b], fmod=0)
        return self.one("Div", [self.one("Sub", [a, rem]), b])

    def _symbol(self, name: str) -> str:
        """The size a symbol stands for: a dim of a graph input, or else of a value already
        computed (a partition of a larger graph may not see the input that defines it)."""
        defined = list(self.graph.inputs) + [o for n in self.graph.nodes for o in n.outputs
                                             if id(o) in self.names]
        for v in defined:
            for d, dim in enumerate(v.spec.shape):
                if isinstance(dim, Sym) and dim.expr == name:
                    shape = self.one("Shape", [self.name(v)])
                    return self.one("Gather", [shape, self.const([d], torch.int64)], axis=0)
        raise UnsupportedOpError(f"symbol {name!r} is no dim of a graph input or computed value; "
                                 "it cannot be computed in the exported model")

    # --- typed operands -------------------------------------------------------------------
    def cast(self, name: str, src: torch.dtype, dst: torch.dtype) -> str:
        if src == dst:
            return name
        return self.one("Cast", [name], to=onnx_elem_type(dst))

    def operand(self, x, dtype: torch.dtype) -> str:
        """An input (Value or Python scalar) as an ONNX name of ``dtype``."""
        if isinstance(x, Value):
            return self.cast(self.name(x), x.spec.dtype, dtype)
        if isinstance(x, Sym):
            return self.cast(self.scalar_i64(x), torch.int64, dtype)
        if x is None:
            raise UnsupportedOpError("a missing tensor operand cannot be exported")
        return self.const(x, dtype)

    def shape_of(self, v: Value) -> list:
        return list(v.spec.shape)


def _value_info(name: str, spec: TensorSpec) -> onnx.ValueInfoProto:
    dims = [d if isinstance(d, int) else str(d) for d in spec.shape]
    return helper.make_tensor_value_info(name, onnx_elem_type(spec.dtype), dims)


def _folded_layouts(graph: Graph) -> dict[int, torch.Tensor]:
    """{id(node): its result} for each transpose (``permute``, ``t``, ``transpose``) of a
    constant that nothing else reads: the constant is written already transposed, so a
    linear's weight reaches its Gemm/MatMul as an initializer (as tools that rewrite ONNX
    files, e.g. ONNX Runtime's ``quantize_dynamic``, expect) and no Transpose runs."""
    readers: dict[int, int] = {}
    for n in graph.nodes:
        for x in n.input_values():
            readers[id(x)] = readers.get(id(x), 0) + 1
    outputs = {id(x) for x in graph.outputs}
    folded = {}
    for n in graph.nodes:
        if n.op not in (Op.PERMUTE, Op.T, Op.TRANSPOSE_INT) or n.fallback is not None:
            continue
        x = n.inputs[0]
        if not isinstance(x, Value) or not graph.is_constant(x) or readers[id(x)] != 1 \
                or id(x) in outputs:
            continue
        try:
            folded[id(n)] = n.opdef.reference([graph.constants[x.name]], n.attrs).contiguous()
        except Exception:  # noqa: BLE001 - left to the Transpose exporter
            continue
    return folded


def _valid_name(name: str) -> bool:
    return bool(name) and name.isprintable()


def to_onnx(graph: Graph, opset: int | None = None, *, check: bool = True,
            graph_name: str = "deepseek") -> onnx.ModelProto:
    """The ONNX ModelProto of ``graph`` (checked by onnx.checker unless ``check`` is False)."""
    _load_exporters()
    opset = DEFAULT_OPSET if opset is None else int(opset)
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise DeepseekError(f"opset {opset} is not supported: give {MIN_OPSET} to {newest} "
                            f"(this onnx {onnx.__version__})")
    ctx = ExportContext(graph, opset)
    inputs = []
    for i, v in enumerate(graph.inputs):
        want = graph.input_names[i] if i < len(graph.input_names) else v.name
        name = ctx.fresh(want if _valid_name(want) else v.name)
        ctx.names[id(v)] = name
        inputs.append(_value_info(name, v.spec))
    folded = _folded_layouts(graph)
    used = {id(x) for n in graph.nodes if id(n) not in folded for x in n.input_values()} | \
        {id(x) for x in graph.outputs}
    for cname, v in graph.const_values.items():
        if id(v) in used:  # unused weights (BatchNorm's num_batches_tracked...) are left out
            ctx.names[id(v)] = ctx.initializer(graph.constants[cname], cname)
    unsupported = []
    for node in graph.nodes:
        if id(node) in folded:  # a constant's transpose: stored transposed
            ctx.names[id(node.outputs[0])] = ctx.initializer(folded[id(node)],
                                                            node.inputs[0].name)
            continue
        ctx.current = node
        fn = EXPORTERS.get(node.op) if node.fallback is None else \
            EXPORTERS.get(("fallback", node.fallback))  # type: ignore[call-overload]
        if fn is None:
            unsupported.append(f"%{node.name} = {node.kind} (from {node.source or 'unknown source'})")
            for o in node.outputs:
                ctx.names[id(o)] = ctx.fresh(o.name)
            continue
        try:
            outs = fn(ctx, node)
        except UnsupportedOpError as e:
            unsupported.append(f"%{node.name} = {node.kind}: {e}")
            outs = [ctx.fresh(o.name) for o in node.outputs]
        for o, name in zip(node.outputs, outs):
            if name is not None:
                ctx.names[id(o)] = name
    ctx.current = None
    if unsupported:
        raise UnsupportedOpError(f"{len(unsupported)} node(s) have no ONNX export (opset {opset}):\n  "
                                 + "\n  ".join(unsupported))
    outputs, used = [], set()
    fixed = {t.name for t in ctx.initializers} | {ctx.name(x) for x in graph.inputs}
    for i, v in enumerate(graph.outputs):
        name = ctx.name(v)
        if name in used or name in fixed:  # an output must be a node's own, distinct output
            name = ctx.add("Identity", [name], outputs=[ctx.fresh(f"output_{i}")])[0]
        used.add(name)
        outputs.append(_value_info(name, v.spec))
    g = helper.make_graph(ctx.nodes, graph_name, inputs, outputs, ctx.initializers)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(g, opset_imports=opsets, producer_name="deepseek",
                              ir_version=helper.find_min_ir_version_for(opsets))
    if check:
        _check(model)
    return model


def _check(model: onnx.ModelProto) -> None:
    try:
        if model.ByteSize() < _LARGE_MODEL_BYTES:
            onnx.checker.check_model(model, full_check=True)
        else:  # the checker takes a path for models past protobuf's in-memory limit
            onnx.checker.check_model(model, full_check=False)
    except Exception as e:
        raise DeepseekError(f"the exported ONNX model fails onnx.checker (a Deepseek bug; please "
                            f"report it): {type(e).__name__}: {e}") from None


def export_onnx(graph: Graph, path: str, opset: int | None = None) -> str:
    """Write ``graph`` as an ONNX model at ``path`` (opset 17 unless given); returns the path.

    Weights go into ``<path>.data`` next to the model when they would pass
    protobuf's 2 GB limit.
    """
    model = to_onnx(graph, opset, check=False)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if size < _LARGE_MODEL_BYTES:
        _check(model)
        onnx.save_model(model, path)
    else:
        location = os.path.basename(path) + ".data"
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
        onnx.checker.check_model(path, full_check=True)
    return path


__all__ = ["export_onnx", "to_onnx", "exports", "ExportContext", "DEFAULT_OPSET", "EXPORTERS",
           "TensorProto"]
