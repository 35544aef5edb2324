"""Benchmarks: side-by-side timings of Deepseek and its peers (see BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import sys


def print_case(title: str, median_ms: dict, ratios: dict, extra: dict,
               extra_format: str = "{:.1e}") -> None:
    """One model's result: a line per contender (median ms, a ratio, one more figure)."""
    print(f"\n{title}")
    for k, ms in median_ms.items():
        print(f"  {k:<22} {ms:9.3f} ms  {ratios[k]:5.2f}x  {extra_format.format(extra[k])}")
    sys.stdout.flush()


def save_json(path: str, doc: dict) -> None:
    """Write a results document (machine, versions, results) as indented JSON."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
