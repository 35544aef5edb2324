"""A self-contained HTML report: timeline, hotspot chart, roofline, suggestions, tables.

Everything is inline (CSS and SVG drawn here, no script, no network), so the
file can be mailed, attached to a CI run or opened offline. Hovering a shape
shows its details (SVG ``<title>``).
"""

from __future__ import annotations

import math
import statistics
from html import escape

COLORS = {"matmul": "#3b6fb6", "elementwise": "#4a9d5b", "reduction": "#8e5bb5",
          "data": "#9a9a9a", "fallback": "#d0453a", "partition": "#c98a2b"}
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;
background:#fff;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px;line-height:1.5}
.sug{border-left:5px solid #999;background:#f7f7f7;padding:8px 12px;margin:8px 0;font-size:13px}
.sug.high{border-color:#d0453a}.sug.medium{border-color:#e0a030}.sug.low{border-color:#aaa}
.sug b.t{font-size:14px}.sug .fix{margin-top:4px;color:#234}
table{border-collapse:collapse;font-size:12px;width:100%}
th,td{padding:3px 6px;border-bottom:1px solid #eee;text-align:left;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.hot td{background:#fdecea;font-weight:600}
.legend span{display:inline-block;margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:11px;height:11px;margin-right:4px;vertical-align:-1px}
svg text{font-family:inherit}
"""


def _roof_source(peak: dict) -> str:
    measured = peak.get("measured_gflops", peak["gflops"])
    return "matmul" if measured >= peak["gflops"] else f"fastest op; matmul {measured:.0f}"


def peak_text(peak: dict) -> str:
    """'238 GFLOP/s (fastest op; matmul 100), 40.2 GB/s copy' for headers."""
    return f"{peak['gflops']:.0f} GFLOP/s ({_roof_source(peak)}), {peak['gbps']:.1f} GB/s copy"


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _iteration_events(report) -> tuple[list[dict], float, float]:
    """The node events of the median-length measured call, with its start and duration (us)."""
    events = report.trace.get("traceEvents", [])
    calls = [e for e in events if e.get("cat") == "iteration"]
    if not calls:
        return [], 0.0, 0.0
    median = statistics.median_low(e["dur"] for e in calls)
    call = next(e for e in calls if e["dur"] == median)
    k = call["args"]["iteration"]
    nodes = [e for e in events if e.get("cat") in ("node", "partition")
             and e.get("args", {}).get("iteration") == k]
    return nodes, call["ts"], call["dur"]


def timeline_svg(report, width: int = 1120) -> str:
    nodes, t0, dur = _iteration_events(report)
    if not nodes or dur <= 0:
        return "<p>no timeline</p>"
    classes = {r["name"]: r["class"] for r in report.ops}
    lanes = sorted({e["tid"] for e in nodes})
    lane_h, left, top = 34, 110, 22
    height = top + lane_h * len(lanes) + 26
    scale = (width - left - 10) / dur
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="timeline">')]
    names = {p["index"] + 1: f"part {p['index']}: {p['backend']}" for p in report.meta["partitions"]}
    for li, tid in enumerate(lanes):
        y = top + li * lane_h
        out.append(f'<text x="4" y="{y + 20}" font-size="12">{escape(names.get(tid, str(tid)))}'
                   f'</text><rect x="{left}" y="{y}" width="{width - left - 10}" height="28" '
                   f'fill="#f4f4f4"/>')
    axis_y = top + lane_h * len(lanes) + 14
    step = _nice_step(dur / 1e3 / 8)
    t = 0.0
    while t <= dur / 1e3 + 1e-12:
        x = left + t * 1e3 * scale
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{axis_y - 10}" stroke="#ccc" '
                   f'stroke-width="0.5"/><text x="{x:.1f}" y="{axis_y}" font-size="10" '
                   f'text-anchor="middle">{t:g} ms</text>')
        t = round(t + step, 10)
    for e in nodes:
        y = top + lanes.index(e["tid"]) * lane_h
        x = left + (e["ts"] - t0) * scale
        w = max(0.6, e["dur"] * scale)
        name = e["args"].get("node", "").lstrip("%")
        color = COLORS.get(classes.get(name, "partition"), "#777")
        tip = (f"{e['args'].get('node', '')} {e['name']}  {e['dur'] / 1e3:.4f} ms  "
               f"{e['args'].get('shapes', '')}  {e['args'].get('source', '')}")
        out.append(f'<rect x="{x:.2f}" y="{y + 2}" width="{w:.2f}" height="24" fill="{color}" '
                   f'stroke="#fff" stroke-width="0.3"><title>{escape(tip)}</title></rect>')
        if w > 60:
            out.append(f'<text x="{x + 3:.1f}" y="{y + 18}" font-size="11" fill="#fff">'
                       f'{escape(e["name"][:int(w / 7)])}</text>')
    out.append("</svg>")
    return "".join(out)


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def hotspot_chart_svg(report, top: int = 15, width: int = 1120) -> str:
    rows = report.ops[:top]
    if not rows:
        return ""
    bar_h, left = 20, 330
    height = bar_h * len(rows) + 10
    most = max(r["share"] for r in rows) or 1
    scale = (width - left - 70) / most
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="hotspots">')]
    thr = report.meta["hotspot_share"]
    for i, r in enumerate(rows):
        y = 4 + i * bar_h
        color = "#d0453a" if r["hotspot"] else COLORS.get(r["class"], "#777")
        label = f"%{r['name']} ({r['op']})"
        out.append(f'<text x="{left - 6}" y="{y + 14}" font-size="12" text-anchor="end">'
                   f'{escape(label[:48])}</text>'
                   f'<rect x="{left}" y="{y + 2}" width="{max(1.0, r["share"] * scale):.1f}" '
                   f'height="{bar_h - 5}" fill="{color}"><title>{escape(label)}: '
                   f'{r["time_ms"]:.4f} ms</title></rect>'
                   f'<text x="{left + r["share"] * scale + 5:.1f}" y="{y + 14}" font-size="11">'
                   f'{r["share"]:.1f}%</text>')
    x = left + thr * scale
    if thr <= most:
        out.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height}" stroke="#d0453a" '
                   f'stroke-dasharray="4 3"/>')
    out.append("</svg>")
    return "".join(out)


def roofline_svg(report, width: int = 560, height: int = 360) -> str:
    device = report.meta["device"] if report.meta["device"] in report.meta["peaks"] else \
        next(iter(report.meta["peaks"]), None)
    if device is None:
        return ""
    peak = report.meta["peaks"][device]
    pts = [r for r in report.ops if r["device"] == device and r["intensity"] and r["gflops_per_s"]]
    x_lo, x_hi = 1e-2, 1e3
    y_hi = 10.0 ** math.ceil(math.log10(peak["gflops"] * 1.5))  # five decades up to the roof
    y_lo = y_hi / 1e5
    left, bottom, right, top = 60, height - 40, width - 16, 14

    def sx(v):
        v = min(max(v, x_lo), x_hi)
        return left + (math.log10(v) - math.log10(x_lo)) / 5 * (right - left)

    def sy(v):
        v = min(max(v, y_lo), y_hi)
        return bottom - (math.log10(v) - math.log10(y_lo)) / 5 * (bottom - top)

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="roofline"><rect x="{left}" y="{top}" width="{right - left}" '
            f'height="{bottom - top}" fill="#fafafa" stroke="#ccc"/>')]
    for e in range(-2, 4):
        x = sx(10 ** e)
        out.append(f'<text x="{x:.1f}" y="{bottom + 14}" font-size="10" text-anchor="middle">'
                   f'{10 ** e:g}</text>')
    for k in range(6):
        v = y_lo * 10 ** k
        out.append(f'<text x="{left - 4}" y="{sy(v) + 3:.1f}" font-size="10" text-anchor="end">'
                   f'{v:g}</text>')
    ridge = peak["gflops"] / peak["gbps"]
    roof = [(x_lo, x_lo * peak["gbps"]), (ridge, peak["gflops"]), (x_hi, peak["gflops"])]
    out.append('<polyline fill="none" stroke="#222" stroke-width="2" points="'
               + " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in roof) + '"/>')
    out.append(f'<text x="{right - 4}" y="{sy(peak["gflops"]) - 5:.1f}" font-size="11" '
               f'text-anchor="end">{peak["gflops"]:.0f} GFLOP/s ({_roof_source(peak)})</text>'
               f'<text x="{left + 6}" y="{sy(x_lo * peak["gbps"]) - 6:.1f}" font-size="11">'
               f'{peak["gbps"]:.1f} GB/s (copy)</text>')
    for r in sorted(pts, key=lambda r: -r["share"]):
        rad = 2.5 + 2 * math.sqrt(r["share"])
        color = "#d0453a" if r["hotspot"] else COLORS.get(r["class"], "#777")
        out.append(f'<circle cx="{sx(r["intensity"]):.1f}" cy="{sy(r["gflops_per_s"]):.1f}" '
                   f'r="{rad:.1f}" fill="{color}" fill-opacity="0.6" stroke="#333" '
                   f'stroke-width="0.4"><title>%{escape(r["name"])} {escape(r["op"])}: '
                   f'{r["gflops_per_s"]:.1f} GFLOP/s, {r["gb_per_s"]:.1f} GB/s, '
                   f'{r["share"]:.1f}%</title></circle>')
        if r["hotspot"]:
            out.append(f'<text x="{sx(r["intensity"]) + rad + 2:.1f}" '
                       f'y="{sy(r["gflops_per_s"]) + 3:.1f}" font-size="10">'
                       f'{escape(r["name"][:18])}</text>')
    out.append(f'<text x="{(left + right) / 2}" y="{height - 6}" font-size="11" '
               f'text-anchor="middle">arithmetic intensity (FLOP/byte)</text>'
               f'<text x="12" y="{(top + bottom) / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {(top + bottom) / 2})">GFLOP/s</text></svg>')
    return "".join(out)


def _ops_table(report) -> str:
    head = ("node", "op", "module", "source", "output", "ms", "share", "GFLOP/s", "GB/s",
            "roofline")
    rows = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in report.ops:
        roof = (f"fused into %{r['fused_into']}" if r["fused_into"] else
                f"{r['roofline_pct']:.0f}% ({r['bound']})" if r["bound"] else "-")
        if r.get("algorithm"):
            roof += f", {r['algorithm']}"
        shape = " ".join(str(s) for s in r["output_shapes"][:1])
        cells = [f"%{r['name']}", r["op"], r["module"], r["location"], shape]
        nums = [f"{r['time_ms']:.4f}", f"{r['share']:.1f}%", _fmt(r["gflops_per_s"]),
                _fmt(r["gb_per_s"])]
        rows.append(f'<tr class="{"hot" if r["hotspot"] else ""}">'
                    + "".join(f"<td>{escape(str(c))}</td>" for c in cells)
                    + "".join(f'<td class="n">{c}</td>' for c in nums)
                    + f"<td>{escape(roof)}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def render_html(report) -> str:
    """The report as one self-contained HTML page."""
    m = report.meta
    peaks = "; ".join(f"{escape(d)}: {peak_text(p)}" for d, p in m["peaks"].items())
    sugs = "".join(
        f'<div class="sug {escape(s["severity"])}"><b class="t">[{escape(s["severity"])}] '
        f'{escape(s["title"])}</b><div>{escape(s["detail"])}</div>'
        f'<div class="fix"><b>Fix:</b> {escape(s["fix"])}</div></div>'
        for s in report.suggestions) or "<p>No suggestion applies.</p>"
    legend = "".join(f'<span><i style="background:{c}"></i>{k}</span>' for k, c in COLORS.items())
    by_op = "".join(f'<tr><td>{escape(g["op"])}</td><td class="n">{g["nodes"]}</td>'
                    f'<td class="n">{g["time_ms"]:.4f}</td><td class="n">{g["share"]:.1f}%</td></tr>'
                    for g in report.by_op)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>deepseek-profiler: {escape(m['model'])}</title>
<style>{_CSS}</style></head><body>
<h1>deepseek-profiler: {escape(m['model'])}</h1>
<div class="meta">backend <b>{escape(m['backend'])}</b> on {escape(m['device'])},
{m['threads']} threads, torch {escape(m['torch'])} &middot; {m['iterations']} measured calls
(+{m['warmup_calls']} warm-up) &middot; <b>{m['wall_ms']['mean']:.3f} ms</b> per call
(median {m['wall_ms']['median']:.3f}), operators {m['op_time_ms']:.3f} ms
({m['coverage_pct']:.0f}% of the call) &middot; peaks: {peaks}</div>
<h2>Suggestions</h2>{sugs}
<h2>Hotspots (share of operator time; dashed line: {m['hotspot_share']:g}%)</h2>
{hotspot_chart_svg(report)}
<h2>Timeline of one call (the median one)</h2>
<div class="legend">{legend}</div>{timeline_svg(report)}
<h2>Roofline ({escape(m['device'])})</h2>{roofline_svg(report)}
<h2>Operators</h2>{_ops_table(report)}
<h2>By op kind</h2><table><tr><th>op</th><th>nodes</th><th>ms</th><th>share</th></tr>{by_op}</table>
</body></html>
"""
