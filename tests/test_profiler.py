"""The profiler: trace validity, aggregation, suggestions on planted graphs, CLI and compare.

Peaks are fixed (not measured) where a test does not need them, so results do
not depend on the machine's load; no assertion is on speed.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import deepseek as ds
from deepseek.errors import DeepseekError
from deepseek.ir.ops import Op, Prop
from deepseek.passes import PIPELINES
from deepseek.profiler import DevicePeaks, measure_peaks
from deepseek.profiler.compare import compare
from deepseek.profiler.flops import node_flops
from deepseek.profiler.html import render_html
from deepseek.profiler.report import ProfileReport
from deepseek.runtime.plan import bytes_moved, node_bytes
from tests.conftest import rel_l2

PEAKS = DevicePeaks("cpu", gflops=50.0, gbps=10.0, threads=1)
PASSES = {p.__name__ for ps in PIPELINES.values() for p in ps}


def _without(*names: str) -> list[str]:
    return [n for n in names if n in PASSES]


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


class Chain(nn.Module):
    """A chain of element-wise ops on a large tensor, then a reduction."""

    def forward(self, x):
        h = x * 1.5
        h = h + 0.5
        h = torch.sigmoid(h)
        h = h * 2.0
        h = h - 0.25
        return h.sum(dim=-1)


class WithFallback(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return torch.special.erfc(self.fc(x)).sum(-1)  # erfc has no Deepseek kernel


def _load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _profile(engine, inputs, calls=4, **kw):
    kw.setdefault("peaks", PEAKS)
    with ds.profile(engine, **kw) as prof:
        for _ in range(calls):
            engine(*inputs)
    return prof, prof.report()


@pytest.fixture(scope="module")
def convbn():
    torch.manual_seed(0)
    model = ConvBN().eval()
    x = torch.randn(2, 3, 16, 16)
    return model, x, ds.compile(model, (x,), backend="cpu")


def test_trace_is_chrome_json_with_one_event_per_node_per_iteration(convbn, tmp_path):
    _, x, engine = convbn
    _, report = _profile(engine, (x,), calls=5, warmup=1)
    trace = _load(report.save(str(tmp_path))["trace"])
    assert isinstance(trace["traceEvents"], list)
    for e in trace["traceEvents"]:  # the Chrome trace event format's required fields
        assert e["ph"] in ("X", "M") and isinstance(e["name"], str)
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] == "X":
            assert isinstance(e["ts"], (int, float)) and e["dur"] >= 0
    nodes = [e for e in trace["traceEvents"] if e.get("cat") == "node"]
    calls = sorted((e for e in trace["traceEvents"] if e.get("cat") == "iteration"),
                   key=lambda e: e["ts"])
    assert len(calls) == 4  # 5 calls, the first one warm-up
    names = sorted(f"%{n.name}" for n in engine.graph.nodes)
    assert len(nodes) == len(names) * 4
    for k, call in enumerate(calls):
        mine = sorted((e for e in nodes if e["args"]["iteration"] == k), key=lambda e: e["ts"])
        assert sorted(e["args"]["node"] for e in mine) == names
        for a, b in itertools.pairwise(mine):  # sequential, in the call, not overlapping
            assert a["ts"] + a["dur"] <= b["ts"] + 1e-3
        assert call["ts"] - 1e-3 <= mine[0]["ts"]
        assert mine[-1]["ts"] + mine[-1]["dur"] <= call["ts"] + call["dur"] + 1e-3
    conv = next(e for e in nodes if e["name"] == "convolution")
    assert conv["args"]["shapes"][0] == [2, 3, 16, 16] and conv["args"]["flops"] > 0


def test_report_contract_shares_and_engine_restored(convbn, tmp_path):
    model, x, engine = convbn
    before = [(p.executable, p.backend) for p in engine._parts]
    _, report = _profile(engine, (x,), calls=4)
    assert "run_flat" not in vars(engine)  # detached: nothing left patched
    assert [(p.executable, p.backend) for p in engine._parts] == before
    assert rel_l2(engine(x), model(x)) < 1e-5
    data = _load(report.save(str(tmp_path))["report"])
    again = ProfileReport.load(str(tmp_path))  # what was saved renders the same page
    assert again.ops == data["ops"] and render_html(again) == render_html(report)
    for r in data["ops"]:
        assert {"name", "op", "time_ms", "share"} <= set(r)
    assert abs(sum(r["share"] for r in data["ops"]) - 100) < 1
    times = [r["time_ms"] for r in data["ops"]]
    assert times == sorted(times, reverse=True)
    assert isinstance(data["hotspots"], list) and isinstance(data["suggestions"], list)
    assert {h["name"] for h in data["hotspots"]} == {r["name"] for r in data["ops"]
                                                     if r["share"] >= 5.0}
    assert data["iterations"] == 3 and data["warmup_calls"] == 1
    conv = next(r for r in data["ops"] if r["op"] == "convolution")
    assert conv["module"] == "conv" and conv["source"]
    assert conv["dtypes"] == ["float32"] and conv["output_shapes"] == [[2, 8, 16, 16]]


def test_profiled_engine_returns_the_same_values(convbn):
    model, _, engine = convbn
    with ds.profile(engine, peaks=PEAKS):
        for _ in range(3):
            y = torch.randn(2, 3, 16, 16)
            assert rel_l2(engine(y), model(y)) < 1e-5


def test_planted_unfused_chain_triggers_the_fusion_suggestion():
    x = torch.randn(256, 1024)
    engine = ds.compile(Chain(), (x,), backend="cpu", disable_passes=_without("fuse_elementwise"))
    _, report = _profile(engine, (x,))
    chain = [s for s in report.suggestions if s["kind"] == "ew_chain_not_fused"]
    assert chain, [s["kind"] for s in report.suggestions]
    ops = {r["name"]: r["op"] for r in report.ops}
    named = [ops[n] for n in chain[0]["nodes"]]
    assert len(named) >= 4 and {"mul.Tensor", "add.Tensor", "sigmoid"} <= set(named)
    assert "MB moved" in chain[0]["detail"]
    if "fuse_elementwise" in PASSES:  # control: with the pass the chain is one kernel
        fused = ds.compile(Chain(), (x,), backend="cpu")
        _, report = _profile(fused, (x,))
        assert not [s for s in report.suggestions if s["kind"] == "ew_chain_not_fused"]


@pytest.mark.parametrize("vnni", [True, False])
def test_float32_gemms_suggest_the_precision_this_cpu_runs(monkeypatch, vnni):
    import deepseek.quantization.kernels as qk

    monkeypatch.setattr(qk, "_VNNI", vnni)
    x = torch.randn(64, 256)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    _, report = _profile(ds.compile(model, (x,), backend="cpu"), (x,))
    low = [s for s in report.suggestions if s["kind"] == "lower_precision"]
    assert low, [s["kind"] for s in report.suggestions]
    assert ("weight_bits=8" if vnni else "weight_bits=7") in low[0]["fix"]
    assert ("on VNNI" if vnni else "without VNNI") in low[0]["detail"]


def test_planted_unfolded_batch_norm_is_reported(convbn):
    model, x, folded = convbn
    engine = ds.compile(model, (x,), backend="cpu", disable_passes=["fuse_conv_bn"])
    _, report = _profile(engine, (x,))
    bn = [s for s in report.suggestions if s["kind"] == "bn_not_folded"]
    assert len(bn) == 1 and "disable_passes" in bn[0]["fix"]
    assert all(report.ops[[r["name"] for r in report.ops].index(n)]["op"]
               == "_native_batch_norm_legit_no_training" for n in bn[0]["nodes"])
    _, report = _profile(folded, (x,))  # control: folded, nothing to say
    assert not [s for s in report.suggestions if s["kind"] == "bn_not_folded"]


def test_planted_fallback_node_is_timed_and_warned():
    torch.manual_seed(0)
    model = WithFallback().eval()
    x = torch.randn(32, 16)
    engine = ds.compile(model, (x,), backend="cpu")
    prof, report = _profile(engine, (x,), calls=4)
    assert len(prof.probes) == 3 and prof.probes[1].backend == "reference"
    warn = [s for s in report.suggestions if s["kind"] == "cpu_fallback"]
    assert len(warn) == 1 and "aten.erfc.default" in warn[0]["detail"]
    assert "1 - torch.erf(x)" in warn[0]["detail"] and "test_profiler.py" in warn[0]["detail"]
    erfc = next(r for r in report.ops if r["fallback"])
    assert erfc["op"] == "aten.erfc.default" and erfc["time_ms"] > 0 and erfc["calls"] == 3
    events = [e for e in report.trace["traceEvents"] if e.get("cat") == "node"]
    assert len(events) == 3 * len(engine.graph.nodes)
    assert rel_l2(engine(x), model(x)) < 1e-5
    assert not [s for s in report.suggestions if s["kind"] == "host_sync"]  # CUDA only


def test_host_sync_rule_needs_a_gpu_partition():
    from deepseek.profiler.suggest import Context, host_synchronization

    def ctx(devices):
        parts = [{"index": i, "device": d} for i, d in enumerate(devices)]
        return Context(prof=SimpleNamespace(probes=[]), ops=[], peaks_for=None,
                       meta={"partitions": parts, "hotspot_share": 5.0}, kernel_map={})

    assert host_synchronization(ctx(["cpu", "cpu"])) == []
    found = host_synchronization(ctx(["cuda:0", "cpu", "cuda:0"]))
    assert found and found[0]["severity"] == "high" and "cuda:0 -> cpu" in found[0]["detail"]


def test_warmup_is_per_input_shape_and_an_all_warmup_profile_says_so():
    model = ConvBN().eval()
    x = torch.randn(2, 3, 16, 16)
    engine = ds.compile(model, (x,), backend="cpu", dynamic_dims={0: {0: "batch"}})
    with ds.profile(engine, warmup=1, peaks=PEAKS) as prof:
        engine(x)
    with pytest.raises(DeepseekError, match="warm-up"):
        prof.report()
    with ds.profile(engine, warmup=1, peaks=PEAKS) as prof:
        for b in (2, 3, 2, 3, 3):
            engine(torch.randn(b, 3, 16, 16))
    assert [c.warmup for c in prof.calls] == [True, True, False, False, False]
    report = prof.report()
    conv = next(r for r in report.ops if r["op"] == "convolution")
    assert conv["calls"] == 3
    per_call = [node_flops(n, {"batch": b}) for b in (2, 3, 3) for n in engine.graph.nodes
                if n.kind == "convolution"]
    assert conv["flops"] == sum(per_call) // 3


def test_opaque_backend_is_timed_per_partition():
    from deepseek.backends import Backend, Capabilities, hal, register_backend
    from deepseek.ir.interpreter import run_graph

    class Opaque(Backend):
        def capabilities(self):
            return Capabilities(device="cpu")

        def supports(self, node):
            return node.fallback is None

        def compile(self, graph, target=None):
            return graph

        def execute(self, executable, inputs, outputs=None):
            with torch.no_grad():
                return run_graph(executable, inputs)

    hal.discover()
    saved = dict(hal._FACTORIES), dict(hal._INSTANCES)
    try:
        register_backend("opaque-test", Opaque)
        x = torch.randn(4, 3, 8, 8)
        engine = ds.compile(ConvBN().eval(), (x,), backend="opaque-test")
        _, report = _profile(engine, (x,), calls=3)
    finally:
        hal._FACTORIES.clear(), hal._FACTORIES.update(saved[0])
        hal._INSTANCES.clear(), hal._INSTANCES.update(saved[1])
    assert [r["name"] for r in report.ops] == ["partition_0"]
    assert report.ops[0]["share"] == pytest.approx(100)
    assert len([e for e in report.trace["traceEvents"] if e.get("cat") == "partition"]) == 2


def _reference_flops(fn, *args) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("case", ["conv", "conv_grouped", "addmm", "bmm", "sdpa"])
def test_flop_counter_matches_torch_for_gemm_class(case):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False,
                                  groups=4 if case == "conv_grouped" else 1)
            self.fc = nn.Linear(32, 24)

        def forward(self, x):
            if case.startswith("conv"):
                return self.conv(x)
            if case == "addmm":
                return self.fc(x)
            if case == "bmm":
                return torch.bmm(x, x.transpose(1, 2))
            return nn.functional.scaled_dot_product_attention(x, x, x)

    x = {"conv": torch.randn(2, 8, 15, 15), "conv_grouped": torch.randn(2, 8, 15, 15),
         "addmm": torch.randn(5, 32), "bmm": torch.randn(3, 7, 9),
         "sdpa": torch.randn(2, 4, 10, 16)}[case]
    model = M().eval()
    graph = ds.capture(model, (x,))
    main = [n for n in graph.nodes if n.opdef.has(Prop.MATMUL)]
    assert len(main) == 1
    ours = node_flops(main[0], {})
    want = _reference_flops(model, x)
    if case == "sdpa":  # torch's counter skips the fused CPU kernel: count its math form
        want = _reference_flops(lambda q: (q @ q.transpose(-2, -1)).softmax(-1) @ q, x)
    if case == "addmm":
        want += 5 * 24  # torch counts the GEMM only; we add the bias adds
    if case == "sdpa":
        want += 5 * 2 * 4 * 10 * 10  # and the softmax, ~5 FLOPs per score
    assert ours == want


def test_flop_counter_elementwise_reduction_and_views():
    graph = ds.capture(lambda_module(lambda x: (x.relu() + 1).sum(1).view(-1)),
                       (torch.randn(4, 6),))
    by = {n.kind: node_flops(n, {}) for n in graph.nodes}
    assert by["relu"] == 24 and by["add.Tensor"] == 24 and by["sum.dim_IntList"] == 24
    assert by["view"] == 0


def lambda_module(fn):
    class L(nn.Module):
        def forward(self, x):
            return fn(x)

    return L().eval()


def test_node_bytes_adds_up_to_bytes_moved(convbn):
    _, _, engine = convbn
    env = {}
    assert sum(node_bytes(n, env) for n in engine.graph.nodes) == bytes_moved(engine.graph, env)
    conv = next(n for n in engine.graph.nodes if n.kind == "convolution")
    assert node_bytes(conv, env) == 4 * (2 * 3 * 16 * 16 + 8 * 3 * 9 + 8 + 2 * 8 * 16 * 16)


def test_peaks_are_measured_once_per_process():
    first = measure_peaks("cpu")
    assert first.gflops > 0.1 and first.gbps > 0.1 and math.isfinite(first.ridge)
    assert measure_peaks("cpu") is first
    assert first.attainable_gflops(1e9) == first.gflops
    assert first.attainable_gflops(1e-3) == pytest.approx(1e-3 * first.gbps)


def test_kernels_mode_maps_aten_ops_to_nodes(convbn):
    _, x, engine = convbn
    _, report = _profile(engine, (x,), calls=3, kernels=True)
    conv = next(r for r in report.ops if r["op"] == "convolution")
    assert conv["kernels"] and all(k["name"].startswith(("aten::", "mkldnn::"))
                                   for k in conv["kernels"])
    kern = [e for e in report.trace["traceEvents"] if e.get("pid") == 2 and e["ph"] == "X"]
    assert kern and {e["args"]["node"] for e in kern} >= {"%convolution"}


def test_console_table_highlights_hotspots(convbn):
    rich = pytest.importorskip("rich.console")
    _, _, engine = convbn
    x = torch.randn(2, 3, 16, 16)
    _, report = _profile(engine, (x,))
    console = rich.Console(record=True, width=220)
    report.print(console=console)
    text = console.export_text()
    assert "share" in text and f"%{report.hotspots[0]['name']}" in text
    plain = str(report)
    assert report.ops[0]["name"] in plain and "*" in plain


def test_html_report_is_self_contained(convbn):
    _, x, engine = convbn
    _, report = _profile(engine, (x,))
    from deepseek.profiler.html import render_html

    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 3
    assert "<script" not in page and "<link" not in page and "src=" not in page
    for h in report.hotspots:
        assert f"%{h['name']}" in page


def test_cli_profile_and_compare(tmp_path, capsys):
    from deepseek.profiler.cli import main

    model, x = ConvBN().eval(), torch.randn(1, 3, 16, 16)
    for name, disabled in (("before", ["fuse_conv_bn"]), ("after", [])):
        engine = ds.compile(model, (x,), backend="cpu", disable_passes=disabled)
        engine.save(str(tmp_path / f"{name}.dsk"))
        assert main([str(tmp_path / f"{name}.dsk"), "--iters", "3", "--warmup", "1",
                     "--backend", "cpu", "--out", str(tmp_path / name)]) == 0
        assert sorted(os.listdir(tmp_path / name)) == ["report.html", "report.json", "trace.json"]
    out = capsys.readouterr().out
    assert "convolution" in out and "wrote" in out
    assert main(["--compare", str(tmp_path / "before/report.json"),
                 str(tmp_path / "after/report.json"), "--out", str(tmp_path)]) == 0
    diff = _load(tmp_path / "compare.json")
    status = {r["name"]: r["status"] for r in diff["ops"]}
    bn = next(n for n in status if "batch_norm" in n)
    assert status[bn] == "removed" and "convolution" in status
    assert any("batch norm" in s for s in diff["suggestions"]["resolved"])
    assert "removed" in capsys.readouterr().out


def test_cli_compiles_in_the_precision_asked_for(tmp_path, half_precisions_native):
    """--precision reaches ds.compile: the report says bf16 and the plan runs bf16 GEMMs."""
    from deepseek.profiler.cli import main

    assert main(["mnist_cnn", "--iters", "2", "--warmup", "1", "--backend", "cpu",
                 "--precision", "bf16", "--out", str(tmp_path)]) == 0
    report = _load(tmp_path / "report.json")
    assert report["precision"] == "bf16"
    assert any("bfloat16" in str(op["dtypes"]) for op in report["ops"])


def test_cli_errors_are_clear(tmp_path, capsys):
    from deepseek.profiler.cli import main

    assert main([str(tmp_path / "missing.dsk")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["--compare", str(tmp_path / "bad.json"), str(tmp_path / "bad.json")]) == 2
    assert "not a deepseek-profiler report" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["mnist_cnn", "--input-shape", "1,x,y"])


def test_compare_marks_new_removed_faster_slower():
    before = {"ops": [{"name": "a", "op": "mm", "time_ms": 2.0}, {"name": "b", "op": "relu",
                                                                   "time_ms": 1.0}]}
    after = {"ops": [{"name": "a", "op": "mm", "time_ms": 1.0}, {"name": "c", "op": "add",
                                                                  "time_ms": 0.5}]}
    diff = compare(before, after)
    status = {r["name"]: r["status"] for r in diff["ops"]}
    assert status == {"a": "faster 2.00x", "b": "removed", "c": "new"}
    assert diff["total"]["before_ms"] == 3.0 and diff["total"]["after_ms"] == 1.5


def test_a_bound_method_taken_before_the_block_is_explained(convbn):
    _, x, engine = convbn
    run = engine.run_flat  # bound before the profile attached: bypasses its recording
    with ds.profile(engine, peaks=PEAKS) as prof:
        run([x])
        run([x])
    with pytest.raises(DeepseekError, match="no call was recorded"):
        prof.report()


def test_a_call_that_raises_leaves_the_profile_consistent():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.emb = nn.Linear(8, 8), nn.Embedding(10, 8)

        def forward(self, x, ids):
            return self.fc(x) + self.emb(ids)  # the addmm runs before the embedding

    model = M().eval()
    x, ids = torch.randn(4, 8), torch.randint(0, 10, (4,))
    engine = ds.compile(model, (x, ids), backend="cpu")
    with ds.profile(engine, peaks=PEAKS, warmup=0) as prof:
        engine(x, ids)
        with pytest.raises((IndexError, RuntimeError)):
            engine(x, torch.full((4,), 99))  # out of range: fails inside the plan
        engine(x, ids)
    report = prof.report()
    assert report.meta["iterations"] == 2
    assert all(r["calls"] == 2 for r in report.ops)


def test_gathers_and_in_place_updates_count_only_the_elements_they_touch():
    from deepseek.passes.memory import schedule_inplace_ops

    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(1000, 16)

        def forward(self, ids):
            return self.table(ids).index_select(0, ids[:2]) * 2

    graph = ds.capture(Lookup().eval(), (torch.randint(0, 1000, (5,)),))
    emb, sel = (next(n for n in graph.nodes if n.kind == k) for k in ("embedding", "index_select"))
    # 5 rows of the 1000-row table read, the 5 indices read, 5 rows written
    assert node_bytes(emb, {}) == 5 * 16 * 4 + 5 * 8 + 5 * 16 * 4
    assert node_bytes(sel, {}) == 2 * 16 * 4 + 2 * 8 + 2 * 16 * 4

    class Update(nn.Module):
        def forward(self, cache, pos, rows):
            return cache.index_put((pos,), rows)

    graph = ds.capture(Update().eval(), (torch.randn(64, 8), torch.tensor([3, 9]), torch.randn(2, 8)))
    put = next(n for n in graph.nodes if n.kind == "index_put")
    assert node_bytes(put, {}) == 2 * 64 * 8 * 4 + 2 * 8 + 2 * 8 * 4  # a copy: whole cache twice
    graph.donated = frozenset(v.name for v in graph.inputs)
    schedule_inplace_ops(graph)
    assert put.reuse == 0
    assert node_bytes(put, {}) == 2 * 8 + 2 * (2 * 8 * 4)  # in place: indices, rows read and written


@pytest.mark.parametrize("calibration", ["minmax", "dynamic", "weight_only_int4"])
def test_flop_counter_counts_int8_kernels_as_their_float_ops(calibration):
    """A lowered int8 convolution/linear (static, dynamic, weight-only 4-bit with packed
    weights) counts the multiply-adds of the float op it replaces (profiles of quantized
    models placed every int8 kernel at 0 FLOPs, so the roofline called them memory-bound)."""
    from deepseek.quantization import QuantConfig, Quantizer

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 6 * 6, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    model, x = M().eval(), torch.randn(2, 3, 8, 8)
    floats = {n.op: node_flops(n, {}) for n in ds.optimize_graph(ds.capture(model, (x,))).nodes
              if n.opdef.has(Prop.MATMUL)}
    if calibration == "weight_only_int4":
        config, calib = QuantConfig(weight_bits=4, activation_bits=None, group_size=32), None
    else:
        config, calib = QuantConfig(calibration=calibration), [[torch.randn(2, 3, 8, 8)]]
    qmodel = Quantizer(QuantConfig(**{**config.__dict__, "progress": False})).quantize(
        model, calib)
    lowered = ds.optimize_graph(ds.capture(qmodel, (x,)))
    counted = {n.op: node_flops(n, {}) for n in lowered.nodes if n.opdef.has(Prop.MATMUL)}
    linear = {"minmax": Op.LINEAR_INT8, "dynamic": Op.LINEAR_INT8_DYNAMIC,
              "weight_only_int4": Op.LINEAR_WEIGHT_ONLY}[calibration]
    assert counted[linear] == floats[Op.ADDMM] > 0
    if calibration == "minmax":
        assert counted[Op.CONV2D_INT8] == floats[Op.CONVOLUTION] > 0
