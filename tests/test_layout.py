"""space_to_depth_stem: a stride-2 stem convolution recast on 2x2 pixel blocks computes the
same result (checked on the CPU, where the CUDA-targeted graph also runs)."""

import pytest
import torch
import torch.nn as nn

import deepseek as ds
from deepseek.ir.ops import Op
from deepseek.passes import space_to_depth_stem
from deepseek.quantization import QuantConfig, Quantizer
from tests.conftest import rel_l2


class Stem(nn.Module):
    def __init__(self, cin=3, k=7, pad=3, stride=2, cout=16):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.head = nn.Conv2d(cout, 8, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.bn(self.conv(x)))))


def _convs(graph):
    return [n for n in graph.nodes if n.op in (Op.CONVOLUTION, Op.CONV2D_INT8)]


@pytest.mark.parametrize("cin,k,pad,size", [(3, 7, 3, (32, 32)), (3, 7, 3, (33, 30)),
                                            (4, 5, 2, (17, 20)), (1, 3, 0, (15, 16)),
                                            (3, 3, 1, (9, 9))])
def test_stem_on_pixel_blocks_matches_eager(cin, k, pad, size):
    torch.manual_seed(k * 100 + size[0])
    model = Stem(cin, k, pad).eval()
    x = torch.randn(2, cin, *size)
    graph = ds.optimize_graph(ds.capture(model, (x,)), target="cuda")
    stem = _convs(graph)[0]
    assert stem.attrs["stride"] == [1, 1] and stem.attrs["padding"] == [0, 0]
    assert stem.inputs[0].spec.shape[1] == 4 * cin
    assert stem.inputs[1].spec.shape[2:] == ((k + 1) // 2,) * 2
    got = ds.compile(graph, backend="cpu", opt_level=0)(x)
    with torch.no_grad():
        assert rel_l2(got, model(x)) < 1e-5


def test_only_few_channel_stride_two_convolutions_are_recast():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    for model in (Stem(stride=1), Stem(cin=8), Stem(k=4, pad=1)):
        xi = torch.randn(1, model.conv.in_channels, 16, 16)
        graph = ds.optimize_graph(ds.capture(model.eval(), (xi,)), target="cuda")
        assert [n.attrs["stride"] for n in _convs(graph)] == \
            [list(model.conv.stride), [1, 1]], model
    cpu = ds.optimize_graph(ds.capture(Stem().eval(), (x,)), target="cpu")
    assert _convs(cpu)[0].attrs["stride"] == [2, 2]  # a CUDA rewrite only
    off = ds.compile(Stem().eval(), [x], backend="cpu", disable_passes=["space_to_depth_stem"])
    assert "space_to_depth_stem" not in [p["name"] for p in off.report().passes]


def test_int8_stem_is_left_as_captured():
    """The recast is for float convolutions: an int8 stem ran no faster recast (H100)."""
    torch.manual_seed(1)
    model = Stem().eval()
    calib = [[torch.randn(2, 3, 24, 22)] for _ in range(2)]
    qmodel = Quantizer(QuantConfig(progress=False)).quantize(model, calib)
    x = torch.randn(2, 3, 24, 22)
    graph = ds.optimize_graph(ds.capture(qmodel, (x,)), target="cuda", precision="int8")
    stem = _convs(graph)[0]
    assert stem.op is Op.CONV2D_INT8 and stem.attrs["stride"] == [2, 2]
    assert not any(n.op is Op.CONSTANT_PAD_ND for n in graph.nodes)


def test_pass_is_idempotent_on_its_own_output():
    x = torch.randn(1, 3, 32, 32)
    graph = ds.optimize_graph(ds.capture(Stem().eval(), (x,)), target="cuda")
    before = [(n.op, dict(n.attrs)) for n in graph.nodes]
    assert [(n.op, dict(n.attrs)) for n in space_to_depth_stem(graph).nodes] == before
