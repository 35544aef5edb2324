"""Graph passes and the pipelines that order them by ``opt_level``.

Each pass is a function ``Graph -> Graph`` whose docstring states its rewrite.
``run_passes`` instruments them: timing, node counts, an optional IR dump
(``DEEPSEEK_DUMP_IR=1``) and verification after each pass in debug mode
(``DEEPSEEK_VERIFY=1``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from deepseek.ir.graph import Graph
from deepseek.ir.verify import verify
from deepseek.passes.cse import eliminate_common_subexpr
from deepseek.passes.fusion import (fuse_add_layer_norm, fuse_conv_bn, fuse_elementwise,
                                     fuse_rms_norm, merge_sibling_gemms)
from deepseek.passes.layout import space_to_depth_stem
from deepseek.passes.memory import reorder_for_memory, schedule_inplace_ops
from deepseek.passes.precision import (PRECISION_DTYPES, map_to_fp8, map_to_tensorcore,
                                       pad_gemm_dims)
from deepseek.passes.recompute import activate_recompute
from deepseek.passes.simplify import (eliminate_dead_code, fold_constants,
                                      precompute_attention_masks, simplify_algebra,
                                      use_causal_attention)
from deepseek.quantization.lowering import has_qdq, lower_quantized_ops

log = logging.getLogger(__name__)

Pass = Callable[[Graph], Graph]

PIPELINES: dict[int, list[Pass]] = {
    0: [],
    1: [eliminate_dead_code, fold_constants, simplify_algebra, schedule_inplace_ops],
    2: [
        # stage 1: fusion and clean-up
        eliminate_dead_code, fold_constants, simplify_algebra, eliminate_common_subexpr,
        fuse_conv_bn, merge_sibling_gemms, use_causal_attention, eliminate_dead_code,
        precompute_attention_masks,
        fuse_add_layer_norm, fuse_rms_norm, fuse_elementwise,
        # stage 2: memory
        reorder_for_memory, schedule_inplace_ops,
    ],
}
PIPELINES[3] = PIPELINES[2]


@dataclass
class PassRecord:
    name: str
    nodes_before: int
    nodes_after: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# Passes that run only where the graph calls for them: (pass, predicate on the graph).
# Lowering runs first, before constant folding could turn int8 weights back into float.
CONDITIONAL_PASSES: list[tuple[Pass, Callable[[Graph], bool]]] = [(lower_quantized_ops, has_qdq)]


# the first of these passes runs on the graph in its final precision
_AFTER_PRECISION = frozenset({"precompute_attention_masks", "fuse_add_layer_norm", "fuse_rms_norm",
                              "fuse_elementwise", "reorder_for_memory", "schedule_inplace_ops"})
PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "int8", "fp8")


def hardware_passes(target: str, precision: str) -> list[Pass]:
    """Stage 3 for a device type ("cpu", "cuda") and a precision: ``map_to_tensorcore``
    for bf16/fp16 (fp8: bf16, then ``map_to_fp8`` puts the GEMMs in fp8) and, on CUDA,
    ``pad_gemm_dims`` and ``space_to_depth_stem`` (every precision; it recasts float
    convolutions). fp32, tf32 and int8
    need no precision rewrite (tf32 is a setting of the backend's matmuls while it runs;
    int8 comes from a quantized graph's QDQ nodes)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    layout = [space_to_depth_stem] if target == "cuda" else []
    if precision not in PRECISION_DTYPES and precision != "fp8":
        return layout
    lower = functools.partial(map_to_tensorcore, target=target,
                              precision="bf16" if precision == "fp8" else precision)
    lower.__name__ = "map_to_tensorcore"
    return [lower] + ([pad_gemm_dims] if target == "cuda" else []) + layout + \
        ([map_to_fp8] if precision == "fp8" else [])


_HARDWARE_PASSES = ("map_to_tensorcore", "pad_gemm_dims", "space_to_depth_stem", "map_to_fp8")


def pipeline(opt_level: int, graph: Graph | None = None, target: str = "cpu",
             precision: str = "fp32") -> list[Pass]:
    """The passes of ``opt_level``; given ``graph``, preceded by the conditional passes it
    needs; with a reduced ``precision``, stage 3 (``hardware_passes``) after the clean-up
    (weights folded in float32) and before fusion (which then sees the final dtypes)."""
    if opt_level not in PIPELINES:
        raise ValueError(f"opt_level must be one of {sorted(PIPELINES)}, got {opt_level!r}")
    passes = list(PIPELINES[opt_level])
    if graph is not None and opt_level != 0:
        passes = [p for p, wanted in CONDITIONAL_PASSES if wanted(graph)] + passes
    at = next((i for i, p in enumerate(passes) if p.__name__ in _AFTER_PRECISION), len(passes))
    passes[at:at] = hardware_passes(target, precision)
    return passes


def run_passes(graph: Graph, passes: Iterable[Pass], disabled: Iterable[str] = ()) -> tuple[Graph, list[PassRecord]]:
    """Run ``passes`` in order (skipping names in ``disabled``); returns the graph and records."""
    skip = set(disabled)
    unknown = skip - {p.__name__ for ps in PIPELINES.values() for p in ps} \
        - set(_HARDWARE_PASSES) \
        - {p.__name__ for p, _ in CONDITIONAL_PASSES}
    if unknown:
        raise ValueError(f"disable_passes names unknown passes {sorted(unknown)}")
    records = []
    check = os.environ.get("DEEPSEEK_VERIFY") == "1"
    dump = os.environ.get("DEEPSEEK_DUMP_IR") == "1"
    for p in passes:
        if p.__name__ in skip:
            continue
        before = len(graph.nodes)
        t0 = time.perf_counter()
        graph = p(graph)
        records.append(PassRecord(p.__name__, before, len(graph.nodes), time.perf_counter() - t0))
        if check:
            verify(graph)
        if dump:
            log.info("IR after %s:\n%s", p.__name__, graph)
    return graph, records


def optimize_graph(graph: Graph, memory_budget: int | None = None, target: str = "cpu",
                   opt_level: int = 2, precision: str = "fp32") -> Graph:
    """The three-stage pipeline of ``opt_level`` applied to ``graph`` (returned).

    Stage 3 maps the graph to ``target``'s hardware ("cpu", "cuda", "cuda:1") in
    ``precision``: bf16/fp16 data flow between the tensor-core ops (norms,
    softmax and reductions accumulate in float32) and, on CUDA, GEMM columns
    padded to the tensor cores' multiple; in fp32 it has nothing to rewrite.
    With ``memory_budget`` (bytes), ``activate_recompute`` then brings peak
    live memory within it (after common-subexpression elimination, which would
    merge the recomputed copies back); it raises MemoryBudgetError when it
    cannot. Compile the result with ``opt_level=0``: it is already optimized.
    """
    device_type = str(target).split(":")[0]
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"target must be 'cpu' or 'cuda' (a device, e.g. 'cuda:0'), "
                         f"got {target!r}")
    graph = run_passes(graph, pipeline(opt_level, graph, device_type, precision))[0]
    if memory_budget is not None:
        graph = activate_recompute(graph, memory_budget)
    return graph


__all__ = ["space_to_depth_stem", "fuse_conv_bn", "merge_sibling_gemms", "fuse_add_layer_norm", "fuse_rms_norm", "precompute_attention_masks", "use_causal_attention", "fuse_elementwise", "fold_constants", "eliminate_dead_code", "simplify_algebra",
           "eliminate_common_subexpr", "reorder_for_memory", "schedule_inplace_ops", "map_to_tensorcore", "pad_gemm_dims", "map_to_fp8", "activate_recompute",
           "run_passes",
           "pipeline", "hardware_passes", "PRECISIONS", "optimize_graph", "PassRecord", "PIPELINES"]
