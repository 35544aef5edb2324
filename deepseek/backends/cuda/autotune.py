"""Kernel choices measured on the GPU, within a time budget, and cached on disk.

A CUDA plan asks ``Autotuner.choose(problem, candidates, default)`` where more
than one kernel can run a node (e.g. PyTorch's SDPA or a Triton attention
kernel in one of several tilings). With measurement on (``opt_level=3``), each
candidate runs as a CUDA graph of ``_REPS`` back-to-back calls, as it will in
the plan, so launch overhead counts as it does there: a few microseconds of
Python per Triton launch would otherwise decide the contest. The fastest is
kept in ``$DEEPSEEK_CACHE_DIR/autotune/<machine>.json`` (default
``~/.cache/deepseek``), keyed by the problem; the machine key is the GPU, its
compute capability, the driver, CUDA, PyTorch and Triton versions, so a new
driver or library measures again. Without measurement, a cached choice is used
when there is one, else ``default`` (the backend's heuristic).

Budget: ``DEEPSEEK_AUTOTUNE_SECONDS`` (default 60) seconds of measurement per
compiled model; problems left when it is spent take their default.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import tempfile
import time
from typing import Callable, Mapping

import torch

from deepseek.runtime.cache import cache_root

log = logging.getLogger(__name__)
_REPS = 10


def _driver_version() -> str:
    try:
        v = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
        return str(v.value)
    except OSError:
        return "unknown"


def machine_key(device: torch.device) -> str:
    """The GPU and the software that decide which kernel is fastest on it."""
    import triton

    p = torch.cuda.get_device_properties(device)
    parts = [p.name, f"sm{p.major}{p.minor}", f"driver{_driver_version()}",
             f"cuda{torch.version.cuda or torch.version.hip}", f"torch{torch.__version__}",
             f"triton{triton.__version__}"]
    return "_".join(s.replace(" ", "-").replace("/", "-") for s in parts)


def graph_time(fn: Callable[[], object], reps: int = _REPS) -> float:
    """Seconds per call of ``fn`` replayed inside a CUDA graph of ``reps`` calls (best of 5)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return min(times)


def _read_table(path: str) -> dict:
    try:
        with open(path) as f:
            table = json.load(f)
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}


def _write_table(path: str, table: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file


class KernelChoices:
    """Choices a kernel makes by itself at its first call (the int8 convolution: Triton's
    kernel or cuDNN's, and cuDNN's execution plan), kept on disk like the autotuner's
    (``$DEEPSEEK_CACHE_DIR/autotune/<machine>-<name>.json``): read once, and each new
    choice merged into the file as it is made, so processes sharing it keep each other's."""

    def __init__(self, path: str):
        self.path = path
        self.table: dict | None = None

    def get(self, problem: str) -> dict | None:
        if self.table is None:
            self.table = _read_table(self.path)
        hit = self.table.get(problem)
        return hit if isinstance(hit, dict) else None

    def put(self, problem: str, record: dict) -> None:
        table = _read_table(self.path)  # another process may have written since
        table[problem] = record
        try:
            _write_table(self.path, table)
        except OSError as e:  # a read-only cache: the choice holds for this process only
            log.info("kernel choices not saved to %s: %s", self.path, e)
        self.table = table


_KERNEL_CHOICES: dict[tuple, KernelChoices] = {}


def kernel_choices(device: torch.device, name: str) -> KernelChoices:
    """The shared ``KernelChoices`` table ``name`` of ``device``'s machine key."""
    key = (machine_key(device), name, cache_root())
    if key not in _KERNEL_CHOICES:
        _KERNEL_CHOICES[key] = KernelChoices(
            os.path.join(key[2], "autotune", f"{key[0]}-{name}.json"))
    return _KERNEL_CHOICES[key]


class Autotuner:
    """Measured choices for one compiled model on one device (module doc)."""

    def __init__(self, device: torch.device, measure: bool = False,
                 budget_s: float | None = None, cache_dir: str | None = None):
        self.device = device
        self.measure = measure
        self.budget_s = float(os.environ.get("DEEPSEEK_AUTOTUNE_SECONDS", 60)) \
            if budget_s is None else budget_s
        self.spent_s = 0.0
        base = cache_dir or cache_root()
        self.path = os.path.join(base, "autotune", machine_key(device) + ".json")
        self.table: dict[str, dict] = _read_table(self.path)
        self.decisions: list[dict] = []  # what this model chose, for the report

    def choose(self, problem: str, candidates: Mapping[str, Callable[[], object]],
               default: str) -> str:
        """The name of the kernel to run for ``problem`` (a string naming op and shapes)."""
        hit = self.table.get(problem)
        if hit is not None and hit.get("choice") in candidates:
            choice, how = hit["choice"], "cached"
        elif not self.measure or self.spent_s >= self.budget_s or len(candidates) < 2:
            choice, how = default, "default"
        else:
            t0 = time.perf_counter()
            times = {}
            for name, fn in candidates.items():
                try:
                    times[name] = graph_time(fn)
                except Exception as e:  # a tiling that does not compile or fit: not a choice
                    log.info("autotune %s: %s failed (%s)", problem, name, e)
            self.spent_s += time.perf_counter() - t0
            choice = min(times, key=times.get) if times else default
            how = "measured"
            self.table[problem] = {"choice": choice,
                                   "us": {k: round(v * 1e6, 2) for k, v in times.items()}}
            _write_table(self.path, self.table)
            log.info("autotune %s: %s (%s)", problem, choice,
                     ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in sorted(times.items(),
                                                                           key=lambda kv: kv[1])))
        self.decisions.append({"problem": problem, "choice": choice, "how": how})
        return choice
