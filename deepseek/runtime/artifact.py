"""The .dsk artifact: a zip of graph.json and weights.safetensors, never pickled.

graph.json holds ``format`` ("deepseek-graph"), ``version``, the inputs,
constants (their tensors live in weights.safetensors under the same names),
nodes, outputs, the input/output structure and the compile report. Loading
checks every field and reference and ends with the IR verifier, so a damaged
or foreign file raises ArtifactError instead of misbehaving later.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from deepseek.errors import ArtifactError, DeepseekError
from deepseek.ir.graph import Graph, Value
from deepseek.ir.ops import op_from_name
from deepseek.ir.serialize import decode_attr, encode_attr
from deepseek.ir.types import Sym, TensorSpec, dtype_from_name, dtype_name
from deepseek.ir.verify import verify
from deepseek.runtime.structure import check_structures

FORMAT = "deepseek-graph"
VERSION = 1
_MAX_JSON_BYTES = 512 << 20

# --- encoding ------------------------------------------------------------------
def _enc_spec(s: TensorSpec) -> dict:
    return {"shape": [encode_attr(d) for d in s.shape], "dtype": dtype_name(s.dtype)}


def _enc_input(x) -> Any:
    if isinstance(x, Value):
        return {"v": x.name}
    return {"lit": encode_attr(x)}


def graph_to_json(graph: Graph, report: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": torch.__version__,
        "inputs": [{"name": v.name, "spec": _enc_spec(v.spec)} for v in graph.inputs],
        "input_names": list(graph.input_names),
        "constants": [{"name": n, "spec": _enc_spec(v.spec)} for n, v in graph.const_values.items()],
        "nodes": [{
            "op": None if n.op is None else n.op.value,
            "fallback": n.fallback,
            "inputs": [_enc_input(x) for x in n.inputs],
            "attrs": {k: encode_attr(a) for k, a in n.attrs.items()},
            "outputs": [{"name": o.name, "spec": _enc_spec(o.spec)} for o in n.outputs],
            "source": n.source,
            "reuse": n.reuse,
        } for n in graph.nodes],
        "outputs": [v.name for v in graph.outputs],
        "in_structure": graph.in_structure,
        "out_structure": graph.out_structure,
        "report": report or {},
    }


def save_artifact(path: str, graph: Graph, report) -> None:
    doc = graph_to_json(graph, report.to_dict() if hasattr(report, "to_dict") else report)
    tensors = {n: t.detach().contiguous().clone() for n, t in graph.constants.items()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("graph.json", json.dumps(doc))
        z.writestr("weights.safetensors", st_save(tensors) if tensors else st_save({}))


# --- decoding --------------------------------------------------------------------
def _dec_spec(s: Any) -> TensorSpec:
    if not isinstance(s, dict) or not isinstance(s.get("shape"), list):
        raise ArtifactError(f"bad tensor spec {s!r}")
    shape = tuple(decode_attr(d) for d in s["shape"])
    if not all(isinstance(d, Sym) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
               for d in shape):
        raise ArtifactError(f"bad shape {s['shape']!r}")
    return TensorSpec(shape, dtype_from_name(s.get("dtype")))


def graph_from_json(doc: Any, tensors: dict[str, torch.Tensor]) -> tuple[Graph, dict]:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ArtifactError("not a Deepseek graph (graph.json lacks format 'deepseek-graph')")
    if doc.get("version") != VERSION:
        raise ArtifactError(f"graph format version {doc.get('version')!r} is not supported by this "
                            f"Deepseek (reads version {VERSION}); recompile the model")
    g = Graph()
    values: dict[str, Value] = {}

    def new_value(entry) -> Value:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or name in values:
            raise ArtifactError(f"bad or duplicate value name in {entry!r}")
        v = Value(name, _dec_spec(entry.get("spec")))
        g._taken.add(name)
        values[name] = v
        return v

    for e in doc.get("inputs", []):
        g.inputs.append(new_value(e))
    g.input_names = [str(n) for n in doc.get("input_names", [])]
    for e in doc.get("constants", []):
        v = new_value(e)
        t = tensors.get(v.name)
        if t is None or TensorSpec.of(t) != v.spec:
            raise ArtifactError(f"weights.safetensors lacks constant {v.name!r} or it has another "
                                "shape/dtype")
        g.constants[v.name] = t
        g.const_values[v.name] = v
    for e in doc.get("nodes", []):
        if not isinstance(e, dict):
            raise ArtifactError(f"bad node entry {e!r}")
        op = None if e.get("op") is None else op_from_name(e["op"])
        fallback = e.get("fallback")
        if (op is None) == (fallback is None):
            raise ArtifactError(f"node needs exactly one of op/fallback: {e!r}")
        inputs = []
        for x in e.get("inputs", []):
            if isinstance(x, dict) and set(x) == {"v"}:
                if x["v"] not in values:
                    raise ArtifactError(f"node input %{x['v']} is not defined before its use")
                inputs.append(values[x["v"]])
            elif isinstance(x, dict) and set(x) == {"lit"}:
                inputs.append(decode_attr(x["lit"]))
            else:
                raise ArtifactError(f"bad node input {x!r}")
        attrs = e.get("attrs", {})
        if not isinstance(attrs, dict):
            raise ArtifactError(f"bad attrs {attrs!r}")
        from deepseek.ir.graph import Node

        node = Node(op, inputs, {str(k): decode_attr(a) for k, a in attrs.items()},
                    [new_value(o) for o in e.get("outputs", [])], str(e.get("source", "")),
                    fallback if fallback is None else str(fallback))
        reuse = e.get("reuse")
        if reuse is not None and not (isinstance(reuse, int) and 0 <= reuse < len(inputs)
                                      and isinstance(inputs[reuse], Value)):
            raise ArtifactError(f"node %{node.name}: bad in-place input index {reuse!r}")
        node.reuse = reuse
        g.nodes.append(node)
    for name in doc.get("outputs", []):
        if name not in values:
            raise ArtifactError(f"graph output %{name} is not defined")
        g.outputs.append(values[name])
    g.in_structure = doc.get("in_structure")
    g.out_structure = doc.get("out_structure")
    check_structures(g.in_structure, g.out_structure, len(g.inputs), len(g.outputs))
    verify(g, check_types=False)
    return g, _check_report(doc.get("report", {}))


# the report's fields and their JSON types; anything else in a file is rejected
_REPORT_TYPES = {"passes": list, "partitions": list, "fallback_nodes": list, "bytes_moved": dict,
                 "peak_memory_bytes": dict, "arena_bytes": (int, type(None)), "nodes": dict,
                 "backend": str, "opt_level": int, "memory": dict, "precision": str}


def _check_report(report: Any) -> dict:
    if not isinstance(report, dict):
        raise ArtifactError("report must be an object")
    for k, v in report.items():
        if k in _REPORT_TYPES and not isinstance(v, _REPORT_TYPES[k]):
            raise ArtifactError(f"report field {k!r} has the wrong type")
    for p in report.get("passes", []):
        if not (isinstance(p, dict) and isinstance(p.get("name"), str)
                and all(isinstance(p.get(k), (int, float)) for k in ("nodes_before", "nodes_after",
                                                                     "seconds"))):
            raise ArtifactError("report.passes entries need name, nodes_before, nodes_after, seconds")
    for k in ("bytes_moved", "peak_memory_bytes"):
        d = report.get(k, {})
        if d and not all(isinstance(d.get(x), int) for x in ("unoptimized", "optimized")):
            raise ArtifactError(f"report.{k} needs integer unoptimized/optimized")
    nodes = report.get("nodes", {})
    if not all(isinstance(v, int) for v in nodes.values()):
        raise ArtifactError("report.nodes values must be integers")
    return {k: v for k, v in report.items() if k in _REPORT_TYPES}


def load_artifact(path: str) -> tuple[Graph, dict]:
    """Read a .dsk file; raise ArtifactError saying what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if not {"graph.json", "weights.safetensors"} <= names:
                raise ArtifactError(f"{path}: not a Deepseek artifact (needs graph.json and "
                                    f"weights.safetensors, found {sorted(names)[:5]})")
            if z.getinfo("graph.json").file_size > _MAX_JSON_BYTES:
                raise ArtifactError(f"{path}: graph.json is implausibly large")
            doc = json.loads(z.read("graph.json"))
            weights = z.read("weights.safetensors")
        try:
            tensors = st_load(weights)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ArtifactError(f"{path}: damaged weights.safetensors: {e}") from None
    except ArtifactError:
        raise
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, IsADirectoryError,
            zlib.error) as e:
        raise ArtifactError(f"{path}: not a valid .dsk (zip) file, it may be truncated: {e}") from None
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # bad JSON or safetensors
        raise ArtifactError(f"{path}: damaged .dsk file: {type(e).__name__}: {e}") from None
    try:
        return graph_from_json(doc, tensors)
    except ArtifactError:
        raise
    except (DeepseekError, TypeError, ValueError, AttributeError, KeyError) as e:
        raise ArtifactError(f"{path}: invalid graph.json: {e}") from None

