"""``onnx.backend.base.Backend`` over Deepseek: ONNX's own test suite runs unchanged.

``prepare(model)`` imports the model (:func:`deepseek.frontend.onnx_import.import_onnx`)
and compiles it for the CPU backend; the returned rep's ``run(inputs)`` takes
numpy arrays (a list in graph-input order, or a dict by name) and returns
numpy arrays named like the graph outputs.

Example::

    import onnx.backend.test
    import deepseek.onnx_backend as backend

    backend_test = onnx.backend.test.BackendTest(backend, __name__)
    globals().update(backend_test.include("test_relu_cpu").test_cases)

    rep = backend.prepare(onnx.load("model.onnx"))
    outputs = rep.run([x])
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep, namedtupledict

from deepseek.errors import InputError


class DeepseekRep(BackendRep):
    """A compiled model: ``run(inputs)`` -> named tuple of numpy arrays.

    A model that takes shapes, axes or sizes as run-time inputs (``Reshape``'s
    shape fed as a graph input, say) is compiled at ``run``, specialized to the
    values of those inputs (``value_inputs``), and recompiled when they change.
    """

    def __init__(self, engine, input_names: list[str], output_names: list[str],
                 model: onnx.ModelProto | None = None, value_inputs: Sequence[str] = (),
                 options: dict | None = None):
        self.engine = engine
        self.input_names = input_names
        self.output_names = output_names
        self.model = model
        self.value_inputs = list(value_inputs)
        self.options = dict(options or {})
        self._engines: dict[bytes, Any] = {}
        self.output_types: list[int] = []

    def _engine_for(self, tensors: list) -> tuple[Any, list]:
        from deepseek.frontend.onnx_types import torch_to_numpy

        if not self.value_inputs:
            return self.engine, tensors
        pos = {n: i for i, n in enumerate(self.input_names)}

        def key_of(names):
            return b"".join(repr((n, tensors[pos[n]].dtype, tuple(tensors[pos[n]].shape))).encode()
                            + torch_to_numpy(tensors[pos[n]]).tobytes() for n in names)

        fixed = {n: tensors[pos[n]] for n in self.value_inputs}
        engine = self._engines.get(key_of(fixed))
        if engine is None:
            import deepseek as ds

            graph = self._import_with_values(fixed, tensors, pos)
            engine = ds.compile(graph, backend=self.options.get("backend", "cpu"),
                                opt_level=self.options.get("opt_level", 2))
            if len(self._engines) < 64:
                self._engines[key_of(fixed)] = engine
        return engine, [t for n, t in zip(self.input_names, tensors) if n not in fixed]

    def _import_with_values(self, fixed: dict, tensors: list, pos: dict):
        """Import with ``fixed`` input values; inputs found to be needed too are added."""
        from deepseek.errors import UnsupportedOpError
        from deepseek.frontend.onnx_import import import_onnx

        for _ in range(len(self.input_names) + 1):
            try:
                return import_onnx(self.model, dynamic_dims=self.options.get("dynamic_dims"),
                                   input_values=fixed)
            except UnsupportedOpError as e:
                more = [n for n in getattr(e, "value_inputs", []) if n not in fixed]
                if not more:
                    raise
                self.value_inputs += more
                fixed.update({n: tensors[pos[n]] for n in more})
        raise AssertionError("unreachable")

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        import torch

        from deepseek.frontend.onnx_types import SUB_BYTE, numpy_to_torch, to_ml_dtype, torch_to_numpy
        from deepseek.ir.interpreter import bind_inputs

        if isinstance(inputs, dict):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise InputError(f"missing inputs {missing}; the model takes {self.input_names}")
            inputs = [inputs[n] for n in self.input_names]
        elif isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if len(inputs) != len(self.input_names):
            raise InputError(f"the model takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        tensors = [x if isinstance(x, torch.Tensor) else numpy_to_torch(np.asarray(x))
                   for x in inputs]
        engine, tensors = self._engine_for(tensors)
        bind_inputs(engine.graph, tensors)
        with torch.no_grad():
            outs = engine.run_flat(tensors)
        arrays = [torch_to_numpy(t) for t in outs]
        for k, elem in enumerate(self.output_types):
            if elem in SUB_BYTE and k < len(arrays):  # sub-byte outputs are held unpacked
                arrays[k] = to_ml_dtype(arrays[k], elem)
        return namedtupledict("Outputs", self.output_names)(*arrays)


class DeepseekBackend(Backend):
    """Deepseek as an ONNX backend (CPU)."""

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        return cls.supports_device(device)

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> DeepseekRep:
        """Import and compile ``model`` (a ModelProto, path or bytes) for the CPU backend."""
        import deepseek as ds
        from deepseek.frontend.onnx_import import import_onnx, load_model_proto

        from deepseek.errors import UnsupportedOpError

        proto = load_model_proto(model)
        inits = {t.name for t in proto.graph.initializer}
        names_in = [i.name for i in proto.graph.input if i.name not in inits]
        names_out = [o.name for o in proto.graph.output]
        try:
            graph = import_onnx(proto, dynamic_dims=kwargs.get("dynamic_dims"))
        except UnsupportedOpError as e:
            needed = getattr(e, "value_inputs", None)
            if not needed:
                raise
            # shape-like run-time inputs: compile at run(), specialized to their values
            return cls._typed(DeepseekRep(None, names_in, names_out, proto, needed, kwargs), proto)
        engine = ds.compile(graph, backend=kwargs.get("backend", "cpu"),
                            opt_level=kwargs.get("opt_level", 2))
        return cls._typed(DeepseekRep(engine, names_in, names_out), proto)

    @staticmethod
    def _typed(rep: DeepseekRep, proto: onnx.ModelProto) -> DeepseekRep:
        rep.output_types = [o.type.tensor_type.elem_type for o in proto.graph.output]
        return rep

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU",
                  **kwargs: Any) -> tuple[Any, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU",
                 outputs_info: Sequence[tuple[np.dtype, tuple[int, ...]]] | None = None,
                 **kwargs: Any) -> tuple[Any, ...]:
        """Run one node on numpy inputs (a model of that one node is built around it)."""
        from onnx import helper

        arrays = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
        names = list(inputs.keys()) if isinstance(inputs, dict) else [i for i in node.input if i]
        graph_inputs = [helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(np.asarray(a).dtype), np.asarray(a).shape)
            for name, a in zip(names, arrays)]
        outs = []
        for i, name in enumerate(o for o in node.output if o):
            if outputs_info and i < len(outputs_info):
                dt, shape = outputs_info[i]
                outs.append(helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(np.dtype(dt)), shape))
            else:
                outs.append(helper.make_empty_tensor_value_info(name))
        model = helper.make_model(helper.make_graph([node], "run_node", graph_inputs, outs),
                                  opset_imports=[helper.make_opsetid(
                                      "", kwargs.get("opset", onnx.defs.onnx_opset_version()))])
        return cls.run_model(model, dict(zip(names, arrays)), device, **kwargs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return str(device).upper().startswith("CPU")


is_compatible = DeepseekBackend.is_compatible
prepare = DeepseekBackend.prepare
run_model = DeepseekBackend.run_model
run_node = DeepseekBackend.run_node
supports_device = DeepseekBackend.supports_device

__all__ = ["DeepseekBackend", "DeepseekRep", "prepare", "run_model", "run_node",
           "supports_device", "is_compatible"]
