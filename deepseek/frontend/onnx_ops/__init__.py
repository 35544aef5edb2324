"""ONNX op handlers, one module per family; each registers with ``@onnx_op``.

A handler gets a :class:`~deepseek.frontend.onnx_import.NodeContext` and
returns the node's outputs (IR Values, SymArrays, or None for an output it
does not produce), emitting IR nodes through ``n.emit``.
"""
