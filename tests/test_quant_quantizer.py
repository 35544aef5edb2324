"""Quantizer behaviour: module swapping, skip patterns, BN folding, QAT, sensitivity,
mixed precision by accuracy budget, and the ``deepseek quantize`` command."""

import json
import os

import numpy as np

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepseek.quantization import (QuantConfig, QuantizationError, QuantizedConv2d,
                                   QuantizedLinear, Quantizer, sensitivity_analysis)
from deepseek.quantization.qat import FakeQuantize, QATLayer, fake_quantize_ste
from deepseek.quantization.observers import qrange

from tests.conftest import rel_l2

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small kernels: one intra-op thread is fastest, and fair to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 36, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _calib(n=3):
    return [torch.randn(8, 1, 6, 6) for _ in range(n)]


def test_quantize_swaps_layers_folds_bn_and_keeps_the_original():
    model = _net()
    model[1].running_mean.uniform_(-1, 1)
    q = Quantizer(QuantConfig(skip=["6"]))
    qm = q.quantize(model, _calib())
    assert isinstance(qm[0], QuantizedConv2d) and isinstance(qm[1], nn.Identity)
    assert isinstance(qm[4], QuantizedLinear) and type(qm[6]) is nn.Linear  # skipped
    assert q.report.mode == "static" and q.report.quantized == ["0", "4"]
    assert q.report.kept_float == ["6"]
    assert type(model[0]) is nn.Conv2d and isinstance(model[1], nn.BatchNorm2d)  # untouched
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():
        assert rel_l2(qm(x), model(x)) < 0.05
    assert qm[0].weight.qweight.dtype == torch.int8 and qm[0].input_quant.dtype == torch.uint8
    state = qm.state_dict()  # round trip through a state_dict
    again = q.quantize(model, _calib())
    again.load_state_dict(state)
    torch.testing.assert_close(again(x), qm(x))


def test_weight_only_without_calibration_and_bad_input():
    q = Quantizer(QuantConfig(weight_bits=4, granularity="per_group", group_size=12))
    qm = q.quantize(_net())
    assert q.report.mode == "weight_only" and qm[4].input_quant is None
    assert qm[4].weight.granularity == "per_group" and qm[4].weight.scale.shape == (16, 24)
    assert qm[6].weight.granularity == "per_channel"  # 16 inputs: no group of 12 splits them
    with pytest.raises(QuantizationError, match="no batches"):
        Quantizer().quantize(_net(), [])
    with pytest.raises(QuantizationError, match="nn.Module"):
        Quantizer().quantize("model.pt", _calib())
    with pytest.raises(QuantizationError, match="eval_fn"):
        Quantizer(QuantConfig(accuracy_budget=0.1)).quantize(_net(), _calib())


