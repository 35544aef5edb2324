"""PyTorch -> IR -> ONNX -> IR -> run matches eager for every breadth model (tests/model_zoo.py)."""

import pytest

from tests.model_zoo import ZOO
from tests.onnx_roundtrip_util import roundtrip


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_roundtrip(name):
    model, inputs = ZOO[name]()
    graph, proto, back = roundtrip(model, inputs)
    assert not back.fallback_nodes(), "every imported node maps onto an IR op"
