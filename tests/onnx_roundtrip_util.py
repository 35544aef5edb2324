"""Shared by the ONNX round-trip tests: PyTorch -> IR -> ONNX -> IR -> run vs eager."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

import deepseek as ds
from deepseek.frontend.onnx_export import to_onnx
from deepseek.frontend.onnx_import import import_onnx
from deepseek.numerics import fresh_like  # noqa: F401  (re-exported for the tests)
from tests.conftest import rel_l2


def roundtrip(model, inputs, dynamic_dims=None, run_inputs=None, tol=1e-4):
    """Capture, export to ONNX (checked), import back, compile for the CPU and compare."""
    graph = ds.capture(model, inputs, dynamic_dims=dynamic_dims)
    proto = to_onnx(graph)  # onnx.checker full check inside
    back = import_onnx(proto.SerializeToString())
    engine = ds.compile(back, backend="cpu")
    run_inputs = run_inputs or fresh_like(inputs)
    with torch.no_grad():
        ref = [t for t in tree_leaves(model(*run_inputs)) if isinstance(t, torch.Tensor)]
    got = engine(*run_inputs)
    got = list(got) if isinstance(got, tuple) else [got]
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        if r.is_floating_point():
            assert r.std() > 0, "a degenerate reference cannot catch errors"
            assert rel_l2(g, r) < tol, rel_l2(g, r)
        else:
            assert torch.equal(g, r)
    return graph, proto, back
