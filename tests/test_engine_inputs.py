"""Engine calls: InputError names the offending input; outputs keep the model's structure."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_structure

import deepseek as ds
from deepseek.examples import mnist_cnn
from tests.conftest import rel_l2


@pytest.fixture(scope="module")
def mnist():
    model, (x,) = mnist_cnn(2)
    return model, ds.compile(model, (x,), backend="cpu")


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, a, b):
        return self.l(a).sum(-1) * b


@pytest.fixture(scope="module")
def two():
    torch.manual_seed(0)
    m = Two().eval()
    return m, ds.compile(m, (torch.randn(3, 4), torch.randn(3)), backend="cpu")


# --------------------------------------------------------------------------- #
# the mnist model: one input named x
# --------------------------------------------------------------------------- #
def test_mnist_valid_call_matches_eager(mnist):
    model, engine = mnist
    x = torch.randn(2, 1, 28, 28)
    assert rel_l2(engine(x), model(x)) < 1e-4


BAD_MNIST_CALLS = {
    "no_inputs": ((), r"\(x\).*missing a required argument: 'x'"),
    "two_inputs": ((torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)),
                   r"\(x\).*too many positional arguments"),
    "wrong_shape": ((torch.randn(2, 1, 28, 27),), r"input 0 \('x'\).*\(2, 1, 28, 27\)"),
    "wrong_batch": ((torch.randn(3, 1, 28, 28),), r"input 0 \('x'\).*\(3, 1, 28, 28\).*dynamic_dims"),
    "wrong_rank": ((torch.randn(2, 28, 28),), r"input 0 \('x'\).*rank 4"),
    "wrong_rank_5d": ((torch.randn(2, 1, 1, 28, 28),), r"input 0 \('x'\).*rank 4"),
    "wrong_dtype": ((torch.randn(2, 1, 28, 28).double(),), r"input 0 \('x'\).*float64.*float32"),
    "int_dtype": ((torch.randint(0, 9, (2, 1, 28, 28)),), r"input 0 \('x'\).*int64"),
    "python_number": ((3.0,), r"input 0 \('x'\).*torch.Tensor.*float"),
    "python_list": (([1.0, 2.0],), r"input 0 \('x'\).*torch.Tensor"),
    "numpy_array": ((np.zeros((2, 1, 28, 28), np.float32),), r"input 0 \('x'\).*ndarray"),
    "none": ((None,), r"input 0 \('x'\).*torch.Tensor.*NoneType"),
}


@pytest.mark.parametrize("name", list(BAD_MNIST_CALLS))
def test_mnist_bad_inputs(mnist, name):
    _, engine = mnist
    args, pattern = BAD_MNIST_CALLS[name]
    with pytest.raises(ds.InputError, match=pattern):
        engine(*args)


def test_bad_call_then_good_call(mnist):
    """A rejected call leaves nothing behind in the shape cache."""
    model, engine = mnist
    for _ in range(2):
        with pytest.raises(ds.InputError):
            engine(torch.randn(2, 1, 28, 28).double())
    x = torch.randn(2, 1, 28, 28)
    assert rel_l2(engine(x), model(x)) < 1e-4
    with pytest.raises(ds.InputError):  # after a good call, still checked
        engine(torch.randn(2, 1, 28, 28).double())


def test_dynamic_engine_checks_static_dims():
    model, (x,) = mnist_cnn(3)
    engine = ds.compile(model, (x,), backend="cpu", dynamic_dims={0: {0: "batch"}})
    y = torch.randn(5, 1, 28, 28)
    assert rel_l2(engine(y), model(y)) < 1e-4
    with pytest.raises(ds.InputError, match=r"input 0 \('x'\)"):
        engine(torch.randn(5, 3, 28, 28))
    with pytest.raises(ds.InputError, match=r"input 0 \('x'\)"):
        engine(torch.randn(5, 1, 28, 28, dtype=torch.float16))


# --------------------------------------------------------------------------- #
# two inputs: the message names the right one
# --------------------------------------------------------------------------- #
BAD_TWO_CALLS = {
    "b_dtype": (lambda a, b: (a, b.long()), r"input 1 \('b'\).*int64"),
    "b_shape": (lambda a, b: (a, torch.randn(4)), r"input 1 \('b'\).*\(4,\)"),
    "b_rank": (lambda a, b: (a, b[None]), r"input 1 \('b'\).*rank 1"),
    "b_not_tensor": (lambda a, b: (a, 1.5), r"input 1 \('b'\).*float"),
    "a_dtype": (lambda a, b: (a.half(), b), r"input 0 \('a'\).*float16"),
    "a_shape": (lambda a, b: (torch.randn(3, 5), b), r"input 0 \('a'\).*\(3, 5\)"),
    "a_rank": (lambda a, b: (a[0], b), r"input 0 \('a'\).*rank 2"),
    "a_not_tensor": (lambda a, b: ("a", b), r"input 0 \('a'\).*str"),
    "missing_b": (lambda a, b: (a,), r"\(a, b\).*missing a required argument: 'b'"),
    "extra": (lambda a, b: (a, b, b), r"\(a, b\).*too many positional arguments"),
}


@pytest.mark.parametrize("name", list(BAD_TWO_CALLS))
def test_two_input_model_names_the_right_input(two, name):
    _, engine = two
    make, pattern = BAD_TWO_CALLS[name]
    with pytest.raises(ds.InputError, match=pattern):
        engine(*make(torch.randn(3, 4), torch.randn(3)))


def test_two_input_model_valid_calls(two):
    model, engine = two
    a, b = torch.randn(3, 4), torch.randn(3)
    with torch.no_grad():
        ref = model(a, b)
    assert rel_l2(engine(a, b), ref) < 1e-5
    assert rel_l2(engine(a, b=b), ref) < 1e-5
    assert rel_l2(engine(a=a, b=b), ref) < 1e-5


def test_inputs_used_out_of_order():
    """The first node reads the second input: inputs must still reach the right slots."""
    class M(nn.Module):
        def forward(self, a, b):
            return b - 2 * a, a.exp()

    m = M()
    engine = ds.compile(m, (torch.randn(3), torch.randn(3)), backend="cpu")
    a, b = torch.randn(3), torch.randn(3)
    got, ref = engine(a, b), m(a, b)
    assert rel_l2(got[0], ref[0]) < 1e-6 and rel_l2(got[1], ref[1]) < 1e-6


def test_unused_input_is_still_checked():
    class M(nn.Module):
        def forward(self, a, b):
            return a * 2

    engine = ds.compile(M(), (torch.randn(3), torch.randn(4)), backend="cpu")
    a = torch.randn(3)
    assert torch.allclose(engine(a, torch.randn(4)), a * 2)
    with pytest.raises(ds.InputError, match=r"input 1 \('b'\)"):
        engine(a, torch.randn(5))


def test_keyword_arguments_in_other_order():
    class M(nn.Module):
        def forward(self, a, b):
            return a * 2 + b

    m = M()
    engine = ds.compile(m, (torch.randn(3), torch.randn(3)), backend="cpu")
    a, b = torch.randn(3), torch.randn(3)
    try:
        got = engine(b=b, a=a)
    except ds.InputError:
        return  # refusing is acceptable; answering wrongly is not
    assert rel_l2(got, m(b=b, a=a)) < 1e-6


def test_unknown_keyword_argument():
    model, (x,) = mnist_cnn(2)
    engine = ds.compile(model, (x,), backend="cpu")
    with pytest.raises(ds.InputError):
        engine(image=torch.randn(2, 1, 28, 28))


def test_dict_input_keys_in_other_order():
    class M(nn.Module):
        def forward(self, d):
            return d["x"] * 2 - d["y"]

    m = M()
    engine = ds.compile(m, ({"x": torch.randn(3), "y": torch.randn(3)},), backend="cpu")
    x, y = torch.randn(3), torch.randn(3)
    try:
        got = engine({"y": y, "x": x})
    except ds.InputError:
        return
    assert rel_l2(got, m({"y": y, "x": x})) < 1e-6


# --------------------------------------------------------------------------- #
# nested inputs and outputs keep their structure
# --------------------------------------------------------------------------- #
class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, d, scale):
        h = self.l(d["x"]) * d["y"]
        return {"h": h, "pair": (h.sum(-1), (d["x"] - 1, [h.relu(), scale * 2])), "idx": h.argmax(-1)}


def _assert_same_tree(got, ref):
    assert tree_structure(got) == tree_structure(ref), (tree_structure(got), tree_structure(ref))
    for a, b in zip(tree_leaves(got), tree_leaves(ref)):
        if b.dtype.is_floating_point:
            assert rel_l2(a, b) < 1e-5
        else:
            assert torch.equal(a, b)


def test_dict_inputs_and_nested_outputs():
    torch.manual_seed(0)
    m = Nested().eval()
    ex = ({"x": torch.randn(3, 4), "y": torch.randn(3, 4)}, torch.randn(()))
    engine = ds.compile(m, ex, backend="cpu")
    d, s = {"x": torch.randn(3, 4), "y": torch.randn(3, 4)}, torch.randn(())
    with torch.no_grad():
        ref = m(d, s)
    got = engine(d, s)
    assert type(got) is dict and list(got) == ["h", "pair", "idx"]
    assert type(got["pair"]) is tuple and type(got["pair"][1]) is tuple and type(got["pair"][1][1]) is list
    _assert_same_tree(got, ref)


def test_dict_input_errors_name_the_leaf():
    m = Nested().eval()
    engine = ds.compile(m, ({"x": torch.randn(3, 4), "y": torch.randn(3, 4)}, torch.randn(())),
                        backend="cpu")
    assert engine.graph.input_names == ["d_x", "d_y", "scale"]
    with pytest.raises(ds.InputError, match=r"input 1 \('d_y'\).*\(3, 5\)"):
        engine({"x": torch.randn(3, 4), "y": torch.randn(3, 5)}, torch.randn(()))
    with pytest.raises(ds.InputError, match=r"input 2 \('scale'\).*float64"):
        engine({"x": torch.randn(3, 4), "y": torch.randn(3, 4)}, torch.randn((), dtype=torch.float64))
    with pytest.raises(ds.InputError, match=r"expected \(\{'x': tensor, 'y': tensor\}, tensor\), "
                                            r"got \(\{'x': tensor\}, tensor\)"):
        engine({"x": torch.randn(3, 4)}, torch.randn(()))


Pair = namedtuple("Pair", ["lo", "hi"])


class NamedOut(nn.Module):
    def forward(self, x):
        return Pair(x.amin(-1), x.amax(-1))


class StructSeqOut(nn.Module):
    def forward(self, x):
        return x.max(-1)  # torch.return_types.max(values, indices)


@pytest.mark.parametrize("model_cls", [NamedOut, StructSeqOut])
def test_namedtuple_outputs(model_cls):
    m = model_cls()
    engine = ds.compile(m, (torch.randn(3, 5),), backend="cpu")
    x = torch.randn(3, 5)
    got, ref = engine(x), m(x)
    fields = ref._fields if hasattr(ref, "_fields") else ("values", "indices")
    for i, f in enumerate(fields):
        # a class outside the allow-list may come back as a dict of its fields, never imported
        g = got[f] if isinstance(got, dict) else got[i]
        assert torch.equal(g, ref[i]), f


@pytest.fixture(scope="module")
def bert():
    from tests.model_zoo import ZOO

    model, (ids, mask) = ZOO["bert_tiny_padded"]()
    return model, ds.compile(model, (ids, mask), backend="cpu"), ids, mask


def test_bert_model_output_same_keys(bert):
    model, engine, ids, mask = bert
    ids2 = torch.randint(1, 1000, ids.shape)
    mask2 = torch.ones_like(mask)
    mask2[1, -5:] = 0
    with torch.no_grad():
        ref = model(ids2, mask2)
    got = engine(ids2, mask2)
    assert type(got) is type(ref)
    assert list(got.keys()) == list(ref.keys())
    for k in ref.keys():
        assert rel_l2(got[k], ref[k]) < 1e-4, k
    assert rel_l2(got.last_hidden_state, ref.last_hidden_state) < 1e-4
    assert rel_l2(got[0], ref[0]) < 1e-4


def test_bert_input_errors_name_the_input(bert):
    _, engine, ids, mask = bert
    assert engine.graph.input_names == ["input_ids", "attention_mask"]
    with pytest.raises(ds.InputError, match=r"input 1 \('attention_mask'\).*float32.*int64"):
        engine(ids, mask.float())
    with pytest.raises(ds.InputError, match=r"input 0 \('input_ids'\).*\(2, 8\)"):
        engine(ids[:, :8], mask)
    with pytest.raises(ds.InputError, match=r"input 1 \('attention_mask'\).*\(2, 15\)"):
        engine(ids, mask[:, :15])
    with pytest.raises(ds.InputError, match=r"input_ids, attention_mask"):
        engine(ids)
