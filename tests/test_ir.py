"""The IR: printer, verifier, reference interpreter and CPU engine against eager PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_leaves, tree_structure

import deepseek as ds
from deepseek.examples import mnist_cnn
from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.interpreter import run_graph
from deepseek.ir.ops import Op
from deepseek.ir.types import Sym, TensorSpec
from deepseek.ir.verify import verify
from tests.conftest import rel_l2

F32 = torch.float32


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def assert_close_tree(got, ref, tol=1e-4):
    """Float leaves within relative L2 ``tol``; integer/bool leaves exactly equal."""
    g, r = tree_leaves(got), tree_leaves(ref)
    assert len(g) == len(r), f"{len(g)} outputs, expected {len(r)}"
    for i, (a, b) in enumerate(zip(g, r)):
        assert isinstance(a, torch.Tensor), f"output {i} is a {type(a).__name__}"
        assert a.shape == b.shape, f"output {i}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"output {i}: dtype {a.dtype}, expected {b.dtype}"
        if b.dtype.is_floating_point:
            err = rel_l2(a, b)
            assert err < tol, f"output {i}: relative L2 error {err:.3e}"
        else:
            assert torch.equal(a, b), f"output {i} ({b.dtype}) differs"


class Fn(nn.Module):
    """A module whose forward is ``fn(self, *inputs)``; submodules given as keywords."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for k, v in modules.items():
            setattr(self, k, v)

    def forward(self, *xs):
        return self.fn(self, *xs)


def _r(*shape):
    return lambda: torch.randn(*shape)


def _bn(c):
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)
    return bn


