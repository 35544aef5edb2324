"""Aggregate a Profile: operators by time, roofline placement, hotspots, Chrome trace.

Each node's time is the mean over the measured calls (warm-up excluded);
its share is its part of the summed node time, so shares add up to 100%.
Achieved GFLOP/s and GB/s divide the node's FLOPs (:mod:`.flops`) and bytes
moved (``deepseek.runtime.plan.node_bytes``) by its time and are compared
with the device's measured peaks (:mod:`.peaks`): an op whose arithmetic
intensity is under the ridge point is memory-bound, else compute-bound, and
``roofline_pct`` is how close it gets to the roof it sits under. A compute
roof below the fastest op (a peak measured under load) is raised to it; the
measured value stays in the report; ops run by a fast algorithm (Winograd convolutions:
``algorithm`` in their row) count the op's FLOPs, so their rate is an effective one and
never raises a roof. The bandwidth roof is a large copy's,
through DRAM: ops whose tensors stay in cache can sit above it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from deepseek.errors import DeepseekError
from deepseek.ir.graph import Node
from deepseek.ir.ops import Prop
from deepseek.profiler.flops import node_flops
from deepseek.profiler.peaks import DevicePeaks, measure_peaks
from deepseek.profiler.trace import BLOCK, Profile
from deepseek.runtime.plan import node_bytes

REPORT_VERSION = 1
_SOURCE = re.compile(r"^(?P<where>.*?)(?: \((?P<module>[^()]*)\))?$")


def split_source(source: str) -> tuple[str, str]:
    """('conv.py:565 in forward', 'layer1.0.conv1') from a node's source text."""
    m = _SOURCE.match(source or "")
    return (m.group("where") or "", m.group("module") or "") if m else (source, "")


def op_class(node: Node | None) -> str:
    """A coarse class for colours and grouping: matmul, elementwise, reduction, data, fallback."""
    if node is None:
        return "partition"
    if node.fallback is not None:
        return "fallback"
    props = node.opdef.props
    if props & Prop.MATMUL:
        return "matmul"
    if props & Prop.ELEMENTWISE:
        return "elementwise"
    if props & Prop.REDUCTION:
        return "reduction"
    return "data"


@dataclass
class _Acc:
    """One timed unit (a node, or a whole partition of an opaque backend) over the calls."""

    key: tuple[int, int]
    name: str
    op: str
    node: Node | None
    probe: Any
    times: list[int] = field(default_factory=list)  # ns per measured call
    flops: int = 0
    bytes: int = 0
    kernels: dict[str, list[float]] = field(default_factory=dict)  # name -> [count, us]


