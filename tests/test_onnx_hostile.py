"""Truncated, mutated (hypothesis) and hostile ONNX files give a Deepseek error: never a
crash, a foreign exception or a hang."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import deepseek as ds
from deepseek.errors import CaptureError, DeepseekError, UnsupportedOpError
from deepseek.frontend.onnx_import import import_onnx

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=(), opset=18, functions=()):
    m = helper.make_model(helper.make_graph(nodes, "h", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("x", 1)],
                          functions=list(functions))
    m.ir_version = 10
    return m


def _vi(name, shape, t=F):
    return helper.make_tensor_value_info(name, t, shape)


def _seed_model() -> bytes:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "fw"], ["y"], transB=1),
             helper.make_node("Softmax", ["y"], ["p"], axis=-1)]
    inits = [numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([1, -1]), "shape"),
             numpy_helper.from_array(rng.standard_normal((3, 32)).astype(np.float32), "fw")]
    return _model(nodes, [_vi("x", [1, 1, 4, 4])], [_vi("p", [1, 3])], inits).SerializeToString()


SEED = _seed_model()


def _import_and_maybe_run(data: bytes) -> None:
    """Import; if that works, compile and run small models: only Deepseek errors may escape."""
    try:
        graph = import_onnx(data)
    except DeepseekError:
        return
    try:
        engine = ds.compile(graph, backend="cpu")
        inputs = []
        for v in engine.graph.inputs:
            if not v.spec.is_static or v.spec.nbytes() > 1 << 20 or v.spec.dtype != torch.float32:
                return
            inputs.append(torch.randn(v.spec.shape))
        outs = [o for o in engine.graph.outputs if o.spec.is_static]
        if any(o.spec.nbytes() > 1 << 20 for o in outs):
            return
        engine(*inputs)
    except DeepseekError:
        return


def test_the_seed_model_works():
    engine = ds.compile(import_onnx(SEED), backend="cpu")
    assert engine(torch.randn(1, 1, 4, 4)).shape == (1, 3)


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(SEED) - 1))
def test_truncated_files(cut):
    with pytest.raises(DeepseekError):
        import_onnx(SEED[:cut]) if cut < 8 else _strict_import(SEED[:cut])


def _strict_import(data: bytes):
    """A truncated file may still parse (protobuf is lenient): then it must import or fail cleanly."""
    try:
        import_onnx(data)
    except DeepseekError:
        raise
    raise DeepseekError("parsed")  # a clean parse of a prefix is acceptable too


@settings(max_examples=300, deadline=10000, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), min_size=1, max_size=12))
def test_mutated_bytes(flips):
    data = bytearray(SEED)
    for pos, byte in flips:
        data[pos] = byte
    _import_and_maybe_run(bytes(data))


@settings(max_examples=100, deadline=5000)
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    _import_and_maybe_run(data)


@settings(max_examples=100, deadline=10000, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(SEED)), st.binary(min_size=1, max_size=64))
def test_inserted_bytes(pos, blob):
    _import_and_maybe_run(SEED[:pos] + blob + SEED[pos:])


def _raises(model, err=DeepseekError, match=None):
    with pytest.raises(err, match=match):
        g = import_onnx(model.SerializeToString() if isinstance(model, onnx.ModelProto) else model)
        ds.compile(g, backend="cpu")


def test_hostile_models():
    # a model of no graph, an opset from the future, a node reading an undefined value
    _raises(b"\x08\x07", CaptureError, "no graph")
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", None)], opset=999)
    _raises(m, CaptureError, "newer")
    _raises(_model([helper.make_node("Relu", ["nope"], ["y"])], [_vi("x", [2])], [_vi("y", None)]),
            CaptureError, "read before it is defined")
    # an initializer whose data does not fit its dims; a negative dim; absurd sizes
    t = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    t.dims[:] = [1000, 1000]
    _raises(_model([helper.make_node("Add", ["x", "w"], ["y"])], [_vi("x", [4])], [_vi("y", None)], [t]),
            CaptureError, "malformed")
    t2 = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    t2.dims[:] = [-4]
    _raises(_model([helper.make_node("Add", ["x", "w"], ["y"])], [_vi("x", [4])], [_vi("y", None)], [t2]),
            CaptureError, "negative")
    t3 = numpy_helper.from_array(np.zeros(1, np.float32), "w")
    t3.dims[:] = [1 << 40, 1 << 30]
    _raises(_model([helper.make_node("Add", ["x", "w"], ["y"])], [_vi("x", [4])], [_vi("y", None)], [t3]),
            CaptureError)
    # huge tables must not be built at import (no hang, no memory blow-up)
    big = numpy_helper.from_array(np.array([1 << 40], np.int64), "r")
    m = _model([helper.make_node("Range", ["s", "r", "d"], ["y"])], [], [_vi("y", None, TensorProto.INT64)],
               [numpy_helper.from_array(np.array(0), "s"), numpy_helper.from_array(np.array(1 << 40), "r"),
                numpy_helper.from_array(np.array(1), "d")])
    del big
    _raises(m, CaptureError, "unreasonable")
    m = _model([helper.make_node("Resize", ["x", "", "", "sz"], ["y"], mode="linear")], [_vi("x", [1, 8])],
               [_vi("y", None)], [numpy_helper.from_array(np.array([1, 1 << 30]), "sz")])
    _raises(m, CaptureError, "unreasonable")
    # unrolling has limits: a loop of 10^12 iterations is refused, not run
    body = helper.make_graph([helper.make_node("Identity", ["c"], ["co"]), helper.make_node("Identity", ["v"], ["vo"])],
                             "b", [_vi("i", [], TensorProto.INT64), _vi("c", [], TensorProto.BOOL), _vi("v", [2])],
                             [_vi("co", [], TensorProto.BOOL), _vi("vo", [2])])
    m = _model([helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)], [_vi("x", [2])], [_vi("y", None)],
               [numpy_helper.from_array(np.array(10 ** 12), "n")])
    _raises(m, UnsupportedOpError, "iterations")
    # a model-local function that calls itself
    fn = helper.make_function("x", "Self", ["a"], ["b"], [helper.make_node("Self", ["a"], ["b"], domain="x")],
                              [helper.make_opsetid("", 18), helper.make_opsetid("x", 1)])
    m = _model([helper.make_node("Self", ["x"], ["y"], domain="x")], [_vi("x", [2])], [_vi("y", None)],
               functions=[fn])
    _raises(m, CaptureError, "nest")
    # wrong attribute types and values
    _raises(_model([helper.make_node("Softmax", ["x"], ["y"], axis=7)], [_vi("x", [2])], [_vi("y", None)]),
            CaptureError, "axis")
    _raises(_model([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 0])], [_vi("x", [2, 2])],
                   [_vi("y", None)]), CaptureError, "permutation")
    _raises(_model([helper.make_node("Add", ["x", "x2"], ["y"])], [_vi("x", [2, 3]), _vi("x2", [4])],
                   [_vi("y", None)]), CaptureError, "rejects")
    # an input without a shape; a non-tensor input
    no_shape = helper.make_tensor_value_info("x", F, None)
    _raises(_model([helper.make_node("Relu", ["x"], ["y"])], [no_shape], [_vi("y", None)]),
            CaptureError, "no shape")
    seq = helper.make_tensor_sequence_value_info("x", F, None)
    _raises(_model([helper.make_node("Identity", ["x"], ["y"])], [seq], [_vi("y", None)]),
            UnsupportedOpError, "tensor inputs")


def test_deeply_nested_subgraphs_are_refused():
    leaf = helper.make_graph([helper.make_node("Identity", ["x"], ["y0"])], "leaf", [], [_vi("y0", [1])])
    g = leaf
    for i in range(30):  # If inside If inside If...
        g = helper.make_graph([helper.make_node("If", ["c"], [f"y{i + 1}"], then_branch=g,
                                                else_branch=leaf)], f"g{i}", [], [_vi(f"y{i + 1}", [1])])
    m = _model(list(g.node), [_vi("x", [1])], [_vi("y30", None)],
               [numpy_helper.from_array(np.array(True), "c")])
    _raises(m, CaptureError, "nest deeper")