# name -> (module factory, [input factories]); each input factory makes fresh random values
CASES = {
    "conv_depthwise": (lambda: Fn(lambda s, x: s.c(x), c=nn.Conv2d(8, 8, 3, padding=1, groups=8)),
                       [_r(2, 8, 10, 10)]),
    "conv_grouped_strided": (lambda: Fn(lambda s, x: s.c(x), c=nn.Conv2d(8, 12, 3, stride=2, groups=4)),
                             [_r(2, 8, 11, 11)]),
    "conv_transposed": (lambda: Fn(lambda s, x: s.c(x), c=nn.ConvTranspose2d(
        6, 4, 3, stride=2, padding=1, output_padding=1)), [_r(2, 6, 7, 7)]),
    "conv1d_dilated": (lambda: Fn(lambda s, x: torch.relu(s.c(x)), c=nn.Conv1d(4, 6, 5, padding=4, dilation=2)),
                       [_r(2, 4, 20)]),
    "conv_bn_relu": (lambda: Fn(lambda s, x: torch.relu(s.bn(s.c(x))), c=nn.Conv2d(3, 5, 3), bn=_bn(5)),
                     [_r(2, 3, 8, 8)]),
    "bmm_matmul_linear": (lambda: Fn(lambda s, a, b: (torch.bmm(a, b), torch.matmul(a, b[0]), s.l(a),
                                                       a[0] @ b[1]), l=nn.Linear(5, 7)),
                          [_r(3, 4, 5), _r(3, 5, 6)]),
    "softmax_log_softmax": (lambda: Fn(lambda s, x: (F.softmax(x, -1), F.log_softmax(x, 1))),
                            [lambda: torch.randn(3, 7, 5) * 3]),
    "layer_group_batch_norm": (lambda: Fn(lambda s, x: s.gn(s.bn(x)) + s.ln(x), ln=nn.LayerNorm([6, 6]),
                                          gn=nn.GroupNorm(2, 4), bn=_bn(4)), [_r(2, 4, 6, 6)]),
    "pooling": (lambda: Fn(lambda s, x: (F.max_pool2d(x, 3, 2, 1), F.avg_pool2d(x, 2),
                                         F.adaptive_avg_pool2d(x, (3, 2)), F.adaptive_max_pool2d(x, 2),
                                         F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))),
                [_r(2, 3, 9, 9)]),
    "reductions": (lambda: Fn(lambda s, x: (x.sum(1), x.mean((0, 2)), x.amax(-1), x.argmax(1),
                                            x.var(2), x.std(0, keepdim=True), x.amin(0), x.sum())),
                   [_r(3, 4, 5)]),
    "reshape_permute_expand_slice_cat_split": (lambda: Fn(lambda s, x: (
        x.reshape(4, -1).permute(1, 0) * 2, x[:, None].expand(3, 2, 4, 5) + 1, x[1:, ::2, 1:4] * 3,
        torch.cat([x, x * 2], 1), *[t + i for i, t in enumerate(torch.split(x, [1, 3], 1))],
        x.transpose(0, 2).flatten(1).exp())), [_r(3, 4, 5)]),
    "gather_index_embedding": (lambda: Fn(lambda s, x, i: (torch.gather(x, 1, i), x[i[:, 0]], s.e(i),
                                                           x.index_select(0, i[0])),
                                          e=nn.Embedding(10, 3)),
                               [_r(4, 6), lambda: torch.randint(0, 4, (4, 2))]),
    "where_masked_fill": (lambda: Fn(lambda s, x, y: (torch.where(x > 0, x, y), x.masked_fill(y < 0, -1.5),
                                                      torch.where(y > x, 1.0, y))),
                          [_r(3, 5), _r(3, 5)]),
    "comparisons": (lambda: Fn(lambda s, x, y: (x < y, x >= y, x == x.round(), (x != y) & (x > 0),
                                                x.le(0.1), torch.maximum(x, y), (x > y).any(1),
                                                (x > -3).all())),
                    [_r(3, 5), _r(3, 5)]),
    "casts": (lambda: Fn(lambda s, x: ((x * 10).to(torch.int64), (x > 0).float() + x, x.double() * 2,
                                       (x * 10).int() // 3, x.half().float())),
              [_r(3, 5)]),
    "arange_full": (lambda: Fn(lambda s, x: (x + torch.arange(x.shape[-1], dtype=x.dtype),
                                             torch.full((2, 3), 3.5) * x[0, 0],
                                             torch.arange(1, 10, 3) * 2, x * torch.ones_like(x) + 1)),
                    [_r(3, 5)]),
    "cumsum": (lambda: Fn(lambda s, x, i: (torch.cumsum(x, 1), torch.cumsum(i, 0))),
               [_r(3, 5), lambda: torch.randint(-5, 5, (4, 3))]),
    "sdpa": (lambda: Fn(lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v)),
             [_r(2, 3, 5, 8), _r(2, 3, 7, 8), _r(2, 3, 7, 8)]),
    "sdpa_causal": (lambda: Fn(lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                    [_r(2, 3, 6, 8), _r(2, 3, 6, 8), _r(2, 3, 6, 8)]),
    "sdpa_bool_mask": (lambda: Fn(lambda s, q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)),
                       [_r(2, 3, 6, 8), _r(2, 3, 6, 8), _r(2, 3, 6, 8),
                        lambda: (torch.rand(6, 6) > 0.3) | torch.eye(6, dtype=torch.bool)]),
    "lstm": (lambda: Fn(lambda s, x: s.m(x), m=nn.LSTM(5, 7, num_layers=2, batch_first=True)),
             [_r(2, 6, 5)]),
    "gru_bidirectional": (lambda: Fn(lambda s, x: s.m(x), m=nn.GRU(5, 7, bidirectional=True)),
                          [_r(6, 2, 5)]),
}

def _case(name):
    make_model, make_inputs = CASES[name]
    torch.manual_seed(1)
    model = make_model().eval()
    example = tuple(f() for f in make_inputs)
    fresh = tuple(f() for f in make_inputs)  # other random values than the example
    return model, example, fresh


def _eager(model, inputs):
    with torch.no_grad():
        return model(*inputs)


# --------------------------------------------------------------------------- #
# printer
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def mnist_dynamic_graph():
    model, (x,) = mnist_cnn(4)
    return ds.capture(model, (x,), dynamic_dims={0: {0: "batch"}})


