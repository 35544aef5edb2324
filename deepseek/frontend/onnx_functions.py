"""ONNX functions: expanding an op into its schema's function body, and renaming the
names subgraphs read from enclosing scopes."""

from __future__ import annotations

from typing import Callable

import onnx
from onnx import AttributeProto

from deepseek.errors import UnsupportedOpError


def defined_in(g: onnx.GraphProto) -> set[str]:
    names = {i.name for i in g.input} | {t.name for t in g.initializer}
    for n in g.node:
        names.update(o for o in n.output if o)
    return names


def rename_outer(g: onnx.GraphProto, rename: Callable[[str], str]) -> None:
    """Rename, in place, the names a subgraph reads from enclosing scopes."""
    inner = defined_in(g)
    for n in g.node:
        for i, x in enumerate(n.input):
            if x and x not in inner:
                n.input[i] = rename(x)
        for a in n.attribute:
            subs = [a.g] if a.type == AttributeProto.GRAPH else \
                list(a.graphs) if a.type == AttributeProto.GRAPHS else []
            for sub in subs:
                rename_outer(sub, lambda x: x if x in inner else rename(x))
    for o in g.output:
        if o.name not in inner:
            o.name = rename(o.name)


def with_schema_defaults(fn: onnx.FunctionProto, schema) -> onnx.FunctionProto:
    """Attribute defaults of the op's schema as the function's own defaults."""
    have = {a.name for a in fn.attribute_proto}
    for name, attr in schema.attributes.items():
        if name not in have and attr.default_value.type != AttributeProto.UNDEFINED:
            d = onnx.AttributeProto()
            d.CopyFrom(attr.default_value)
            d.name = name
            fn.attribute_proto.append(d)
    return fn


def schema_function(op_type: str, opset: int):
    """A builder of ``op_type``'s function body at ``opset``, or None if it has none."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except Exception:
        return None
    if schema.has_function or schema.function_opset_versions:
        versions = schema.function_opset_versions or [schema.since_version]
        v = max([x for x in versions if x <= opset] or [min(versions)])

        def build(imp, node):
            fn = onnx.FunctionProto()
            fn.ParseFromString(schema.get_function_with_opset_version(v))
            return with_schema_defaults(fn, schema)
        return build
    if schema.has_context_dependent_function:
        versions = schema.context_dependent_function_opset_versions or [schema.since_version]
        v = max([x for x in versions if x <= opset] or [min(versions)])

        def build_ctx(imp, node):
            from deepseek.frontend.onnx_types import onnx_elem_type

            types = []
            for name in node.input:
                if not name:
                    types.append(onnx.TypeProto().SerializeToString())
                    continue
                val = imp.value(name)
                dims = [d if isinstance(d, int) else str(d) for d in val.spec.shape]
                types.append(onnx.helper.make_tensor_type_proto(
                    onnx_elem_type(val.spec.dtype), dims).SerializeToString())
            try:
                raw = schema.get_context_dependent_function_with_opset_version(
                    v, node.SerializeToString(), types)
            except Exception as e:
                raise UnsupportedOpError(f"its ONNX function body cannot be built for these "
                                         f"inputs: {e}") from None
            fn = with_schema_defaults(onnx.FunctionProto.FromString(raw), schema)
            if not fn.node:
                raise UnsupportedOpError("its ONNX function body is empty for these inputs")
            return fn
        return build_ctx
    return None
