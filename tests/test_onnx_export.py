"""IR -> ONNX: every op the models use exports to a model onnx.checker accepts (full check)
and ONNX Runtime runs with the reference interpreter's results; symbolic dims become
dim_params; quantize/dequantize export as QDQ; fused kernels and opsets 13..newest."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

import deepseek as ds
from deepseek.errors import DeepseekError, UnsupportedOpError
from deepseek.frontend.onnx_export import export_onnx, to_onnx
from deepseek.frontend.onnx_types import numpy_to_torch, torch_to_numpy
from deepseek.ir.graph import Graph, Node
from deepseek.ir.interpreter import infer_specs, run_graph
from deepseek.ir.ops import Op
from deepseek.ir.types import Sym, TensorSpec
from tests.conftest import rel_l2

ort = pytest.importorskip("onnxruntime")


def one_op_graph(op, tensors, attrs=None, consts=()) -> Graph:
    """A graph of one node op(*tensors, **attrs); tensors at ``consts`` positions are weights."""
    g = Graph()
    ins = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            ins.append(t)
        elif i in consts:
            ins.append(g.add_constant(f"w{i}", t))
        else:
            v = g.add_input(f"x{i}", TensorSpec.of(t))
            g.input_names.append(f"x{i}")
            ins.append(v)
    attrs = dict(attrs or {})
    specs = infer_specs(Node(op, ins, attrs, []), {})
    node = g.add_node(op, ins, attrs, specs, name="out")
    g.outputs = [o for o in node.outputs]
    return g


def ort_run(model: onnx.ModelProto, feeds: list[torch.Tensor]) -> list[torch.Tensor]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {i.name: torch_to_numpy(t) for i, t in zip(sess.get_inputs(), feeds)})
    return [numpy_to_torch(np.asarray(o)) for o in outs]


def check_graph(g: Graph, feeds, opset=None, tol=1e-5):
    model = to_onnx(g, opset)  # runs onnx.checker(full_check=True)
    want = run_graph(g, feeds)
    got = ort_run(model, feeds)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        if b.is_floating_point():
            assert rel_l2(a, b) < tol, rel_l2(a, b)
        else:
            assert torch.equal(a, b)
    return model


def r(*shape):
    return torch.randn(*shape)


# (op, inputs, attrs, constant positions): the IR ops the benchmark and breadth models use,
# plus the ones the ONNX importer produces for common ONNX ops
CASES = [
    (Op.ADD_TENSOR, [r(2, 3), r(3)], {}, ()),
    (Op.ADD_TENSOR, [r(2, 3), 2.5], {"alpha": 2}, ()),
    (Op.SUB_TENSOR, [r(2, 3), r(2, 3)], {}, ()),
    (Op.MUL_TENSOR, [r(4), torch.randint(0, 5, (4,))], {}, ()),
    (Op.DIV_TENSOR, [torch.randint(1, 9, (5,)), torch.randint(1, 9, (5,))], {}, ()),
    (Op.DIV_TENSOR_MODE, [r(6) * 5, r(6) + 3], {"rounding_mode": "floor"}, ()),
    (Op.POW_TENSOR_SCALAR, [r(3, 4), ], {"exponent": 3.0}, ()),
    (Op.RSQRT, [r(8).abs() + 0.1], {}, ()),
    (Op.GELU, [r(3, 5)], {"approximate": "tanh"}, ()),
    (Op.GELU, [r(3, 5)], {}, ()),
    (Op.SILU, [r(7)], {}, ()),
    (Op.TANH, [r(7)], {}, ()),
    (Op.SIGMOID, [r(7)], {}, ()),
    (Op.RELU, [r(7)], {}, ()),
    (Op.HARDTANH, [r(9) * 4], {"min_val": 0.0, "max_val": 6.0}, ()),
    (Op.NEG, [r(4)], {}, ()),
    (Op.ABS, [r(4)], {}, ()),
    (Op.SIN, [r(4)], {}, ()),
    (Op.COS, [r(4)], {}, ()),
    (Op.LOG, [r(4).abs() + 0.1], {}, ()),
    (Op.MINIMUM, [r(3, 4), r(4)], {}, ()),
    (Op.WHERE_SELF, [torch.rand(3, 4) > 0.5, r(3, 4), r(4)], {}, ()),
    (Op.EQ_TENSOR, [torch.randint(0, 3, (6,)), torch.randint(0, 3, (6,))], {}, ()),
    (Op.NE_SCALAR, [torch.randint(0, 3, (6,))], {"other": 1}, ()),
    (Op.GE_SCALAR, [r(6)], {"other": 0.0}, ()),
    (Op.LT_SCALAR, [torch.randint(0, 9, (6,))], {"other": 4}, ()),
    (Op.BITWISE_AND_TENSOR, [torch.rand(6) > 0.5, torch.rand(6) > 0.5], {}, ()),
    (Op.TO_COPY, [r(5) * 10], {"dtype": torch.int64}, ()),
    (Op.TO_COPY, [torch.randint(0, 2, (5,), dtype=torch.bool)], {"dtype": torch.float32}, ()),
    (Op.CLONE, [r(3, 2)], {}, ()),
    (Op.SUM_DIM_INTLIST, [r(3, 4, 5)], {"dim": [1, 2], "keepdim": True}, ()),
    (Op.MEAN_DIM, [r(3, 4, 5)], {"dim": [-1], "keepdim": False}, ()),
    (Op.AMAX, [r(3, 4)], {"dim": [0]}, ()),
    (Op.ARGMAX, [r(3, 4)], {"dim": 1, "keepdim": False}, ()),
    (Op.CUMSUM, [torch.randint(0, 5, (2, 6))], {"dim": 1}, ()),
    (Op.SOFTMAX, [r(2, 7)], {"dim": -1, "half_to_float": False}, ()),
    (Op.LOG_SOFTMAX, [r(2, 7)], {"dim": 0, "half_to_float": False}, ()),
    (Op.VAR_CORRECTION, [r(4, 6)], {"dim": [1], "correction": 1, "keepdim": True}, ()),
    (Op.NATIVE_LAYER_NORM, [r(2, 3, 8), r(8), r(8)], {"normalized_shape": [8], "eps": 1e-5}, (1, 2)),
    (Op.NATIVE_GROUP_NORM, [r(2, 6, 4, 4), r(6), r(6)],
     {"N": 2, "C": 6, "HxW": 16, "group": 3, "eps": 1e-5}, (1, 2)),
    (Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING, [r(2, 3, 4, 4), r(3), r(3), r(3), r(3).abs() + 0.5],
     {"momentum": 0.1, "eps": 1e-5}, (1, 2, 3, 4)),
    (Op.RMS_NORM, [r(2, 5, 8), r(8)], {"normalized_shape": [8], "eps": 1e-6}, (1,)),
    (Op.ADDMM, [r(6), r(4, 5), r(5, 6)], {}, (0, 2)),
    (Op.MM, [r(4, 5), r(5, 6)], {}, ()),
    (Op.BMM, [r(2, 4, 5), r(2, 5, 3)], {}, ()),
    (Op.CONVOLUTION, [r(1, 3, 9, 9), r(8, 3, 3, 3), r(8)],
     {"stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "transposed": False,
      "output_padding": [0, 0], "groups": 1}, (1, 2)),
    (Op.CONVOLUTION, [r(1, 4, 12), r(4, 2, 3), None],
     {"stride": [1], "padding": [2], "dilation": [2], "transposed": False,
      "output_padding": [0], "groups": 2}, (1,)),
    (Op.CONVOLUTION, [r(1, 4, 5, 5), r(4, 2, 2, 2), r(2)],
     {"stride": [2, 2], "padding": [0, 0], "dilation": [1, 1], "transposed": True,
      "output_padding": [0, 0], "groups": 1}, (1, 2)),
    (Op.MAX_POOL2D_WITH_INDICES, [r(1, 2, 8, 8)],
     {"kernel_size": [3, 3], "stride": [2, 2], "padding": [1, 1]}, ()),
    (Op.AVG_POOL2D, [r(1, 2, 8, 8)], {"kernel_size": [2, 2], "stride": [2, 2]}, ()),
    (Op.ADAPTIVE_AVG_POOL2D, [r(1, 3, 6, 6)], {"output_size": [1, 1]}, ()),
    (Op.UPSAMPLE_NEAREST2D_VEC, [r(1, 2, 3, 4)], {"output_size": None, "scale_factors": [2.0, 2.0]}, ()),
    (Op.UPSAMPLE_BILINEAR2D_VEC, [r(1, 2, 4, 4)],
     {"output_size": [7, 9], "align_corners": False, "scale_factors": None}, ()),
    (Op.CONSTANT_PAD_ND, [r(2, 3, 4)], {"pad": [1, 2, 0, 1], "value": 0.5}, ()),
    (Op.SCALED_DOT_PRODUCT_ATTENTION, [r(2, 4, 6, 8), r(2, 4, 6, 8), r(2, 4, 6, 8), None],
     {"dropout_p": 0.0, "is_causal": True}, ()),
    (Op.SCALED_DOT_PRODUCT_ATTENTION, [r(1, 4, 5, 8), r(1, 2, 7, 8), r(1, 2, 7, 8),
                                       torch.rand(5, 7) > 0.3], {"enable_gqa": True}, ()),
    (Op.VIEW, [r(2, 3, 4)], {"size": [6, -1]}, ()),
    (Op.PERMUTE, [r(2, 3, 4)], {"dims": [2, 0, 1]}, ()),
    (Op.EXPAND, [r(3, 1)], {"size": [2, 3, 5]}, ()),
    (Op.SLICE_TENSOR, [r(5, 6)], {"dim": 1, "start": 1, "end": 9223372036854775807, "step": 2}, ()),
    (Op.SELECT_INT, [r(5, 6)], {"dim": 0, "index": -1}, ()),
    (Op.UNSQUEEZE, [r(5, 6)], {"dim": -1}, ()),
    (Op.SQUEEZE_DIMS, [r(5, 1, 6)], {"dim": [1]}, ()),
    (Op.SPLIT_WITH_SIZES, [r(7, 2)], {"split_sizes": [3, 4], "dim": 0}, ()),
    (Op.ALIAS, [r(3)], {}, ()),
    (Op.CAT, [r(2, 3), r(2, 5)], {"dim": 1}, ()),
    (Op.GATHER, [r(3, 4), torch.randint(0, 4, (3, 2))], {"dim": 1}, ()),
    (Op.INDEX_SELECT, [r(6, 3), torch.randint(0, 6, (4,))], {"dim": 0}, ()),
    (Op.EMBEDDING, [r(10, 4), torch.randint(0, 10, (2, 3))], {}, (0,)),
    (Op.INDEX_TENSOR, [r(5, 6, 7), None, torch.randint(-6, 6, (2, 3))], {}, ()),
    (Op.INDEX_TENSOR, [r(5, 6, 7), torch.randint(0, 5, (4,)), torch.randint(0, 6, (4,))], {}, ()),
    (Op.INDEX_TENSOR, [r(5, 6, 7), None, torch.randint(0, 6, (4,)), torch.randint(0, 7, (4,))], {}, ()),
    (Op.FULL, [], {"size": [2, 3], "fill_value": 1.5, "dtype": torch.float32}, ()),
    (Op.ARANGE_START_STEP, [], {"start": 0, "end": 7, "step": 2, "dtype": torch.int64}, ()),
    (Op.FULL_LIKE, [r(3, 2)], {"fill_value": -2.0}, ()),
    (Op.SCALAR_TENSOR, [], {"s": 3.0, "dtype": torch.float32}, ()),
    (Op.TRIU, [r(4, 4)], {"diagonal": 1}, ()),
    (Op.FLIP, [r(3, 4)], {"dims": [0, 1]}, ()),
    (Op.REPEAT, [r(2, 3)], {"repeats": [2, 1, 2]}, ()),
    (Op.SCATTER_SRC, [r(3, 4), torch.tensor([[0, 1], [2, 3], [1, 0]]), r(3, 2)], {"dim": 1}, ()),
    (Op.TOPK, [r(3, 8)], {"k": 3, "dim": -1}, ()),
]


@pytest.mark.parametrize("op,inputs,attrs,consts", CASES,
                         ids=[f"{c[0].name.lower()}-{i}" for i, c in enumerate(CASES)])
def test_op_exports_and_runs_in_onnxruntime(op, inputs, attrs, consts):
    g = one_op_graph(op, inputs, attrs, consts)
    if op is Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING:
        g.outputs = g.outputs[:1]  # inference batch norm saves no statistics
    feeds = [t for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and i not in consts]
    check_graph(g, feeds)


def test_symbolic_dims_become_dim_params_and_shape_computations():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x.view(x.shape[0], -1)).sum(-1, keepdim=True) * x.shape[0]

    x = torch.randn(3, 4, 5)
    g = ds.capture(M(), (x,), dynamic_dims={0: {0: "batch"}})
    model = to_onnx(g)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 4
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 6):
        x = torch.randn(batch, 4, 5)
        (got,) = ort_run(model, [x])
        torch.testing.assert_close(got, M()(x))


def test_quantized_graph_exports_as_qdq():
    g = Graph()
    x = g.add_input("x", TensorSpec((4, 6), torch.float32))
    g.input_names.append("x")

    def add(op, ins, attrs):
        return g.add_node(op, ins, attrs, infer_specs(Node(op, ins, attrs, []), {}), name=op.name.lower()).outputs

    q = add(Op.QUANTIZE_PER_TENSOR, [x], {"scale": 0.05, "zero_point": 3, "quant_min": -128,
                                          "quant_max": 127, "dtype": torch.int8})[0]
    dq = add(Op.DEQUANTIZE_PER_TENSOR, [q], {"scale": 0.05, "zero_point": 3, "quant_min": -128,
                                             "quant_max": 127, "dtype": torch.int8})[0]
    w = g.add_constant("w", torch.randint(-100, 100, (5, 6), dtype=torch.int8))
    s = g.add_constant("s", torch.rand(5) * 0.1 + 0.01)
    z = g.add_constant("z", torch.zeros(5, dtype=torch.int64))
    wdq = add(Op.DEQUANTIZE_PER_CHANNEL, [w, s, z], {"axis": 0, "quant_min": -128, "quant_max": 127,
                                                     "dtype": torch.int8})[0]
    y = add(Op.MM, [dq, add(Op.PERMUTE, [wdq], {"dims": [1, 0]})[0]], {})[0]
    g.outputs = [y, q]
    model = check_graph(g, [torch.randn(4, 6) * 3])
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("QuantizeLinear") == 1 and kinds.count("DequantizeLinear") == 2
    axis = [a.i for n in model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute
            if a.name == "axis"]
    assert axis == [0]


def test_engine_export_of_optimized_graph_with_fused_kernels(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return torch.sigmoid(y * 2 + 1) * torch.tanh(y) - y / 3

    m = M().eval()
    x = torch.randn(4, 8)
    engine = ds.compile(m, (x,), backend="cpu")
    assert any("fused" in n.kind for n in engine.graph.nodes), "the optimizer should fuse the chain"
    path = str(tmp_path / "m.onnx")
    engine.export_onnx(path)
    onnx.checker.check_model(path, full_check=True)
    x2 = torch.randn(4, 8)
    (got,) = ort_run(onnx.load(path), [x2])
    assert rel_l2(got, m(x2)) < 1e-5


@pytest.mark.parametrize("opset", [13, 17, 18, 20, 21, onnx.defs.onnx_opset_version()])
def test_opsets(opset):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(8)

        def forward(self, x):
            return torch.nn.functional.gelu(self.ln(x)).softmax(-1).cumsum(-1).amax(1)

    m = M().eval()
    x = torch.randn(2, 3, 8)
    g = ds.capture(m, (x,))
    model = to_onnx(g, opset)  # full checker pass at every opset
    assert model.opset_import[0].version == opset
    if opset <= 21:  # ONNX Runtime 1.32 runs these opsets
        (got,) = ort_run(model, [x])
        assert rel_l2(got, m(x).detach()) < 1e-5


def test_unsupported_ops_are_listed_together():
    g = one_op_graph(Op.ERFINV, [torch.rand(3) - 0.5])
    n2 = g.add_node(Op.ERFINV, [g.outputs[0]], {}, [g.outputs[0].spec], name="second")
    g.outputs = list(n2.outputs)
    with pytest.raises(UnsupportedOpError) as e:
        to_onnx(g)
    assert "%out = erfinv" in str(e.value) and "%second = erfinv" in str(e.value)


def test_bad_opset_is_refused():
    g = one_op_graph(Op.RELU, [r(3)])
    with pytest.raises(DeepseekError, match="opset 9"):
        to_onnx(g, 9)


def test_export_writes_a_checked_file(tmp_path):
    g = one_op_graph(Op.MM, [r(3, 4), r(4, 2)], {}, (1,))
    path = export_onnx(g, str(tmp_path / "sub" / "mm.onnx"), opset=18)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 18 and len(model.graph.initializer) == 1


def test_cli_export(tmp_path, capsys):
    from deepseek.cli import main

    path = str(tmp_path / "mnist.onnx")
    assert main(["export", "mnist_cnn", "--onnx", path, "--batch", "2", "--dynamic-batch"]) == 0
    assert "checked by onnx.checker" in capsys.readouterr().out
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    from benchmarks.models import mnist_cnn

    m, (x,) = mnist_cnn(batch=3)
    x = torch.randn_like(x)
    (got,) = ort_run(model, [x])
    with torch.no_grad():
        assert rel_l2(got, m(x)) < 1e-5
    assert main(["export", "mnist_cnn", "--batch", "2"]) == 2  # no target format


def test_scalar_operands_follow_pytorch_promotion():
    # int tensor * python float: PyTorch computes in float32, ONNX needs the cast explicit
    g = one_op_graph(Op.MUL_TENSOR, [torch.randint(0, 9, (5,)), 0.5])
    check_graph(g, [torch.randint(0, 9, (5,))])
    g = one_op_graph(Op.ADD_TENSOR, [torch.randint(0, 9, (5,), dtype=torch.int32),
                                     torch.randint(0, 9, (5,))])
    check_graph(g, [torch.randint(0, 9, (5,), dtype=torch.int32), torch.randint(0, 9, (5,))])


def test_sym_expressions_in_attributes():
    g = Graph()
    x = g.add_input("x", TensorSpec((Sym("n"), 6), torch.float32))
    g.input_names.append("x")
    attrs = {"size": [Sym("2*n"), 3]}
    specs = [TensorSpec((Sym("2*n"), 3), torch.float32)]
    v = g.add_node(Op.VIEW, [x], attrs, specs, name="v").outputs[0]
    attrs = {"dim": 0, "start": 1, "end": Sym("Max(n, 2)"), "step": 1}
    s = g.add_node(Op.SLICE_TENSOR, [v], attrs, [TensorSpec((Sym("Max(n, 2) - 1"), 3), torch.float32)],
                   name="s").outputs[0]
    g.outputs = [s]
    model = to_onnx(g)
    for n in (1, 3):
        xx = torch.randn(n, 6)
        (got,) = ort_run(model, [xx])
        want = xx.view(2 * n, 3)[1:max(n, 2)]
        torch.testing.assert_close(got, want)
    assert math.isfinite(float(got.sum()))


def test_importer_fallback_nodes_export_back():
    from onnx import TensorProto, helper

    from deepseek.frontend.onnx_import import import_onnx

    m = helper.make_model(helper.make_graph(
        [helper.make_node("Einsum", ["a", "b"], ["c"], equation="bij,bjk->bik")], "e",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3, 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4, 5])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 18)])
    g = import_onnx(m)
    assert g.fallback_nodes()
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    (got,) = ort_run(to_onnx(g), [a, b])
    torch.testing.assert_close(got, a @ b, rtol=1e-5, atol=1e-5)


def test_linear_weights_are_stored_transposed_for_gemm(tmp_path):
    """A captured Linear is addmm(b, x, permute(W)): W is written already transposed (no
    Transpose node), which ONNX Runtime's quantize_dynamic needs to see the MatMul's
    weight; a constant read elsewhere too keeps its Transpose."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 5)).eval()
    x = torch.randn(3, 12)
    graph = ds.capture(model, (x,))
    onnx_model = to_onnx(graph)
    kinds = [n.op_type for n in onnx_model.graph.node]
    assert "Transpose" not in kinds and kinds.count("Gemm") == 2
    fresh = torch.randn(3, 12)
    with torch.no_grad():
        assert rel_l2(ort_run(onnx_model, [fresh])[0], model(fresh)) < 1e-5
    # the weight transposed once: the stored tensors are W^T, nothing else
    stored = sorted(tuple(t.dims) for t in onnx_model.graph.initializer if len(t.dims) == 2)
    assert stored == [(8, 5), (12, 8)]
    quant = pytest.importorskip("onnxruntime.quantization")
    path, int8 = str(tmp_path / "m.onnx"), str(tmp_path / "m_int8.onnx")
    export_onnx(graph, path)
    quant.quantize_dynamic(path, int8, weight_type=quant.QuantType.QInt8)
    assert sum(n.op_type == "MatMulInteger" for n in onnx.load(int8).graph.node) == 2

    g = Graph()  # a constant that a transpose and another node both read
    a = g.add_input("a", TensorSpec((4, 4), torch.float32))
    g.input_names.append("a")
    w = g.add_constant("w", torch.randn(4, 4))
    t = g.add_node(Op.PERMUTE, [w], {"dims": [1, 0]},
                   infer_specs(Node(Op.PERMUTE, [w], {"dims": [1, 0]}, []), {})).outputs[0]
    y = g.add_node(Op.MM, [a, t], {}, infer_specs(Node(Op.MM, [a, t], {}, []), {})).outputs[0]
    z = g.add_node(Op.ADD_TENSOR, [y, w], {}, infer_specs(Node(Op.ADD_TENSOR, [y, w], {}, []),
                                                         {})).outputs[0]
    g.outputs = [z]
    assert "Transpose" in [n.op_type for n in check_graph(g, [r(4, 4)]).graph.node]