def test_printer_one_line_per_node(mnist_dynamic_graph):
    g = mnist_dynamic_graph
    text = str(g)
    lines = text.splitlines()
    node_lines = [ln for ln in lines if ln.lstrip().startswith("%") and " = " in ln]
    assert len(node_lines) == len(g.nodes)
    # header, constants comment, one line per node, return, closing brace
    assert len(lines) == len(g.nodes) + 4
    assert lines[0].startswith("graph(") and lines[-1] == "}"
    assert lines[-2].strip().startswith("return (%")
    for node, line in zip(g.nodes, node_lines):
        assert f"= {node.kind}(" in line, line
        for o in node.outputs:
            assert f"%{o.name}" in line and str(o.spec) in line, line


def test_printer_shows_ops_and_symbolic_specs(mnist_dynamic_graph):
    text = str(mnist_dynamic_graph)
    assert "%x: f32[batch,1,28,28]" in text.splitlines()[0]
    assert "f32[batch,32,28,28]" in text
    assert "f32[batch,64,7,7]" in text
    assert "f32[batch,10]" in text
    for op in ("convolution", "_native_batch_norm_legit_no_training", "relu",
               "max_pool2d_with_indices", "view", "addmm"):
        assert f"= {op}(" in text, op
    assert "size=[batch, 3136]" in text  # symbolic attributes print as expressions
    assert "18 constants" in text


def test_printer_static_specs_and_fallback_marker():
    g = Graph()
    x = g.add_input("x", TensorSpec((2, 3), torch.int64))
    n = g.add_node(None, [x], {}, [TensorSpec((2, 3), torch.float32)], name="y",
                   fallback="aten.special_i0.default")
    g.outputs = [n.outputs[0]]
    text = str(g)
    assert "%x: i64[2,3]" in text
    assert "aten.special_i0.default(%x)" in text and "[fallback]" in text
    assert "# f32[2,3]" in text


# --------------------------------------------------------------------------- #
# verifier
# --------------------------------------------------------------------------- #
def _small_graph() -> Graph:
    """a = relu(x @ w) + (x @ w), built by hand."""
    g = Graph()
    x = g.add_input("x", TensorSpec((3, 4), F32))
    w = g.add_constant("w", torch.randn(4, 5))
    mm = g.add_node(Op.MM, [x, w], {}, [TensorSpec((3, 5), F32)], name="mm")
    r = g.add_node(Op.RELU, [mm.outputs[0]], {}, [TensorSpec((3, 5), F32)], name="r")
    a = g.add_node(Op.ADD_TENSOR, [r.outputs[0], mm.outputs[0]], {}, [TensorSpec((3, 5), F32)], name="a")
    g.outputs = [a.outputs[0]]
    return g


def test_hand_built_graph_verifies_and_runs():
    g = _small_graph()
    verify(g)
    x = torch.randn(3, 4)
    y = x @ g.constants["w"]
    assert rel_l2(run_graph(g, [x])[0], torch.relu(y) + y) < 1e-6
    e = ds.compile(g, backend="cpu")
    assert rel_l2(e(x), torch.relu(y) + y) < 1e-6


def _dangling(g):
    g.nodes[1].inputs[0] = Value("ghost", TensorSpec((3, 5), F32))


def _reorder(g):
    g.nodes[0], g.nodes[1] = g.nodes[1], g.nodes[0]


def _self_cycle(g):
    g.nodes[1].inputs[0] = g.nodes[1].outputs[0]


def _drop_input(g):
    del g.nodes[2].inputs[1]


def _extra_input(g):
    g.nodes[1].inputs.append(g.inputs[0])


def _shape_mismatch(g):
    g.nodes[1].outputs[0].spec = TensorSpec((3, 6), F32)


def _dtype_mismatch(g):
    g.nodes[1].outputs[0].spec = TensorSpec((3, 5), torch.float64)


def _defined_twice(g):
    g.nodes[1].outputs[0] = g.nodes[0].outputs[0]


def _redefines_input(g):
    g.nodes[1].outputs[0] = g.inputs[0]


