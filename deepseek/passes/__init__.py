"""Graph passes and the pipelines that order them by ``opt_level``.

Each pass is a function ``Graph -> Graph`` whose docstring states its rewrite.
``run_passes`` instruments them: timing, node counts, an optional IR dump
(``DEEPSEEK_DUMP_IR=1``) and verification after each pass in debug mode
(``DEEPSEEK_VERIFY=1``).
"""

from __future__ import annotations

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
from deepseek.passes.memory import reorder_for_memory, schedule_inplace_ops
from deepseek.passes.precision import map_to_fp8, map_to_tensorcore, pad_gemm_dims
from deepseek.passes.recompute import activate_recompute
from deepseek.passes.simplify import (eliminate_dead_code, fold_constants,
                                      precompute_attention_masks, simplify_algebra)
from deepseek.quantization.lowering import has_qdq, lower_quantized_ops

log = logging.getLogger(__name__)

Pass = Callable[[Graph], Graph]

PIPELINES: dict[int, list[Pass]] = {
    0: [],
    1: [eliminate_dead_code, fold_constants, simplify_algebra, schedule_inplace_ops],
    2: [
        # stage 1: fusion and clean-up
        eliminate_dead_code, fold_constants, simplify_algebra, eliminate_common_subexpr,
        fuse_conv_bn, merge_sibling_gemms, eliminate_dead_code, precompute_attention_masks,
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


def pipeline(opt_level: int, graph: Graph | None = None) -> list[Pass]:
    """The passes of ``opt_level``; given ``graph``, preceded by the conditional passes it needs."""
    if opt_level not in PIPELINES:
        raise ValueError(f"opt_level must be one of {sorted(PIPELINES)}, got {opt_level!r}")
    if graph is None or opt_level == 0:
        return PIPELINES[opt_level]
    return [p for p, wanted in CONDITIONAL_PASSES if wanted(graph)] + PIPELINES[opt_level]


def run_passes(graph: Graph, passes: Iterable[Pass], disabled: Iterable[str] = ()) -> tuple[Graph, list[PassRecord]]:
    """Run ``passes`` in order (skipping names in ``disabled``); returns the graph and records."""
    skip = set(disabled)
    unknown = skip - {p.__name__ for ps in PIPELINES.values() for p in ps} \
        - {"map_to_tensorcore", "pad_gemm_dims", "map_to_fp8"} \
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
                   opt_level: int = 2) -> Graph:
    """The optimization pipeline of ``opt_level`` applied to ``graph`` (returned).

    With ``memory_budget`` (bytes), ``activate_recompute`` then brings peak
    live memory within it (after common-subexpression elimination, which would
    merge the recomputed copies back); it raises MemoryBudgetError when it
    cannot. ``target`` is accepted for the hardware stage, which this version
    leaves to ``compile``'s ``precision``. Compile the result with
    ``opt_level=0``: it is already optimized.
    """
    graph = run_passes(graph, pipeline(opt_level, graph))[0]
    if memory_budget is not None:
        graph = activate_recompute(graph, memory_budget)
    return graph


__all__ = ["fuse_conv_bn", "merge_sibling_gemms", "fuse_add_layer_norm", "fuse_rms_norm", "precompute_attention_masks", "fuse_elementwise", "fold_constants", "eliminate_dead_code", "simplify_algebra",
           "eliminate_common_subexpr", "reorder_for_memory", "schedule_inplace_ops", "map_to_tensorcore", "pad_gemm_dims", "map_to_fp8", "activate_recompute",
           "run_passes",
           "pipeline", "optimize_graph", "PassRecord", "PIPELINES"]
