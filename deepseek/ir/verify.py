"""Check a Graph's invariants and say precisely what is wrong.

Checked: every used value is defined before its use (no dangling values, no
cycles in the node order), each value is defined once, the input count fits
the op's schema, required attributes are present, and, where shapes are
known, each node's recorded output types agree with its op's shape rule.
"""

from __future__ import annotations

from deepseek.errors import IRError
from deepseek.ir.types import Sym


def verify(graph, check_types: bool = True) -> None:
    """Raise IRError naming the first broken invariant of ``graph``."""
    from deepseek.ir.interpreter import infer_specs

    defined = {id(v) for v in graph.inputs} | {id(v) for v in graph.const_values.values()}
    names: dict[str, int] = {}
    for v in [*graph.inputs, *graph.const_values.values(), *(o for n in graph.nodes for o in n.outputs)]:
        if names.setdefault(v.name, id(v)) != id(v):  # (one value listed twice is caught below)
            raise IRError(f"value name %{v.name} is used by two values; names must be unique")
    for v in graph.const_values.values():
        if v.name not in graph.constants:
            raise IRError(f"constant value %{v.name} has no tensor in graph.constants")
    later = {id(o): n for n in graph.nodes for o in n.outputs}
    for i, node in enumerate(graph.nodes):
        where = f"node {i} (%{node.name} = {node.kind}, from {node.source or 'unknown source'})"
        d = node.opdef
        for v in node.input_values():
            if id(v) not in defined:
                if id(v) in later:
                    raise IRError(f"{where}: input %{v.name} is defined later: the node order has a cycle "
                                  "or is not topological")
                raise IRError(f"{where}: input %{v.name} is dangling (never defined in this graph)")
        n_fixed = sum(1 for a in d.tensor_args if a.kind in ("tensor", "optional"))
        has_list = any(a.kind in ("list", "optional_list") for a in d.tensor_args)
        if len(node.inputs) < n_fixed or (not has_list and len(node.inputs) != n_fixed):
            raise IRError(f"{where}: {d.name} takes {n_fixed}{'+' if has_list else ''} tensor inputs, "
                          f"got {len(node.inputs)}")
        for a in d.attr_args:
            if not a.has_default and a.name not in node.attrs and a.name not in ("layout", "device",
                                                                                  "pin_memory"):
                raise IRError(f"{where}: missing attribute {a.name!r}")
        if d.n_outputs >= 0 and len(node.outputs) != d.n_outputs:
            raise IRError(f"{where}: {d.name} has {d.n_outputs} outputs, node has {len(node.outputs)}")
        for o in node.outputs:
            if id(o) in defined:
                raise IRError(f"{where}: value %{o.name} is defined twice")
            defined.add(id(o))
        if check_types and node.fallback is None:
            _check_types(node, where, infer_specs)
    for v in graph.outputs:
        if id(v) not in defined:
            raise IRError(f"graph output %{v.name} is dangling (never defined in this graph)")


def _check_types(node, where, infer_specs) -> None:
    specs = [v.spec for v in node.input_values()] + [o.spec for o in node.outputs]
    if any(not s.is_static for s in specs) or any(isinstance(a, Sym) for a in node.attrs.values()):
        return  # symbolic shapes are checked per concrete plan
    try:
        got = infer_specs(node, {})
    except Exception as e:  # the op's own error says what is wrong with its inputs
        raise IRError(f"{where}: the op rejects its inputs: {e}") from None
    for o, s in zip(node.outputs, got):
        if o.spec != s and 0 not in o.spec.shape:  # meta kernels size unused stats outputs
            raise IRError(f"{where}: output %{o.name} is recorded as {o.spec} but the op produces {s}")