def _node_twice(g):
    g.nodes.append(g.nodes[1])


def _dangling_output(g):
    g.outputs = [Value("ghost", TensorSpec((3, 5), F32))]


def _wrong_output_count(g):
    g.nodes[0].outputs.append(Value("extra", TensorSpec((3, 5), F32)))


def _constant_without_tensor(g):
    del g.constants["w"]


VERIFY_ERRORS = {
    "dangling_input": (_dangling, ["%ghost", "dangling", "node 1"]),
    "use_before_def": (_reorder, ["%mm", "defined later", "node 0"]),
    "self_cycle": (_self_cycle, ["%r", "defined later"]),
    "arity_missing_input": (_drop_input, ["add.Tensor", "takes 2", "got 1"]),
    "arity_extra_input": (_extra_input, ["relu", "takes 1", "got 2"]),
    "type_mismatch_shape": (_shape_mismatch, ["%r", "f32[3,6]", "f32[3,5]"]),
    "type_mismatch_dtype": (_dtype_mismatch, ["%r", "f64[3,5]", "f32[3,5]"]),
    "defined_twice": (_defined_twice, ["%mm", "defined twice"]),
    "redefines_graph_input": (_redefines_input, ["%x", "defined twice"]),
    "node_appended_twice": (_node_twice, ["%r", "defined twice"]),
    "dangling_graph_output": (_dangling_output, ["%ghost", "graph output", "dangling"]),
    "wrong_output_count": (_wrong_output_count, ["mm", "1 outputs", "2"]),
    "constant_without_tensor": (_constant_without_tensor, ["%w", "constant"]),
}


@pytest.mark.parametrize("name", list(VERIFY_ERRORS))
def test_verifier_rejects(name):
    mutate, words = VERIFY_ERRORS[name]
    g = _small_graph()
    verify(g)  # valid before the mutation
    mutate(g)
    with pytest.raises(ds.IRError) as info:
        verify(g)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_verifier_missing_attribute_and_captured_graph_mutations(mnist_dynamic_graph):
    import copy

    g = copy.copy(mnist_dynamic_graph)
    g.nodes = [copy.copy(n) for n in mnist_dynamic_graph.nodes]
    for n in g.nodes:
        n.inputs, n.attrs = list(n.inputs), dict(n.attrs)
    verify(g)
    view = next(n for n in g.nodes if n.op is Op.VIEW)
    del view.attrs["size"]
    with pytest.raises(ds.IRError, match=r"missing attribute 'size'"):
        verify(g)
    view.attrs["size"] = [Sym("batch"), 3136]
    verify(g)
    conv = next(n for n in g.nodes if n.op is Op.CONVOLUTION)
    conv.inputs = conv.inputs[:2]  # drop the bias input
    with pytest.raises(ds.IRError, match=r"convolution.*takes 3 tensor inputs, got 2"):
        verify(g)


def test_verifier_type_mismatch_on_captured_static_graph():
    model, (x,) = mnist_cnn(2)
    g = ds.capture(model, (x,))
    verify(g)
    relu = next(n for n in g.nodes if n.op is Op.RELU)
    relu.outputs[0].spec = TensorSpec((2, 32, 27, 28), F32)
    with pytest.raises(ds.IRError, match=r"recorded as f32\[2,32,27,28\] but the op produces "
                                         r"f32\[2,32,28,28\]"):
        verify(g)


def test_verifier_rejects_inputs_the_op_refuses():
    g = Graph()
    a = g.add_input("a", TensorSpec((3, 4), F32))
    b = g.add_input("b", TensorSpec((5, 6), F32))
    n = g.add_node(Op.MM, [a, b], {}, [TensorSpec((3, 6), F32)], name="mm")
    g.outputs = [n.outputs[0]]
    with pytest.raises(ds.IRError, match=r"%mm.*rejects its inputs"):
        verify(g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5), (2, 5, 7), (2, 5, 4, 3), (1, 5, 2, 3, 2)])
