"""Terminal output of a profile: the operator table (rich, or plain text without it).

Rows are operators sorted by time; hotspots (share at or above the
threshold) are highlighted and show where they sit on the roofline:
achieved GFLOP/s and GB/s and the percentage of the roof above them.
"""

from __future__ import annotations

import os
import sys

_SEVERITY_STYLE = {"high": "bold red", "medium": "yellow", "low": "dim"}


def _num(x, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _shape(r: dict) -> str:
    shapes = r.get("output_shapes") or []
    dt = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64",
          "float64": "f64", "int8": "i8"}
    kinds = [d for d in r.get("dtypes", []) if d != "int64"] or r.get("dtypes", [])
    prefix = dt.get(kinds[0], kinds[0]) if kinds else ""
    return f"{prefix}[{','.join(map(str, shapes[0]))}]" if shapes else ""


def _roof(r: dict) -> str:
    if r.get("fused_into"):
        return f"fused into %{r['fused_into']}"
    if r.get("bound") is None:
        return "-"
    roof = f"{r['roofline_pct']:.0f}% {r['bound']}"
    return f"{roof} ({r['algorithm']})" if r.get("algorithm") else roof


def _header(report) -> str:
    m = report.meta
    from deepseek.profiler.html import peak_text

    peaks = "; ".join(f"{d}: {peak_text(p)}" for d, p in m["peaks"].items())
    return (f"{m['model']}  backend {m['backend']} on {m['device']}, {m['threads']} threads  "
            f"{m['iterations']} calls (+{m['warmup_calls']} warm-up)  "
            f"{m['wall_ms']['mean']:.3f} ms/call, operators {m['op_time_ms']:.3f} ms "
            f"({m['coverage_pct']:.0f}%)  peaks {peaks}")


def format_report(report, top: int = 25) -> str:
    """The report as plain text (what ``str(report)`` prints)."""
    lines = [_header(report), ""]
    lines.append(f"{'':2}{'node':<28} {'op':<26} {'shape':<20} {'ms':>9} {'share':>6} "
                 f"{'GFLOP/s':>8} {'GB/s':>7}  roofline  module")
    for r in report.ops[:top]:
        mark = "*" if r["hotspot"] else " "
        lines.append(f"{mark:2}{r['name'][:28]:<28} {r['op'][:26]:<26} {_shape(r)[:20]:<20} "
                     f"{r['time_ms']:9.4f} {r['share']:5.1f}% {_num(r['gflops_per_s']):>8} "
                     f"{_num(r['gb_per_s']):>7}  {_roof(r)}  {r['module']}")
    if len(report.ops) > top:
        rest = report.ops[top:]
        lines.append(f"  ... {len(rest)} more ops, {sum(r['share'] for r in rest):.1f}% together")
    lines.append(f"  (* hotspot: {report.meta['hotspot_share']:g}% of the time or more)")
    if report.suggestions:
        lines += ["", "Suggestions:"]
        for s in report.suggestions:
            lines.append(f"  [{s['severity']}] {s['title']}")
            lines.append(f"      {s['detail']}")
            lines.append(f"      fix: {s['fix']}")
    return "\n".join(lines)


def rich_renderable(report, top: int = 25):
    """A rich Group: header, operator table, suggestions."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    table = Table(title=_header(report), title_justify="left", expand=False,
                  caption=f"bold = hotspot ({report.meta['hotspot_share']:g}% of the time or more)")
    for col, kw in (("node", {}), ("op", {}), ("shape", {}), ("ms", {"justify": "right"}),
                    ("share", {"justify": "right"}), ("GFLOP/s", {"justify": "right"}),
                    ("GB/s", {"justify": "right"}), ("roofline", {}), ("module", {})):
        table.add_column(col, no_wrap=True, overflow="ellipsis", **kw)
    for r in report.ops[:top]:
        style = "bold red" if r["hotspot"] else ("magenta" if r["fallback"] else None)
        table.add_row(f"%{r['name']}", r["op"], _shape(r), f"{r['time_ms']:.4f}",
                      f"{r['share']:.1f}%", _num(r["gflops_per_s"]), _num(r["gb_per_s"]),
                      _roof(r), r["module"] or r["location"], style=style)
    if len(report.ops) > top:
        rest = report.ops[top:]
        table.add_row(f"... {len(rest)} more", "", "", "", f"{sum(r['share'] for r in rest):.1f}%",
                      "", "", "", "", style="dim")
    parts = [table]
    for s in report.suggestions:
        body = Text()
        body.append(s["detail"] + "\n")
        body.append("fix: ", style="bold")
        body.append(s["fix"])
        parts.append(Panel(body, title=f"[{_SEVERITY_STYLE[s['severity']]}]{s['severity']}[/] "
                                        f"{s['title']}", title_align="left"))
    return Group(*parts)


def print_report(report, top: int = 25, console=None) -> None:
    """Print with rich when it is installed, else as plain text."""
    try:
        from rich.console import Console
    except ImportError:
        print(format_report(report, top), file=sys.stdout)
        return
    (console or _console(Console)).print(rich_renderable(report, top))


def _console(Console):
    # piped output has no terminal width: use a wide one rather than rich's 80 columns
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console() if wide else Console(width=160)


def format_compare(diff: dict, top: int = 30) -> str:
    """A compare result (deepseek.profiler.compare) as plain text."""
    t = diff["total"]
    lines = [(f"total operator time: {t['before_ms']:.3f} -> {t['after_ms']:.3f} ms "
              f"({t['change_pct']:+.1f}%)"),
             f"{'node':<28} {'op':<26} {'before ms':>10} {'after ms':>10} {'change':>9}"]
    for r in diff["ops"][:top]:
        lines.append(f"{r['name'][:28]:<28} {r['op'][:26]:<26} {_num(r['before_ms'], '{:.4f}'):>10} "
                     f"{_num(r['after_ms'], '{:.4f}'):>10} {r['status']:>9}")
    for key, label in (("resolved", "resolved"), ("new", "new")):
        for s in diff["suggestions"][key]:
            lines.append(f"{label} suggestion: {s}")
    return "\n".join(lines)


def print_compare(diff: dict, top: int = 30) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_compare(diff, top))
        return
    t = diff["total"]
    table = Table(title=f"operator time {t['before_ms']:.3f} -> {t['after_ms']:.3f} ms "
                        f"({t['change_pct']:+.1f}%)", title_justify="left")
    for col in ("node", "op", "before ms", "after ms", "change"):
        table.add_column(col, justify="right" if "ms" in col or col == "change" else "left")
    styles = {"removed": "green", "new": "yellow", "faster": "green", "slower": "red"}
    for r in diff["ops"][:top]:
        table.add_row(f"%{r['name']}", r["op"], _num(r["before_ms"], "{:.4f}"),
                      _num(r["after_ms"], "{:.4f}"), r["status"],
                      style=styles.get(r["status"].split()[0]))
    console = _console(Console)
    console.print(table)
    for s in diff["suggestions"]["resolved"]:
        console.print(f"[green]resolved[/] {s}")
    for s in diff["suggestions"]["new"]:
        console.print(f"[yellow]new[/] {s}")
