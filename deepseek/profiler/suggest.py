"""Suggestions: which optimization applies to what the profile found.

Each rule reads the graph, the measured operators and the device's peaks
and returns zero or more suggestions, each a dict::

    {"kind": "ew_chain_not_fused", "severity": "high", "share": 12.5,
     "title": "...", "detail": "...", "fix": "...", "nodes": ["mul", "add"]}

``share`` is the percentage of operator time the suggestion is about
(its ceiling on the saving). Severity: ``high`` at a hotspot's share or
more, ``medium`` above 1%, else ``low``; a fallback inside a GPU graph and
host synchronization are always ``high``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from deepseek.ir.graph import Node, Value
from deepseek.ir.ops import Op, Prop

BANDWIDTH_FLOOR_PCT = 25.0  # a memory-bound hotspot under this % of peak GB/s gets a suggestion
OVERHEAD_PCT = 25.0  # wall time not spent in any node above this % gets a note
# rewrites with supported ops for common ATen ops that have no Deepseek kernel
KNOWN_REWRITES = {
    "aten.erfc.default": "1 - torch.erf(x)",
    "aten.special_erfc.default": "1 - torch.erf(x)",
    "aten.log_sigmoid_forward.default": "-torch.nn.functional.softplus(-x)",
    "aten.xlog1py.default": "x * torch.log1p(y)",
    "aten.sinc.default": "torch.where(x == 0, 1, torch.sin(pi * x) / (pi * x))",
}


@dataclass
class Context:
    prof: Any  # the Profile
    ops: list[dict]  # report rows, sorted by time
    peaks_for: Callable
    meta: dict
    kernel_map: dict


def _severity(share: float, hotspot: float) -> str:
    return "high" if share >= hotspot else "medium" if share >= 1.0 else "low"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} KB"


def _suggestion(kind: str, share: float, hotspot: float, title: str, detail: str, fix: str,
                nodes: list[str], severity: str | None = None) -> dict:
    return {"kind": kind, "severity": severity or _severity(share, hotspot), "share": share,
            "title": title, "detail": detail, "fix": fix, "nodes": nodes}


def batch_norm_not_folded(ctx: Context) -> list[dict]:
    graph = ctx.prof.engine.graph
    producers = graph.producers()
    rows = {r["name"]: r for r in ctx.ops}
    hits = [bn for bn in graph.nodes if bn.op is Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING
            and isinstance(bn.inputs[0], Value)
            and getattr(producers.get(bn.inputs[0]), "op", None) is Op.CONVOLUTION]
    if not hits:
        return []
    share = sum(rows[n.name]["share"] for n in hits if n.name in rows)
    moved = sum(rows[n.name]["bytes"] for n in hits if n.name in rows)
    passes = [p.get("name") for p in ctx.prof.engine.report().passes]
    why = ("fuse_conv_bn ran but left them: the convolution's output has another reader, or the "
           "weights or statistics are not constants" if "fuse_conv_bn" in passes else
           "fuse_conv_bn did not run (opt_level below 2, or disable_passes named it)")
    return [_suggestion(
        "bn_not_folded", share, ctx.meta["hotspot_share"],
        f"batch norm not folded into its convolution ({len(hits)} node(s))",
        f"{len(hits)} inference batch norm(s) run as separate kernels after their convolution: "
        f"{share:.1f}% of the time and {_mb(moved)} moved per call; {why}.",
        "Compile with opt_level>=2 and without disable_passes=['fuse_conv_bn']: the pass folds "
        "each batch norm into its convolution's weight and bias (exact for inference).",
        [n.name for n in hits])]


def elementwise_chains(ctx: Context) -> list[dict]:
    graph = ctx.prof.engine.graph
    rows = {r["name"]: r for r in ctx.ops}
    hot = ctx.meta["hotspot_share"]
    users = graph.users()
    chains: list[list[Node]] = []
    current: list[Node] = []
    tail = None  # the value the chain's last node produced (through views)
    for n in graph.nodes:
        r = rows.get(n.name)
        if n.fallback is None and n.opdef.has(Prop.VIEW) and tail is not None \
                and n.inputs and n.inputs[0] is tail:
            tail = n.outputs[0]  # a reshape between two element-wise ops moves nothing
            continue
        ew = (n.fallback is None and n.opdef.has(Prop.ELEMENTWISE) and r is not None
              and r["fused_into"] is None)
        if ew and current and tail is not None and tail in n.input_values() \
                and len(users.get(tail, [])) == 1:
            current.append(n)
        else:
            if len(current) >= 2:
                chains.append(current)
            current = [n] if ew else []
        tail = n.outputs[0] if ew else None
    if len(current) >= 2:
        chains.append(current)
    env = ctx.prof.calls[-1].env

    def traffic(chain: list[Node]) -> tuple[float, int, int]:
        moved = sum(rows[n.name]["bytes"] for n in chain)
        produced = {id(o) for n in chain for o in n.outputs}
        ins = {id(v): v for n in chain for v in n.input_values() if id(v) not in produced}
        fused = sum(v.spec.nbytes(env) for v in ins.values()) + chain[-1].outputs[0].spec.nbytes(env)
        return sum(rows[n.name]["share"] for n in chain), moved, fused

    passes = [p.get("name") for p in ctx.prof.engine.report().passes]
    if "fuse_elementwise" in passes:
        fix = ("fuse_elementwise ran but left these kernels apart (an intermediate has another "
               "reader, is a graph output, or has another shape): restructure the model so each "
               "intermediate has one reader, or fuse them by hand into one expression.")
    else:
        fix = ("Compile with opt_level>=2 and without disable_passes=['fuse_elementwise']: the "
               "pass merges each chain into one fused kernel (one read of its inputs, one write "
               "of its result).")
    out, small = [], []
    for chain in chains:
        shares = [rows[n.name]["share"] for n in chain]
        if not (all(s >= hot for s in shares) or sum(shares) >= hot):
            small.append(chain)
            continue
        share, moved, fused = traffic(chain)
        names = " -> ".join(f"%{n.name} ({n.kind})" for n in chain)
        saving = share * max(0.0, 1 - fused / moved) if moved else 0.0
        out.append(_suggestion(
            "ew_chain_not_fused", share, hot,
            f"element-wise chain not fused ({len(chain)} kernels)",
            f"{names} run as {len(chain)} kernels, each reading and writing the whole tensor: "
            f"{_mb(moved)} moved per call where one fused kernel moves {_mb(fused)} "
            f"(about {saving:.1f}% of the time to gain; {share:.1f}% in the chain).",
            fix, [n.name for n in chain]))
    totals = [traffic(c) for c in small]
    share = sum(t[0] for t in totals)
    if small and share >= hot:  # many short chains (add + relu per block, say) add up
        moved, fused = sum(t[1] for t in totals), sum(t[2] for t in totals)
        kinds = sorted({" -> ".join(n.kind for n in c) for c in small})
        out.append(_suggestion(
            "ew_chain_not_fused", share, hot,
            f"{len(small)} element-wise chains not fused ({share:.1f}% together)",
            f"{len(small)} chains ({'; '.join(kinds[:4])}) each run as separate kernels: "
            f"{_mb(moved)} moved per call where fused kernels would move {_mb(fused)}.",
            fix, [n.name for c in small for n in c]))
    return out


def memory_bound_below_bandwidth(ctx: Context) -> list[dict]:
    hot = ctx.meta["hotspot_share"]
    out = []
    for r in ctx.ops:
        if not r["hotspot"] or r["bound"] != "memory" or r["gb_per_s"] is None:
            continue
        peaks = ctx.peaks_for(r["device"])
        pct = 100 * r["gb_per_s"] / peaks.gbps
        if pct >= BANDWIDTH_FLOOR_PCT:
            continue
        small = r["bytes"] < 1e6
        hint = ("its tensors are small, so fixed per-call cost (dispatch, threading) and not "
                "bandwidth dominates: batch more work per call or fuse it with its neighbours"
                if small else
                "look for a layout change inside it (channels-last <-> contiguous), a strided "
                "or broadcast operand, or an unfused neighbour reading the same tensor again")
        out.append(_suggestion(
            "memory_bound_low_bandwidth", r["share"], hot,
            f"memory-bound op far below bandwidth: %{r['name']} ({r['op']})",
            f"%{r['name']} moves {_mb(r['bytes'])} per call at {r['gb_per_s']:.1f} GB/s, "
            f"{pct:.0f}% of the measured {peaks.gbps:.1f} GB/s; its arithmetic intensity "
            f"({(r['intensity'] or 0):.2f} FLOP/byte) is under the ridge "
            f"({peaks.ridge:.1f}), so memory traffic bounds it.",
            f"Make it stream memory: {hint}.", [r["name"]]))
    return out


def lower_precision(ctx: Context) -> list[dict]:
    hot = ctx.meta["hotspot_share"]
    rows = [r for r in ctx.ops if r["class"] == "matmul" and r["dtypes"]
            and set(r["dtypes"]) <= {"float32"} and r["fused_into"] is None]
    share = sum(r["share"] for r in rows)
    if not rows or share < hot:  # hotspots, or many matmuls that are one together
        return []
    int8 = "QuantConfig(weight_bits=8, activation_bits=8)"
    if rows[0]["device"].startswith("cuda"):
        hw = "tensor cores run bf16 (and int8/fp8) several times faster than float32"
    else:
        from deepseek.backends.cpu.codegen import native_precisions

        cap, native = torch.backends.cpu.get_cpu_capability(), native_precisions()
        vnni = "int8" in native
        bf16 = "runs bf16 natively" if "bf16" in native else \
            "has no native bf16 (it would run float32)"
        if not vnni:  # oneDNN's int8 kernels are exact there for 7-bit weights
            int8 = ("QuantConfig(weight_bits=7, activation_bits=8): without VNNI, 7-bit "
                    "weights run as int8")
        hw = f"this CPU ({cap}) {bf16}; int8 kernels run {'on' if vnni else 'without'} VNNI"
    return [_suggestion(
        "lower_precision", share, hot,
        f"{len(rows)} float32 matmul/convolution layer(s) could run in bf16 or int8",
        f"{', '.join('%' + r['name'] for r in rows[:6])}{' ...' if len(rows) > 6 else ''} "
        f"({share:.1f}% of the time together) compute in float32; {hw}.",
        "Compile with precision='bf16' where the backend supports it, or quantize the weights "
        f"and activations to int8 (deepseek.quantization: {int8}); check the accuracy on your "
        "own data.", [r["name"] for r in rows])]


def fallback_nodes(ctx: Context) -> list[dict]:
    fb = [r for r in ctx.ops if r["fallback"]]
    if not fb:
        return []
    share = sum(r["share"] for r in fb)
    gpu = any(p["device"].startswith("cuda") for p in ctx.meta["partitions"])
    parts = len(ctx.meta["partitions"])
    lines = []
    for r in fb:
        rewrite = KNOWN_REWRITES.get(r["op"])
        lines.append(f"%{r['name']} {r['op']} at {r['source'] or 'unknown source'}"
                     + (f" (rewrite: {rewrite})" if rewrite else ""))
    where = ("on the CPU, inside a GPU graph: every call copies its inputs to the host and "
             "back and waits for the GPU" if gpu else "through PyTorch's reference kernels")
    return [_suggestion(
        "cpu_fallback", share, ctx.meta["hotspot_share"],
        f"CPU fallback: {len(fb)} op(s) have no Deepseek kernel",
        f"{'; '.join(lines)}. They run {where}, and split the engine into {parts} partitions "
        f"({share:.1f}% of the time in the fallback ops).",
        "Rewrite them with supported ops (see the rewrites above), or add the op to the registry "
        "(one row in deepseek/ir/ops.py) so the backend compiles it.",
        [r["name"] for r in fb], severity="high" if gpu else None)]


def host_synchronization(ctx: Context) -> list[dict]:
    parts = ctx.meta["partitions"]
    if not any(p["device"].startswith("cuda") for p in parts):
        return []  # CUDA only: on a CPU there is no device to wait for
    names, details = [], []
    for a, b in itertools.pairwise(parts):
        if a["device"].startswith("cuda") and not b["device"].startswith("cuda"):
            details.append(f"partition {a['index']} -> {b['index']} ({a['device']} -> cpu)")
    synced: dict[str, list[str]] = {}
    for (_, p, j), nk in ctx.kernel_map.items():
        probe = ctx.prof.probes[p] if p < len(ctx.prof.probes) else None
        if nk.syncs and probe is not None and probe.device.startswith("cuda"):
            name = probe.nodes[j].name if probe.mode == "nodes" else f"partition_{p}"
            synced.setdefault(name, []).extend(nk.syncs)
    for name, syncs in synced.items():
        names.append(name)
        details.append(f"%{name} calls {min(syncs)}")
    if not details:
        return []
    rows = {r["name"]: r for r in ctx.ops}
    share = sum(rows[n]["share"] for n in names if n in rows)
    return [_suggestion(
        "host_sync", share, ctx.meta["hotspot_share"],
        f"host synchronization: the CPU waits for the GPU {len(details)} time(s) per call",
        "; ".join(details) + ". Each wait drains the GPU's queue and exposes launch latency.",
        "Keep the whole graph on the GPU (remove fallbacks), avoid .item()/.cpu() and "
        "data-dependent shapes inside the model, and replay the plan as a CUDA graph.",
        names, severity="high")]


def call_overhead(ctx: Context) -> list[dict]:
    cov = ctx.meta["coverage_pct"]
    if 100 - cov < OVERHEAD_PCT:
        return []
    wall = ctx.meta["wall_ms"]["mean"]
    return [_suggestion(
        "call_overhead", 0.0, ctx.meta["hotspot_share"],
        f"{100 - cov:.0f}% of each call is outside the operators",
        f"A call takes {wall:.3f} ms and its operators {ctx.meta['op_time_ms']:.3f} ms; the rest "
        "is input checks, partition transfers, output copies and Python dispatch.",
        "For small models, batch several requests per call (deepseek serve batches "
        "dynamically) so the fixed cost is paid once.", [], severity="low")]


RULES = [batch_norm_not_folded, elementwise_chains, memory_bound_below_bandwidth,
         lower_precision, fallback_nodes, host_synchronization, call_overhead]


def suggest(ctx: Context) -> list[dict]:
    """Every rule's suggestions, the largest share first."""
    found = [s for rule in RULES for s in rule(ctx)]
    order = {"high": 0, "medium": 1, "low": 2}
    return sorted(found, key=lambda s: (order[s["severity"]], -s["share"]))
