"""Kernels per node through torch.profiler (CUPTI on NVIDIA GPUs).

While a profile with ``kernels=True`` runs, each node is a named
``record_function`` range ("<node> [ds CALL.PARTITION.INDEX]"). Afterwards
torch.profiler's Chrome trace is read back: CPU ops inside a range belong to
that node; a GPU kernel, memcpy or memset belongs to the node whose range
holds the runtime call that launched it (matched by CUPTI correlation id).
Host synchronizations (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
blocking ``cudaMemcpy``, ``aten::item``) are recorded against their node.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

_RANGE = re.compile(r" \[ds (\d+)\.(\d+)\.(\d+)\]$")
_DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
_RUNTIME_CATS = {"cuda_runtime", "cuda_driver"}
_SYNC_OPS = {"aten::item", "aten::_local_scalar_dense"}


def _is_sync(name: str) -> bool:
    return "Synchronize" in name or name in ("cudaMemcpy", "cuMemcpyDtoH_v2") or name in _SYNC_OPS


@dataclass
class NodeKernels:
    """What torch.profiler saw inside one node's range in one engine call."""

    range_ts: float = 0.0  # the range's start on torch.profiler's clock (us)
    device: list[dict] = field(default_factory=list)  # GPU kernels/copies: name, ts, dur, tid
    host_ops: list[dict] = field(default_factory=list)  # top-level CPU ops: name, ts, dur
    syncs: list[str] = field(default_factory=list)

    @property
    def device_us(self) -> float:
        return sum(k["dur"] for k in self.device)

    def kernel_times(self) -> list[tuple[str, float]]:
        """(name, microseconds) of the device kernels, or of the CPU ops when there are none."""
        return [(k["name"], k["dur"]) for k in (self.device or self.host_ops)]


def start_torch_profiler(device: str):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda") and torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    try:  # keep every event of the session (newer torch warns and drops them otherwise)
        prof = profile(activities=activities, acc_events=True)
    except TypeError:
        prof = profile(activities=activities)
    prof.start()
    return prof


def stop_torch_profiler(prof) -> dict:
    """Stop torch.profiler and return its Chrome trace as a dict."""
    prof.stop()
    fd, path = tempfile.mkstemp(suffix=".json", prefix="deepseek-kineto-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def range_hook(stamps: list[int], labels: list[str], partition: int,
               call_index: list[int]) -> Callable[[int], None]:
    """A hook that stamps like the plain one and also opens a named range per node."""
    enter = torch.ops.profiler._record_function_enter_new
    leave = torch.ops.profiler._record_function_exit._RecordFunction
    append, clock = stamps.append, time.perf_counter_ns
    n = len(labels)
    current = [None]

    def hook(i: int) -> None:
        if current[0] is not None:
            leave(current[0])
            current[0] = None
        append(clock())
        if i < n:
            current[0] = enter(f"{labels[i]} [ds {call_index[0]}.{partition}.{i}]", None)

    return hook


def map_kernels(trace: dict) -> dict[tuple[int, int, int], NodeKernels]:
    """(call, partition, node index) -> NodeKernels, from torch.profiler's Chrome trace."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    result: dict[tuple[int, int, int], NodeKernels] = {}
    ranges: dict[tuple, list[tuple[float, float, tuple]]] = {}  # (pid, tid) -> sorted spans
    for e in events:
        m = _RANGE.search(e.get("name", "")) if e.get("cat") == "user_annotation" else None
        if m:
            key = tuple(int(g) for g in m.groups())
            result[key] = NodeKernels(range_ts=float(e["ts"]))
            ranges.setdefault((e.get("pid"), e.get("tid")), []).append(
                (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), key))
    for spans in ranges.values():
        spans.sort()
    starts = {k: [s[0] for s in v] for k, v in ranges.items()}

    def enclosing(e) -> tuple | None:
        where = (e.get("pid"), e.get("tid"))
        spans = ranges.get(where)
        if not spans:
            return None
        ts = float(e["ts"])
        i = bisect.bisect_right(starts[where], ts) - 1
        if i >= 0 and ts <= spans[i][1]:
            return spans[i][2]
        return None

    launched: dict[int, tuple] = {}
    host_end: dict[tuple, float] = {}
    for e in sorted(events, key=lambda e: float(e["ts"])):
        cat, name = e.get("cat"), e.get("name", "")
        if cat not in ("cpu_op", "cuda_sync") and cat not in _RUNTIME_CATS:
            continue
        key = enclosing(e)
        if key is None:
            continue
        nk = result[key]
        if cat in _RUNTIME_CATS:
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launched[corr] = key
        if _is_sync(name) or cat == "cuda_sync":
            nk.syncs.append(name)
        if cat == "cpu_op" and float(e["ts"]) >= host_end.get(key, -1.0):  # top-level op only
            nk.host_ops.append({"name": name, "ts": float(e["ts"]), "dur": float(e.get("dur", 0))})
            host_end[key] = float(e["ts"]) + float(e.get("dur", 0))
    for e in events:
        if e.get("cat") in _DEVICE_CATS:
            key = launched.get((e.get("args") or {}).get("correlation"))
            if key is not None:
                result[key].device.append({"name": e.get("name", ""), "ts": float(e["ts"]),
                                           "dur": float(e.get("dur", 0)), "tid": e.get("tid")})
    return result


def kernel_trace_events(prof, calls, kernel_map: dict) -> list[dict]:
    """The captured kernels as Chrome-trace events on the profile's clock (pid 2)."""
    t0 = calls[0].start_ns
    offsets = []  # our clock (us since t0) minus torch.profiler's, per node range
    wanted = {c.index: c for c in calls}
    for (ci, p, j), nk in kernel_map.items():
        call = wanted.get(ci)
        if call is not None and j < len(call.stamps[p]):
            offsets.append((call.stamps[p][j] - t0) / 1e3 - nk.range_ts)
    if not offsets:
        return []
    shift = statistics.median(offsets)
    events = [{"ph": "M", "name": "process_name", "pid": 2, "tid": 0,
               "args": {"name": "kernels (torch.profiler)"}}]
    probes = {p.index: p for p in prof.probes}
    for (ci, p, j), nk in kernel_map.items():
        if ci not in wanted:
            continue
        probe = probes.get(p)
        node = probe.nodes[j].name if probe is not None and j < len(probe.nodes) else "?"
        for k in nk.device or nk.host_ops:
            events.append({"ph": "X", "cat": "kernel" if nk.device else "cpu_op",
                           "name": k["name"], "pid": 2, "tid": k.get("tid", 0) or 0,
                           "ts": k["ts"] + shift, "dur": k["dur"],
                           "args": {"node": f"%{node}", "partition": p}})
    return events
