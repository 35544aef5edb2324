"""ONNX's own backend node tests against deepseek.onnx_backend: a representative subset.

The full run (every node test shipped in the onnx package) is
``python -m benchmarks.onnx_conformance``; it writes docs/onnx-conformance.md. Here:
up to two tests of every op in Deepseek's ONNX op set, the pass rate asserted, plus
ONNX's unittest runner (onnx.backend.test.BackendTest) driving the backend unchanged.
"""

from __future__ import annotations

import unittest

import pytest

import deepseek.onnx_backend as backend
from benchmarks import onnx_conformance as conf

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def cases():
    return conf.load_cases()


def _subset(cases):
    names = conf.op_names(cases)
    ops = conf.op_set()
    by_op: dict[str, list] = {}
    for tc in sorted(cases, key=lambda c: c.name):
        if conf.in_scope(tc, ops):
            by_op.setdefault(names[tc.name], []).append(tc)
    picked = []
    for op, tcs in sorted(by_op.items()):
        picked += [tcs[0]] + ([tcs[len(tcs) // 2]] if len(tcs) > 2 else [])
    return picked, names


def test_representative_subset_pass_rate(cases):
    picked, names = _subset(cases)
    assert len(picked) > 250
    results = [conf.run_case(tc, names[tc.name], True, timeout=30) for tc in picked]
    failed = [f"{r.name}: {r.status}: {r.reason[:120]}" for r in results if r.status != "pass"]
    rate = 1 - len(failed) / len(results)
    print(f"{len(results) - len(failed)}/{len(results)} pass ({rate:.1%})")
    assert rate >= 0.90, "\n".join(failed)


@pytest.mark.parametrize("name", [
    "test_conv_with_strides_and_asymmetric_padding", "test_gemm_all_attributes", "test_lstm_defaults",
    "test_resize_upsample_scales_cubic", "test_attention_4d_gqa", "test_layer_normalization_4d_axis1",
    "test_qlinearmatmul_2D_uint8_float32", "test_nonzero_example"])
def test_key_cases(cases, name):
    tc = next(c for c in cases if c.name == name)
    r = conf.run_case(tc, conf.op_names(cases)[name], True, timeout=30)
    if name == "test_nonzero_example":  # data-dependent output shape: refused clearly
        assert r.status == "unsupported" and "data-dependent" in r.reason
    else:
        assert r.status == "pass", r.reason


def test_onnx_backend_test_runner_drives_the_backend_unchanged():
    import onnx.backend.test

    bt = onnx.backend.test.BackendTest(backend, __name__)
    bt.include(r"^test_(relu|softmax_axis_1|matmul_2d|gather_0|reduce_sum_keepdims_example)_cpu$")
    suite = unittest.TestSuite()
    for case in bt.test_cases.values():
        suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(case))
    result = unittest.TextTestRunner(verbosity=0).run(suite)
    ran = result.testsRun - len(result.skipped)  # tests left out by include() are skipped
    assert ran == 5 and result.wasSuccessful(), result.failures + result.errors
    assert backend.supports_device("CPU") and not backend.supports_device("CUDA")


def test_run_node_and_run_model():
    import numpy as np
    from onnx import helper

    node = helper.make_node("Add", ["a", "b"], ["c"])
    a, b = np.random.rand(3, 4).astype(np.float32), np.random.rand(4).astype(np.float32)
    (c,) = backend.run_node(node, [a, b])
    np.testing.assert_allclose(c, a + b, rtol=1e-6)
