"""Compare two report.json files: what changed per operator.

Operators are matched by node name (names come from the captured program,
so they survive recompilation; a node a pass removed shows as ``removed``,
one it created as ``new``). Per op kind the totals are compared too, and the
suggestions that went away or appeared are listed.

    deepseek-profiler --compare before/report.json after/report.json
"""

from __future__ import annotations

import json

from deepseek.errors import DeepseekError

SAME_PCT = 5.0  # a change under this is reported as "same" (timing noise)


def load_report(path: str) -> dict:
    """A report.json written by deepseek-profiler (a DeepseekError if it is not one)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DeepseekError(f"cannot read profile report {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("ops"), list):
        raise DeepseekError(f"{path} is not a deepseek-profiler report.json (no 'ops' list)")
    for r in data["ops"]:
        if not isinstance(r, dict) or not {"name", "op", "time_ms"} <= set(r):
            raise DeepseekError(f"{path}: every op needs name, op and time_ms; got {r!r:.80}")
    return data


def _status(before: float | None, after: float | None) -> str:
    if before is None:
        return "new"
    if after is None:
        return "removed"
    if before <= 0 or after <= 0 or abs(after - before) / before * 100 < SAME_PCT:
        return "same"
    return f"faster {before / after:.2f}x" if after < before else f"slower {after / before:.2f}x"


def _suggestion_key(s: dict) -> tuple:
    return s.get("kind"), tuple(sorted(s.get("nodes", [])))


def compare(before: dict, after: dict) -> dict:
    """Per-operator and per-op-kind changes from ``before`` to ``after`` (report dicts)."""
    b = {r["name"]: r for r in before["ops"]}
    a = {r["name"]: r for r in after["ops"]}
    rows = []
    for name in list(b) + [n for n in a if n not in b]:
        rb, ra = b.get(name), a.get(name)
        tb = rb["time_ms"] if rb else None
        ta = ra["time_ms"] if ra else None
        rows.append({"name": name, "op": (rb or ra)["op"], "before_ms": tb, "after_ms": ta,
                     "delta_ms": (ta or 0.0) - (tb or 0.0), "status": _status(tb, ta)})
    rows.sort(key=lambda r: -abs(r["delta_ms"]))
    kinds: dict[str, dict] = {}
    for side, report in (("before_ms", before), ("after_ms", after)):
        for r in report["ops"]:
            k = kinds.setdefault(r["op"], {"op": r["op"], "before_ms": 0.0, "after_ms": 0.0})
            k[side] += r["time_ms"]
    for k in kinds.values():
        k["delta_ms"] = k["after_ms"] - k["before_ms"]
    tb = sum(r["time_ms"] for r in before["ops"])
    ta = sum(r["time_ms"] for r in after["ops"])
    sb = {_suggestion_key(s): s.get("title", s.get("kind")) for s in before.get("suggestions", [])}
    sa = {_suggestion_key(s): s.get("title", s.get("kind")) for s in after.get("suggestions", [])}
    return {"total": {"before_ms": tb, "after_ms": ta,
                      "change_pct": 100 * (ta - tb) / tb if tb else 0.0,
                      "wall_before_ms": (before.get("wall_ms") or {}).get("mean"),
                      "wall_after_ms": (after.get("wall_ms") or {}).get("mean")},
            "ops": rows,
            "by_op": sorted(kinds.values(), key=lambda k: -abs(k["delta_ms"])),
            "suggestions": {"resolved": [t for k, t in sb.items() if k not in sa],
                            "new": [t for k, t in sa.items() if k not in sb]}}
