"""ONNX Runtime as a Deepseek backend (a HAL plug-in).

Each partition it is given is exported to ONNX
(:func:`deepseek.frontend.onnx_export.to_onnx`) and run by an
``onnxruntime.InferenceSession`` with all graph optimizations enabled.
``supports(node)`` claims the nodes the exporter handles: it exports each
distinct kind of node once, alone, and remembers the answer; the partitioner
sends the rest to Deepseek's reference kernels.

It registers through the ``deepseek.backends`` entry point as
``"onnxruntime"``::

    engine = ds.compile(model, inputs, backend="onnxruntime")

``onnxruntime`` is imported only when the backend is used, so ``import
deepseek`` stays cheap; ``is_available()`` is False when it is not installed.
The intra-op thread count is ``OnnxRuntimeBackend(threads=...)`` or the
``DEEPSEEK_ORT_THREADS`` environment variable (default: ONNX Runtime's own).
Its priority (5) is below the CPU backend's, so ``backend="auto"`` never
picks it over Deepseek's own CPU code.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Sequence

import torch

from deepseek.backends.hal import Backend, Capabilities
from deepseek.errors import BackendError, DeepseekError

log = logging.getLogger(__name__)

_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                     torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool})


class OrtExecutable:
    """An InferenceSession for one partition, with its input and output names."""

    def __init__(self, session, input_names: list[str], output_names: list[str], model_bytes: int):
        self.session = session
        self.input_names = input_names
        self.output_names = output_names
        self.model_bytes = model_bytes

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        from deepseek.frontend.onnx_types import numpy_to_torch, torch_to_numpy

        feeds = {n: torch_to_numpy(t) for n, t in zip(self.input_names, inputs)}
        outs = self.session.run(self.output_names, feeds)
        return [_to_torch(o, numpy_to_torch) for o in outs]


def _to_torch(arr, convert) -> torch.Tensor:
    try:
        return torch.from_numpy(arr)
    except TypeError:  # bfloat16/float8 arrays (ml_dtypes) travel as raw bits
        return convert(arr)


class OnnxRuntimeBackend(Backend):
    """Runs partitions in ONNX Runtime (CPU execution provider by default)."""

    name = "onnxruntime"

    def __init__(self, threads: int | None = None, opset: int | None = None,
                 providers: Sequence[str] | None = None):
        env = os.environ.get("DEEPSEEK_ORT_THREADS")
        self.threads = threads or (int(env) if env else None)
        self.opset = opset
        self.providers = list(providers or ["CPUExecutionProvider"])
        self._verdicts: dict[Any, bool] = {}

    def is_available(self) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None and \
            importlib.util.find_spec("onnx") is not None

    def capabilities(self) -> Capabilities:
        return Capabilities(device="cpu", dtypes=_DTYPES, priority=5,
                            extras={"providers": list(self.providers), "threads": self.threads})

    # --- which nodes ------------------------------------------------------------------------
    def supports(self, node) -> bool:
        if node.fallback is not None or node.op is None:
            return False
        specs = [v.spec for v in node.input_values()] + [o.spec for o in node.outputs]
        if any(s.dtype not in _DTYPES for s in specs):
            return False
        key = (node.op, repr(sorted(node.attrs.items(), key=lambda kv: kv[0])),
               tuple((str(s), ) for s in specs), tuple(type(x).__name__ for x in node.inputs))
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._verdicts[key] = self._exports_alone(node)
        return verdict

    def _exports_alone(self, node) -> bool:
        """Whether the node exports to ONNX by itself (its inputs as the graph's inputs)."""
        from deepseek.frontend.onnx_export import to_onnx
        from deepseek.ir.graph import Graph

        g = Graph()
        seen: set[int] = set()
        for v in node.input_values():
            if id(v) not in seen:
                seen.add(id(v))
                g.inputs.append(v)
                g.input_names.append(v.name)
        g.nodes = [node]
        g.outputs = [o for o in node.outputs]
        try:
            to_onnx(g, self.opset, check=False)
            return True
        except DeepseekError as e:
            log.debug("onnxruntime backend leaves %s to the fallback: %s", node.kind, e)
            return False

    # --- compile and run --------------------------------------------------------------------
    def compile(self, graph, target: str | None = None) -> OrtExecutable:
        import onnxruntime as ort

        from deepseek.frontend.onnx_export import to_onnx

        try:
            model = to_onnx(graph, self.opset, check=False)
        except DeepseekError as e:
            raise BackendError(f"backend 'onnxruntime' cannot export this partition: {e}") from e
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        data = model.SerializeToString()
        try:
            session = ort.InferenceSession(data, sess_options=opts, providers=self.providers)
        except Exception as e:
            raise BackendError(f"ONNX Runtime rejects the exported partition: {e}") from e
        return OrtExecutable(session, [i.name for i in model.graph.input],
                             [o.name for o in model.graph.output], len(data))
    # execute(): the base class calls the OrtExecutable