def test_batch_norm_spec_rule_is_its_meta_kernels(dtype, shape):
    """Batch norm's outputs come from a rule, not its meta kernel (a Python decomposition
    whose first call imports torch._dynamo): the rule gives what the meta kernel gives."""
    from deepseek.ir.interpreter import _SPEC_RULES, infer_specs

    g = Graph()
    x = g.add_input("x", TensorSpec(shape, dtype))
    stat = [g.add_input(f"s{i}", TensorSpec((shape[1],), torch.float32)) for i in range(4)]
    cases = {Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING: ([x, *stat], {"momentum": 0.1, "eps": 1e-5}),
             Op.NATIVE_BATCH_NORM_LEGIT: ([x, *stat], {"training": True, "momentum": 0.1,
                                                       "eps": 1e-5}),
             Op.NATIVE_BATCH_NORM_LEGIT_NO_STATS: ([x, *stat[:2]], {"training": True,
                                                                    "momentum": 0.1, "eps": 1e-5})}
    for training in (False, True):
        cases[Op.NATIVE_BATCH_NORM] = ([x, *stat], {"training": training, "momentum": 0.1,
                                                   "eps": 1e-5})
        assert set(cases) == set(_SPEC_RULES)
        for op, (ins, attrs) in cases.items():
            node = Node(op, ins, attrs, [])
            metas = [torch.empty(v.spec.shape, dtype=v.spec.dtype, device="meta") for v in ins]
            want = [TensorSpec.of(t) for t in node.opdef.reference(metas, attrs, device="meta")]
            assert infer_specs(node, {}) == want, op


def test_batch_norm_spec_rule_rejects_what_its_meta_kernel_rejects():
    from deepseek.ir.interpreter import infer_specs

    g = Graph()
    x = g.add_input("x", TensorSpec((2, 5, 4, 4), torch.float32))
    wrong = [g.add_input(f"s{i}", TensorSpec((4,), torch.float32)) for i in range(4)]
    node = Node(Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING, [x, *wrong],
                {"momentum": 0.1, "eps": 1e-5}, [])
    with pytest.raises(ds.IRError, match="5 channels got a per-channel input of shape"):
        infer_specs(node, {})


def test_verifier_rejects_duplicate_value_names():
    g = Graph()
    x = g.add_input("x", TensorSpec((3, 4), F32))
    a = g.add_node(Op.RELU, [x], {}, [TensorSpec((3, 4), F32)], name="a")
    b = g.add_node(Op.NEG, [x], {}, [TensorSpec((3, 4), F32)], name="b")
    c = g.add_node(Op.ADD_TENSOR, [a.outputs[0], b.outputs[0]], {}, [TensorSpec((3, 4), F32)], name="c")
    g.outputs = [c.outputs[0]]
    b.outputs[0].name = "a"  # two values now print as %a
    with pytest.raises(ds.IRError, match="%a"):
        verify(g)


# --------------------------------------------------------------------------- #
# reference interpreter and CPU engine against eager
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", list(CASES))
def test_interpreter_matches_eager(name):
    model, example, fresh = _case(name)
    g = ds.capture(model, example)
    verify(g)
    assert not g.fallback_nodes(), [n.kind for n in g.fallback_nodes()]
    ref = _eager(model, fresh)
    got = run_graph(g, list(fresh))
    assert_close_tree(got, ref)


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_engine_matches_eager(name):
    model, example, fresh = _case(name)
    engine = ds.compile(model, example, backend="cpu")
    ref = _eager(model, fresh)
    got = engine(*fresh)
    assert tree_structure(got) == tree_structure(ref)
    assert_close_tree(got, ref)
    # a second fresh input through the cached plan
    fresh2 = tuple(f() for f in CASES[name][1])
    assert_close_tree(engine(*fresh2), _eager(model, fresh2))