def test_straight_through_estimator_gradients():
    r = qrange(8, False, False)
    x = torch.tensor([-1.5, 0.26, 0.5, 3.0], requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    y = fake_quantize_ste(x, s, torch.tensor(10.0), r)
    torch.testing.assert_close(y.detach(), torch.tensor([-1.0, 0.3, 0.5, 3.0]))
    y.sum().backward()
    # inside the range the gradient passes straight through; -1.5 is clamped (q = 0)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0]
    # LSQ: d/ds of (round(x/s) - x/s) * s inside the range, (qmin - z) at the clamp
    want = (-10.0) + (3 - 2.6) + (5 - 5) + (30 - 30)
    assert float(s.grad) == pytest.approx(want, abs=1e-5)


def test_qat_trains_and_converts_to_the_same_function():
    torch.manual_seed(0)
    model = _net()
    x = torch.randn(64, 1, 6, 6)
    y = model(x).argmax(1)
    for learnable in (False, True):
        q = Quantizer(QuantConfig(method="symmetric"))
        qat = q.prepare_qat(model, _calib(), learnable_scales=learnable)
        assert qat.training and isinstance(qat[0], QATLayer) and isinstance(qat[1], nn.Identity)
        opt = torch.optim.SGD(qat.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(qat(x), y).backward()
            opt.step()
        if learnable:
            assert qat[4].input_fq.scale.grad is not None and qat[4].weight_fq.learnable
        qat.eval()
        with torch.no_grad():
            fq_out = qat(x)
        qm = q.convert(qat)
        assert isinstance(qm[0], QuantizedConv2d) and isinstance(qm[4], QuantizedLinear)
        with torch.no_grad():
            assert rel_l2(qm(x), fq_out) < 1e-3  # the trained fake-quant model, made integer


def test_fake_quantize_observes_activations_until_calibrated():
    fq = FakeQuantize(qrange(8, False, False), False, weight=False).train()
    fq(torch.tensor([0.0, 2.55]))
    assert float(fq.scale) == pytest.approx(0.01)
    fq(torch.tensor([0.0, 5.1]))  # EMA: moves 1% of the way
    assert float(fq.max_val) == pytest.approx(2.55 + 0.01 * 2.55)


def test_sensitivity_report_and_mixed_precision():
    model = _net()
    with torch.no_grad():
        model[6].weight[0, 0] = 40.0  # an outlier: per-tensor 4-bit ruins this layer alone
    calib = _calib()
    x = torch.randn(128, 1, 6, 6)
    with torch.no_grad():
        labels = model(x).argmax(1)

    def agreement(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == labels).float().mean()) * 100

    config = QuantConfig(weight_bits=4, activation_bits=8, granularity="per_tensor")
    report = sensitivity_analysis(model, config, calib, eval_fn=agreement)
    ranked = report.ranked()
    assert ranked[0].name == "6" and ranked[0].metric_drop > 5
    assert {s.name for s in ranked} == {"0", "4", "6"} and "out.err" in str(report)
    assert json.loads(report.to_json())["layers"][0]["name"] == "6"

    config.accuracy_budget = 3.0
    q = Quantizer(config)
    qm = q.quantize(model, calib, eval_fn=agreement)
    assert "6" in q.report.mixed_precision and type(qm[6]) is nn.Linear
    assert q.report.metric_float - q.report.metric_quantized <= 3.0
    assert agreement(qm) == pytest.approx(q.report.metric_quantized)


def test_cli_quantize(tmp_path, capsys):
    from deepseek.cli import main

    out = tmp_path / "m.dsk"
    report = tmp_path / "r.json"
    assert main(["quantize", "mnist_cnn", "-o", str(out), "--method", "symmetric",
                 "--calibration", "percentile", "--calib-batches", "2", "--report",
                 str(report)]) == 0
    text = capsys.readouterr().out
    assert "4 layers quantized" in text and "x the fp32 engine" in text
    doc = json.loads(report.read_text())
    assert doc["bytes"] < 0.27 * doc["fp32_bytes"] and doc["config"]["method"] == "symmetric"
    assert main(["quantize", "mnist_cnn", "-o", str(out), "--calib-data", "nowhere:fn"]) == 2
    # dynamic: no calibration data; the CNN's two Linear layers quantized, its convs float
    assert main(["quantize", "mnist_cnn", "-o", str(out), "--calibration", "dynamic",
                 "--report", str(report)]) == 0
    assert "dynamic quantization: 2 layers quantized, 2 kept in float" in capsys.readouterr().out
    assert json.loads(report.read_text())["report"]["mode"] == "dynamic"


class _Tagger(nn.Module):
    """Token embedding + linear head: a small LLM-shaped model."""

    def __init__(self, vocab=50):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, ids):
        return self.head(torch.relu(self.embed(ids)))


@pytest.mark.parametrize("method", ["symmetric", "asymmetric"])
def test_embeddings_quantize_per_row_like_the_formula(method):
    from deepseek.quantization import QuantizedEmbedding

    model = _Tagger().eval()
    q = Quantizer(QuantConfig(method=method, activation_bits=None, embeddings=True,
                              progress=False)).quantize(model)
    assert isinstance(q.embed, QuantizedEmbedding) and q.embed.weight.qweight.dtype == torch.int8
    # NumPy reference of per-row int8 weights: scale from each row's range, round, clamp
    w = model.embed.weight.detach().double().numpy()
    if method == "symmetric":
        scale = np.abs(w).max(1, keepdims=True) / 127
        zp = np.zeros_like(scale)
        qw = np.clip(np.round(w / scale), -127, 127)
    else:
        lo, hi = np.minimum(w.min(1, keepdims=True), 0), np.maximum(w.max(1, keepdims=True), 0)
        scale = (hi - lo) / 255
        zp = np.clip(np.round(-128 - lo / scale), -128, 127)
        qw = np.clip(np.round(w / scale) + zp, -128, 127)
    ids = torch.randint(0, 50, (3, 7))
    want = torch.from_numpy(((qw - zp) * scale)[ids.numpy()]).float()
    got = q.embed(ids)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert rel_l2(got, model.embed(ids)) < 1e-2  # close to the float table