@dataclass
class ProfileReport:
    """What a profile found. ``to_dict()`` is report.json; ``trace`` is trace.json."""

    meta: dict
    ops: list[dict]
    by_op: list[dict]
    hotspots: list[dict]
    suggestions: list[dict]
    trace: dict = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict:
        return {"version": REPORT_VERSION, **self.meta, "ops": self.ops, "by_op": self.by_op,
                "hotspots": self.hotspots, "suggestions": self.suggestions}

    def save(self, out_dir: str) -> dict[str, str]:
        """Write trace.json, report.json and report.html under ``out_dir``; returns the paths."""
        from deepseek.profiler.html import render_html

        os.makedirs(out_dir, exist_ok=True)
        paths = {k: os.path.join(out_dir, f) for k, f in
                 (("trace", "trace.json"), ("report", "report.json"), ("html", "report.html"))}
        with open(paths["trace"], "w") as f:
            json.dump(self.trace, f)
        with open(paths["report"], "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        with open(paths["html"], "w", encoding="utf-8") as f:
            f.write(render_html(self))
        return paths

    @classmethod
    def load(cls, out_dir: str) -> ProfileReport:
        """The report that ``save(out_dir)`` wrote (report.json and trace.json), to re-render."""
        from deepseek.profiler.compare import load_report

        data = load_report(os.path.join(out_dir, "report.json"))
        try:
            with open(os.path.join(out_dir, "trace.json")) as f:
                trace = json.load(f)
        except (OSError, json.JSONDecodeError):
            trace = {"traceEvents": []}
        lists = ("ops", "by_op", "hotspots", "suggestions")
        meta = {k: v for k, v in data.items() if k not in lists and k != "version"}
        return cls(meta, *(data.get(k, []) for k in lists), trace)

    def print(self, top: int = 25, console=None) -> None:
        """Print the operator table (hotspots highlighted) and the suggestions with rich."""
        from deepseek.profiler.console import print_report

        print_report(self, top=top, console=console)

    def __str__(self) -> str:
        from deepseek.profiler.console import format_report

        return format_report(self)

    def __rich__(self):
        from deepseek.profiler.console import rich_renderable

        return rich_renderable(self)


def _peaks_lookup(given) -> Any:
    cache: dict[str, DevicePeaks] = {}
    if isinstance(given, DevicePeaks):
        cache[given.device] = given
    elif isinstance(given, dict):
        cache.update(given)

    def peaks_for(device: str) -> DevicePeaks:
        if device not in cache:
            cache[device] = measure_peaks(device)
        return cache[device]

    return peaks_for, cache


def _static(acc: _Acc, env: dict) -> dict:
    node = acc.node
    if node is None:
        return {"source": "", "module": "", "location": "", "input_shapes": [],
                "output_shapes": [], "dtypes": []}
    where, module = split_source(node.source)
    values = node.input_values()
    return {"source": node.source, "location": where, "module": module,
            "input_shapes": [list(v.spec.concrete(env)) for v in values],
            "output_shapes": [list(o.spec.concrete(env)) for o in node.outputs],
            "dtypes": sorted({str(v.spec.dtype).removeprefix("torch.")
                              for v in values + node.outputs})}


def _roofline(flops: int, nbytes: int, ns: int, peaks: DevicePeaks) -> dict:
    if ns <= 0 or (flops == 0 and nbytes == 0):
        return {"gflops_per_s": None, "gb_per_s": None, "intensity": None, "bound": None,
                "roofline_pct": None}
    gflops, gbps = flops / ns, nbytes / ns  # FLOP/ns = GFLOP/s, byte/ns = GB/s
    intensity = flops / nbytes if nbytes else None
    if flops == 0 or (intensity is not None and intensity < peaks.ridge):
        bound, pct = "memory", 100 * gbps / peaks.gbps
    else:
        bound, pct = "compute", 100 * gflops / peaks.gflops
    return {"gflops_per_s": gflops, "gb_per_s": gbps, "intensity": intensity, "bound": bound,
            "roofline_pct": pct}


MIN_RATE_NS = 50_000  # ops shorter than this per call do not move the compute roof


def _raise_compute_roofs(timed, peaks_for, peaks_used: dict) -> dict[str, float]:
    """Raise a device's GFLOP/s roof to its fastest op where that op beat the measured peak.

    The roof is a ceiling: an op above it means the peak was measured under
    load (or by a slower kernel than the model's), not that the op broke
    physics. Returns {device: measured GFLOP/s} for the roofs that were raised.
    """
    fastest: dict[str, float] = {}
    for row, acc, total in timed:
        # a fast algorithm (Winograd) does fewer operations than its FLOPs count: its
        # effective rate says nothing about the roof
        if total and acc.flops and total / len(acc.times) >= MIN_RATE_NS and not row["algorithm"]:
            d = acc.probe.device
            fastest[d] = max(fastest.get(d, 0.0), acc.flops / total)
    raised = {}
    for d, best in fastest.items():
        peaks = peaks_for(d)
        if best > peaks.gflops:
            raised[d] = peaks.gflops
            peaks_used[d] = dataclasses.replace(peaks, gflops=best)
    return raised


def _collect(prof: Profile, calls, kernel_map) -> tuple[dict, list[dict]]:
    """Per-unit accumulators and the Chrome-trace events of the measured calls."""
    accs: dict[tuple[int, int], _Acc] = {}
    for probe in prof.probes:
        if probe.mode == BLOCK:
            accs[(probe.index, 0)] = _Acc((probe.index, 0), f"partition_{probe.index}",
                                          f"partition({probe.backend})", None, probe)
        else:
            for j, n in enumerate(probe.nodes):
                accs[(probe.index, j)] = _Acc((probe.index, j), n.name, n.kind, n, probe)
    t0 = calls[0].start_ns
    events: list[dict] = []
    cost_cache: dict[tuple[int, tuple], tuple[int, int]] = {}
    arg_cache: dict[tuple, dict] = {}
    for n_iter, call in enumerate(calls):
        env_key = tuple(sorted(call.env.items()))
        events.append({"ph": "X", "cat": "iteration", "name": f"engine call {n_iter}", "pid": 1,
                       "tid": 0, "ts": (call.start_ns - t0) / 1e3,
                       "dur": (call.end_ns - call.start_ns) / 1e3, "args": {"iteration": n_iter}})
        for probe in prof.probes:
            stamps = call.stamps[probe.index]
            units = 1 if probe.mode == BLOCK else len(probe.nodes)
            if len(stamps) != units + 1:
                continue  # this partition did not run in this call
            for j in range(units):
                acc = accs[(probe.index, j)]
                dur = stamps[j + 1] - stamps[j]
                info = kernel_map.get((call.index, probe.index, j)) if kernel_map else None
                if info is not None and probe.device.startswith("cuda") and info.device_us:
                    dur = int(info.device_us * 1e3)  # GPU time, not the asynchronous launch
                acc.times.append(dur)
                if info is not None:
                    for name, us in info.kernel_times():
                        k = acc.kernels.setdefault(name, [0, 0.0])
                        k[0] += 1
                        k[1] += us
                if acc.node is not None:
                    ck = (id(acc.node), env_key)
                    if ck not in cost_cache:
                        cost_cache[ck] = (node_flops(acc.node, call.env),
                                          node_bytes(acc.node, call.env))
                    f, b = cost_cache[ck]
                    acc.flops += f
                    acc.bytes += b
                ak = (acc.key, env_key)
                if ak not in arg_cache:
                    st = _static(acc, call.env)
                    arg_cache[ak] = {"node": f"%{acc.name}", "op": acc.op,
                                     "shapes": st["input_shapes"], "out": st["output_shapes"],
                                     "dtypes": st["dtypes"], "source": st["source"],
                                     "flops": cost_cache.get((id(acc.node), env_key), (0, 0))[0],
                                     "bytes": cost_cache.get((id(acc.node), env_key), (0, 0))[1]}
                events.append({"ph": "X", "cat": "node" if acc.node is not None else "partition",
                               "name": acc.op, "pid": 1, "tid": probe.index + 1,
                               "ts": (stamps[j] - t0) / 1e3, "dur": dur / 1e3,
                               "args": {**arg_cache[ak], "iteration": n_iter}})
    return accs, events


def _metadata_events(prof: Profile) -> list[dict]:
    ev = [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0,
           "args": {"name": f"deepseek engine ({prof.engine.backend.name})"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 0, "args": {"name": "engine calls"}}]
    for p in prof.probes:
        ev.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": p.index + 1,
                   "args": {"name": f"partition {p.index}: {p.backend} on {p.device}"}})
        ev.append({"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": p.index + 1,
                   "args": {"sort_index": p.index + 1}})
    return ev


