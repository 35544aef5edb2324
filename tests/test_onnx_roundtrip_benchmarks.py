"""PyTorch -> IR -> ONNX -> IR -> run matches eager for the four benchmark models (small sizes;
same architectures), and a symbolic batch dim survives the trip as a dim_param."""

import pytest
import torch

from benchmarks.models import BENCHMARK_MODELS
from tests.onnx_roundtrip_util import roundtrip

SMALL = {
    "mnist_cnn": dict(batch=2),
    "resnet50": dict(batch=1, image=32),
    "bert_base": dict(batch=2, seq=8),
    "gpt2_small": dict(batch=1, seq=8),
}


@pytest.mark.parametrize("name", sorted(BENCHMARK_MODELS))
def test_benchmark_model_roundtrip(name):
    model, inputs = BENCHMARK_MODELS[name](**SMALL[name])
    roundtrip(model, inputs)


def test_dynamic_batch_roundtrip():
    model, inputs = BENCHMARK_MODELS["mnist_cnn"](batch=2)
    graph, proto, back = roundtrip(model, inputs, dynamic_dims={0: {0: "batch"}},
                                   run_inputs=(torch.randn(5, 1, 28, 28),))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert str(back.inputs[0].spec.shape[0]) == "batch"
