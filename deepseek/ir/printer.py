"""Print a Graph as text a person can read, one node per line.

    graph(%x: f32[batch,1,28,28]) {
      %convolution = convolution(%x, %c_weight, %c_bias, stride=[1, 1], ...)  # f32[batch,32,28,28]
      ...
      return (%addmm)
    }
"""

from __future__ import annotations

import torch

from deepseek.ir.types import Sym, dtype_name


def format_attr(value) -> str:
    if isinstance(value, Sym):
        return str(value)
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    return repr(value)


def format_node(node) -> str:
    args = [repr(v) if v is not None else "None" for v in node.inputs]
    args += [f"{k}={format_attr(v)}" for k, v in node.attrs.items()]
    outs = ", ".join(f"%{o.name}" for o in node.outputs)
    types = ", ".join(str(o.spec) for o in node.outputs)
    line = f"  {outs} = {node.kind}({', '.join(args)})  # {types}"
    if node.fallback is not None:
        line += "  [fallback]"
    if node.reuse is not None:
        line += f"  [in-place: input {node.reuse}]"
    return line


def format_graph(graph) -> str:
    params = ", ".join(f"%{v.name}: {v.spec}" for v in graph.inputs)
    lines = [f"graph({params}) {{"]
    if graph.constants:
        nbytes = sum(t.numel() * t.element_size() for t in graph.constants.values())
        lines.append(f"  # {len(graph.constants)} constants, {nbytes / 1e6:.2f} MB")
    lines += [format_node(n) for n in graph.nodes]
    lines.append(f"  return ({', '.join(f'%{v.name}' for v in graph.outputs)})")
    lines.append("}")
    return "\n".join(lines)