def test_engine_with_fallback_partitions_matches_eager():
    """Ops without a Deepseek kernel split the graph into cpu/reference partitions."""
    class M(nn.Module):
        def forward(self, a, b, c):
            h = torch.erfc(c) + b
            return torch.lgamma(h.abs() + 1) * a, c.relu() - a, b

    ex = (torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4))
    engine = ds.compile(M(), ex, backend="cpu")
    report = engine.report()
    assert {f["op"] for f in report.fallback_nodes} == {"aten.erfc.default", "aten.lgamma.default"}
    assert {p["backend"] for p in report.partitions} == {"cpu", "reference"}
    fresh = (torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4))
    assert_close_tree(engine(*fresh), M()(*fresh))
    assert_close_tree(run_graph(engine.graph, list(fresh)), M()(*fresh))


def test_interpreter_frees_nothing_it_still_needs():
    """A value read by a later node and also returned survives the interpreter's freeing."""
    class M(nn.Module):
        def forward(self, x):
            y = x.exp()
            z = y * 2
            return y, z.sum(), y + z

    x = torch.randn(4, 3)
    g = ds.capture(M(), (x,))
    x2 = torch.randn(4, 3)
    assert_close_tree(run_graph(g, [x2]), M()(x2))


# --------------------------------------------------------------------------- #
# hypothesis: element-wise + reduction on random shapes
# --------------------------------------------------------------------------- #
class EwReduce(nn.Module):
    def __init__(self, dim: int, keepdim: bool):
        super().__init__()
        self.dim, self.keepdim = dim, keepdim

    def forward(self, x, y):
        z = torch.tanh(x) * y - torch.sigmoid(y) * 0.5 + x.abs().sqrt()
        return (z.sum(self.dim, keepdim=self.keepdim), z.amax(self.dim), z.mean(),
                torch.softmax(z, self.dim), (z > 0).sum(self.dim))


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data(),
       keepdim=st.booleans(), opt_level=st.sampled_from([0, 2]))
def test_hypothesis_elementwise_reduction(shape, data, keepdim, opt_level):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    model = EwReduce(dim, keepdim)
    ex = (torch.randn(shape), torch.randn(shape))
    engine = ds.compile(model, ex, backend="cpu", opt_level=opt_level)
    x, y = torch.randn(shape), torch.randn(shape)
    assert_close_tree(engine(x, y), model(x, y))


# --------------------------------------------------------------------------- #
# symbolic dims
# --------------------------------------------------------------------------- #
def test_dynamic_batch_mnist_engine():
    model, (x,) = mnist_cnn(4)
    engine = ds.compile(model, (x,), backend="cpu", dynamic_dims={0: {0: "batch"}})
    assert str(engine.graph.inputs[0].spec) == "f32[batch,1,28,28]"
    for b in (2, 5, 1):
        xb = torch.randn(b, 1, 28, 28)
        got = engine(xb)
        assert got.shape == (b, 10)
        assert rel_l2(got, _eager(model, (xb,))) < 1e-4, b
    with pytest.raises(ds.InputError):
        engine(torch.randn(3, 1, 28, 27))  # only the batch dim is symbolic


def test_dynamic_batch_and_seq_with_shape_arithmetic():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(6, 6)

        def forward(self, x, m):
            b, t, c = x.shape
            h = self.l(x) + torch.arange(t).float()[None, :, None]
            h = h.reshape(b * t, c).softmax(-1).reshape(b, t, c)
            h = h.masked_fill(~m[..., None], 0.0)
            return h.mean(1), torch.cat([h, x], 0).sum((1, 2)), h.flatten(1)[:, :5]

    model = M().eval()
    dyn = {0: {0: "batch", 1: "seq"}, 1: {0: "batch", 1: "seq"}}
    engine = ds.compile(model, (torch.randn(3, 5, 6), torch.rand(3, 5) > 0.3), backend="cpu",
                        dynamic_dims=dyn)
    for b, t in [(2, 5), (4, 7), (1, 1), (5, 2)]:
        x, m = torch.randn(b, t, 6), torch.rand(b, t) > 0.3
        assert_close_tree(engine(x, m), _eager(model, (x, m)))
    with pytest.raises(ds.InputError, match="batch"):
        engine(torch.randn(2, 5, 6), torch.rand(3, 5) > 0.3)  # batch bound to 2 by x
