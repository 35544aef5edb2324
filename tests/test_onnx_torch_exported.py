"""ONNX files from PyTorch's own exporter (torch.onnx.export, dynamic batch) import and run:
real-world patterns (Shape/Gather/Concat chains on symbolic dims, Constant nodes, LSTM ops)."""

import warnings

import pytest
import torch

import deepseek as ds
from tests.conftest import rel_l2
from tests.model_zoo import ZOO


@pytest.mark.parametrize("name", ["small_cnn", "distilbert_tiny", "lstm_classifier", "yolo_tiny"])
def test_torch_exported_model_with_dynamic_batch(name, tmp_path):
    model, inputs = ZOO[name]()
    names = [f"in{i}" for i in range(len(inputs))]
    path = str(tmp_path / f"{name}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, path, input_names=names, opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in names})
    engine = ds.compile(path, backend="cpu")
    assert str(engine.graph.inputs[0].spec.shape[0]) == "batch"
    for batch in (1, 3):
        xs = tuple(torch.randn(batch, *t.shape[1:]) if t.is_floating_point()
                   else torch.randint(1, int(t.max()) + 1, (batch, *t.shape[1:]), dtype=t.dtype)
                   if t.max() > 1 else torch.ones(batch, *t.shape[1:], dtype=t.dtype) for t in inputs)
        with torch.no_grad():
            ref = model(*xs)
        ref = ref if isinstance(ref, torch.Tensor) else ref[0]
        got = engine(*xs)
        got = got if isinstance(got, torch.Tensor) else got[0]
        assert got.shape == ref.shape and rel_l2(got, ref) < 1e-4