def build_report(prof: Profile) -> ProfileReport:
    """Aggregate the measured calls of ``prof`` into a ProfileReport."""
    from deepseek.profiler.suggest import Context, suggest

    calls = prof.measured_calls
    if not calls and prof.unrecorded:
        raise DeepseekError("the engine's kernels ran inside the profile but no call was recorded: "
                            "call engine(...) or engine.run_flat(...) inside the `with` block "
                            "(a bound method taken before the block bypasses the profile)")
    if not calls:
        raise DeepseekError(f"nothing to report: {len(prof.calls)} engine call(s) ran inside the "
                            f"profile and all were warm-up (warmup={prof.warmup} per input "
                            "shape); run the engine more times inside `with ds.profile(...)`")
    kernel_map, kernel_events = {}, []
    if prof.kernel_trace is not None:
        from deepseek.profiler.kernels import kernel_trace_events, map_kernels

        kernel_map = map_kernels(prof.kernel_trace)
        kernel_events = kernel_trace_events(prof, calls, kernel_map)
    accs, events = _collect(prof, calls, kernel_map)
    peaks_for, peaks_used = _peaks_lookup(prof.peaks)
    grand = sum(sum(a.times) for a in accs.values()) or 1
    producers = prof.engine.graph.producers()
    n_calls = len(calls)
    ops, timed = [], []
    for acc in accs.values():
        if not acc.times:
            continue
        total = sum(acc.times)
        fused = acc.node is not None and acc.key[1] in acc.probe.fused
        row = {"name": acc.name, "op": acc.op, "time_ms": total / len(acc.times) / 1e6,
               "share": 100 * total / grand, "calls": len(acc.times),
               "min_ms": min(acc.times) / 1e6, "max_ms": max(acc.times) / 1e6,
               "median_ms": statistics.median(acc.times) / 1e6,
               "flops": acc.flops // len(acc.times), "bytes": acc.bytes // len(acc.times),
               "class": op_class(acc.node), "partition": acc.probe.index,
               "backend": acc.probe.backend, "device": acc.probe.device,
               "fallback": acc.node is not None and acc.node.fallback is not None,
               "fused_into": None, "algorithm": acc.probe.algorithms.get(acc.key[1])
               if acc.node is not None else None, **_static(acc, calls[-1].env)}
        if fused:  # computed inside its producer's kernel (a oneDNN post-op, say)
            first = acc.node.input_values()[0]
            row["fused_into"] = producers[first].name if first in producers else None
            host = acc.probe.fused_hosts.get(acc.key[1])
            if host is not None:  # or by a later node's (a ReLU moved past a max pool)
                row["fused_into"] = acc.probe.nodes[host].name
        timed.append((row, acc, 0 if fused else total))
        if acc.kernels:
            row["kernels"] = sorted(({"name": k, "count": v[0] // n_calls or 1,
                                      "time_ms": v[1] / n_calls / 1e3}
                                     for k, v in acc.kernels.items()),
                                    key=lambda k: -k["time_ms"])[:8]
        ops.append(row)
    raised = _raise_compute_roofs(timed, peaks_for, peaks_used)
    for row, acc, total in timed:
        row.update(_roofline(acc.flops, acc.bytes, total, peaks_for(acc.probe.device)))
    ops.sort(key=lambda r: -r["time_ms"])
    for r in ops:
        r["hotspot"] = r["share"] >= prof.hotspot_share
    hotspots = [{k: r[k] for k in ("name", "op", "time_ms", "share", "gflops_per_s", "gb_per_s",
                                   "intensity", "bound", "roofline_pct", "source", "module",
                                   "output_shapes", "dtypes")} for r in ops if r["hotspot"]]
    by_op: dict[str, dict] = {}
    for r in ops:
        g = by_op.setdefault(r["op"], {"op": r["op"], "nodes": 0, "time_ms": 0.0, "share": 0.0,
                                       "class": r["class"]})
        g["nodes"] += 1
        g["time_ms"] += r["time_ms"]
        g["share"] += r["share"]
    walls = [(c.end_ns - c.start_ns) / 1e6 for c in calls]
    op_ms = sum(r["time_ms"] for r in ops)
    meta = {"model": prof.name, "backend": prof.engine.backend.name, "device": prof.device,
            "precision": prof.engine.precision, "iterations": n_calls,
            "warmup_calls": len(prof.calls) - n_calls,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "wall_ms": {"mean": statistics.fmean(walls), "median": statistics.median(walls),
                        "min": min(walls), "max": max(walls)},
            "op_time_ms": op_ms, "coverage_pct": 100 * op_ms / statistics.fmean(walls),
            "hotspot_share": prof.hotspot_share, "kernels_captured": prof.kernel_trace is not None,
            "partitions": [{"index": p.index, "backend": p.backend, "device": p.device,
                            "nodes": len(p.nodes), "timed": p.mode} for p in prof.probes]}
    meta["peaks"] = {d: {**p.to_dict(), "measured_gflops": raised.get(d, p.gflops)}
                     for d, p in peaks_used.items()}
    ctx = Context(prof=prof, ops=ops, peaks_for=peaks_for, meta=meta, kernel_map=kernel_map)
    suggestions = suggest(ctx)
    trace = {"traceEvents": _metadata_events(prof) + events + kernel_events,
             "displayTimeUnit": "ms",
             "otherData": {"producer": "deepseek-profiler", "model": prof.name,
                           "iterations": n_calls, "backend": meta["backend"]}}
    return ProfileReport(meta, ops, sorted(by_op.values(), key=lambda g: -g["time_ms"]),
                         hotspots, suggestions, trace)