def test_quantized_embeddings_compile_to_an_int8_table_and_a_smaller_artifact(tmp_path):
    import deepseek as ds

    model = _Tagger(vocab=2000).eval()  # the table dominates the artifact
    ids = torch.randint(0, 2000, (4, 9))
    sizes = {}
    for flag in (False, True):
        q = Quantizer(QuantConfig(activation_bits=None, embeddings=flag,
                                  progress=False)).quantize(model)
        engine = ds.compile(q, (ids,), backend="cpu")
        fresh = torch.randint(0, 2000, (4, 9))
        assert rel_l2(engine(fresh), q(fresh)) < 1e-6
        path = str(tmp_path / f"m{flag}.dsk")
        engine.save(path)
        sizes[flag] = os.path.getsize(path)
        if flag:
            tables = [t for t in engine.graph.constants.values() if t.shape == (2000, 16)]
            assert tables and all(t.dtype == torch.int8 for t in tables)
    assert sizes[True] < 0.5 * sizes[False]  # int8 rows and a float scale per row


def test_embeddings_with_calibration_data_calibrate_only_the_layers():
    model = _Tagger().eval()
    batches = [torch.randint(0, 50, (2, 5)) for _ in range(3)]
    qz = Quantizer(QuantConfig(embeddings=True, progress=False))
    q = qz.quantize(model, batches)
    assert isinstance(q.head, QuantizedLinear) and q.head.input_quant is not None
    assert "embed" in qz.report.quantized


def test_skip_patterns_that_match_nothing_are_an_error():
    with pytest.raises(QuantizationError, match=r"\['clasifier\.\*'\] match no module"):
        Quantizer(QuantConfig(skip=["clasifier.*"], progress=False)).quantize(_net(), _calib())


def _layer_means(model, names, data):
    """{name: the mean output per channel of module ``name`` over ``data``}."""
    out, hooks = {}, []
    for n in names:
        def hook(m, a, y, n=n):
            dims = (0, 2, 3) if y.dim() == 4 else (0,)
            out.setdefault(n, []).append(y.double().mean(dims))
        hooks.append(model.get_submodule(n).register_forward_hook(hook))
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    return {n: torch.stack(v).mean(0) for n, v in out.items()}


@pytest.mark.parametrize("method", ["symmetric", "asymmetric"])
def test_bias_correction_matches_every_layers_mean_output_to_float(method):
    """Corrected layer by layer, each quantized layer's mean output per channel over the
    calibration data is the float model's (uncorrected, it is not); a generator serves as
    calibration data too."""
    model, calib = _net(), [torch.rand(8, 1, 6, 6) * 3 for _ in range(4)]
    cfg = dict(method=method, granularity="per_tensor", weight_bits=4, progress=False)
    plain = Quantizer(QuantConfig(**cfg)).quantize(model, calib)
    q = Quantizer(QuantConfig(bias_correction=True, **cfg))
    corrected = q.quantize(model, (x for x in calib))
    names = ["0", "4", "6"]
    assert sorted(q.report.bias_shifts) == names and "bias correction on 3" in str(q.report)
    folded = Quantizer(QuantConfig(**cfg)).prepare(model)  # BN folded: the float reference
    want = _layer_means(folded, names, calib)
    got, before = _layer_means(corrected, names, calib), _layer_means(plain, names, calib)
    for n in names:
        scale = want[n].abs().max()
        assert (got[n] - want[n]).abs().max() < 1e-5 * scale
    assert max(float((before[n] - want[n]).abs().max() / want[n].abs().max())
               for n in names) > 1e-3
    x = torch.rand(8, 1, 6, 6) * 3
    with torch.no_grad():  # the correction moved outputs towards float on fresh data
        assert rel_l2(corrected(x), model(x)) < rel_l2(plain(x), model(x))


def test_bias_correction_compiles_to_the_same_int8_engine_result():
    import deepseek as ds

    model = _net()
    q = Quantizer(QuantConfig(bias_correction=True, progress=False)).quantize(model, _calib())
    x = torch.randn(8, 1, 6, 6)
    engine = ds.compile(q, (x,), backend="cpu", precision="int8")
    with torch.no_grad():
        assert rel_l2(engine(x), q(x)) < 1e-4


def test_bias_correction_flag_is_checked():
    with pytest.raises(QuantizationError, match="bias_correction must be True or False"):
        QuantConfig(bias_correction="yes")
