"""int8 convolutions through cuDNN's graph API, their epilogue fused by cuDNN.

cuDNN runs an int8 x int8 convolution (int32 accumulation) on the integer tensor cores
with element-wise work after it compiled into the same kernel (its runtime fusion):
here the dequantize scale per output channel, the bias, a residual, ReLU and the
requantize of the result. PyTorch exposes no int8 convolution, so the graph is built
through ``cudnn-frontend``'s compiled module (``pip install nvidia-cudnn-frontend==1.12.0``:
the module's graph class as 1.12 has it; later versions wrap it in Python), bound to the
libcudnn PyTorch itself loaded; without it this module offers nothing and the Triton
kernel (``triton_int8``) runs every int8 convolution.

Only symmetric activations (int8, zero point 0) qualify: cuDNN's convolution has no
zero point. A graph is built per input shape and epilogue, the first time one is run,
with the first execution plans cuDNN's heuristics offer; the fastest on that call is kept.
``Conv2dInt8.choose`` takes it only where its results agree with the Triton kernel's on
that call and it runs faster.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.machinery
import importlib.util
import os

import torch

_FRONTEND: list = []  # [module or None], filled on first use


def frontend():
    """cudnn-frontend's compiled module bound to PyTorch's libcudnn, or None (not
    installed, no CUDA, or no cuDNN loaded)."""
    if not _FRONTEND:
        try:
            _FRONTEND.append(_load())
        except (ImportError, OSError, AttributeError, RuntimeError):  # a build that differs
            _FRONTEND.append(None)
    return _FRONTEND[0]


def _load():
    if not torch.cuda.is_available() or not torch.backends.cudnn.is_available():
        return None
    try:
        spec = importlib.util.find_spec("cudnn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    found = glob.glob(os.path.join(spec.submodule_search_locations[0], "_compiled_module*.so"))
    torch.backends.cudnn.version()  # loads libcudnn
    with open("/proc/self/maps") as maps:
        lib = next((line.split()[-1] for line in maps if "/libcudnn.so" in line), None)
    if not found or lib is None:
        return None
    # the compiled module alone: the package's __init__ would dlopen a libcudnn of its own
    loader = importlib.machinery.ExtensionFileLoader("_compiled_module", found[0])
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_loader("_compiled_module", loader))
    loader.exec_module(module)
    handle = ctypes.CDLL(lib)
    module._set_dlhandle_cudnn(ctypes.cast(handle._handle, ctypes.c_void_p).value)
    return module


def _nhwc(module, g, name, shape, dtype):
    n, c, h, w = shape
    return g._make_tensor(dim=[n, c, h, w], stride=[h * w * c, 1, w * c, c],
                          data_type=_dtype(module, dtype), name=name)


def _channel(module, g, name, c):
    return g._make_tensor(dim=[1, c, 1, 1], stride=[c, 1, c, c],
                          data_type=module.data_type.FLOAT, name=name)


def _dtype(module, dtype: torch.dtype):
    t = module.data_type
    return {torch.int8: t.INT8, torch.float16: t.HALF, torch.bfloat16: t.BFLOAT16,
            torch.float32: t.FLOAT}[dtype]


_MAX_PLANS = 5  # execution plans built and timed per graph


def _built(graph, index: int) -> bool:
    try:
        graph.build_plan_at_index(index)
        return True
    except Exception:  # noqa: BLE001 - cuDNN cannot build this candidate here
        return False


class _Graph:
    """One built cuDNN graph: its tensors' uids and the workspace it needs."""

    def __init__(self, module, handle, x_shape, w_shape, conv, post_op, residual_dtype,
                 float_dtype, quant, only: int | None = None):
        t = module.data_type
        g = module.pygraph(io_data_type=t.FLOAT, intermediate_data_type=t.FLOAT,
                           compute_data_type=t.FLOAT, handle=handle)
        n = x_shape[0]
        (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
        oh = (x_shape[2] + 2 * ph - dh * (conv.kh - 1) - 1) // sh + 1
        ow = (x_shape[3] + 2 * pw - dw * (conv.kw - 1) - 1) // sw + 1
        self.out_shape = (n, conv.cout, oh, ow)
        x = _nhwc(module, g, "x", x_shape, torch.int8)
        w = _nhwc(module, g, "w", w_shape, torch.int8)
        acc = g.conv_fprop(image=x, weight=w, padding=[ph, pw], stride=[sh, sw],
                           dilation=[dh, dw], compute_data_type=t.INT32, name="conv")
        scale = _channel(module, g, "scale", conv.cout)
        y = g.mul(a=acc, b=scale, compute_data_type=t.FLOAT, name="dequantize")
        self.tensors = {"x": x, "w": w, "scale": scale}
        if conv.bias is not None:
            bias = self.tensors["bias"] = _channel(module, g, "bias", conv.cout)
            y = g.bias(input=y, bias=bias, compute_data_type=t.FLOAT, name="bias")
        if residual_dtype is not None:
            r = self.tensors["residual"] = _nhwc(module, g, "residual", self.out_shape,
                                                 residual_dtype)
            y = g.add(a=y, b=r, compute_data_type=t.FLOAT, name="residual")
        if post_op == "relu":
            y = g.relu(input=y, compute_data_type=t.FLOAT, name="relu")
        if float_dtype is not None:
            y.set_output(True)._set_data_type(_dtype(module, float_dtype))
            self.tensors["y"] = y
        if quant is not None:
            inv = self.tensors["inv"] = g._make_tensor(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1],
                                                       data_type=t.FLOAT, name="inv")
            q = g.mul(a=y, b=inv, compute_data_type=t.FLOAT, name="quantize")
            q.set_output(True)._set_data_type(t.INT8)
            self.tensors["q"] = q
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([module.heur_mode.A, module.heur_mode.FALLBACK])
        g.check_support()
        # the heuristics' first candidates that build one by one (their fused kernels
        # compiled), timed later: building all of them (9-11 for ResNet-50's layers) took
        # most of a 257 s compile of int8 ResNet-50 on an H100, these 151 s. On small test
        # shapes no candidate built one by one there while building them all at once did
        # (2026-12-08): then all of them
        # ``only``: the one plan a choice kept on disk names
        self.plans = []
        for i in range(g.get_execution_plan_count()) if only is None else [only]:
            if len(self.plans) == _MAX_PLANS:
                break
            if _built(g, i):
                self.plans.append(i)
        if not self.plans and only is None:
            g.build_plans(module.build_plan_policy.ALL)
            self.plans = list(range(g.get_execution_plan_count()))
        if not self.plans:
            raise RuntimeError("cuDNN built no execution plan")
        self.graph = g
        self.use(self.plans[0])  # CudnnConv2dInt8.build keeps the fastest
        self.uids = {k: v.get_uid() for k, v in self.tensors.items()}

    def use(self, plan: int) -> None:
        self.plan = plan
        self.workspace = self.graph.get_workspace_size_plan_at_index(plan)


class CudnnConv2dInt8:
    """The int8 convolution of ``conv`` (a ``triton_int8.Conv2dInt8``: its weight, scales,
    bias and geometry) as cuDNN graphs, one per input shape and epilogue. Call as
    ``Conv2dInt8``; ``supports`` says which calls it takes."""

    def __init__(self, conv, weight: torch.Tensor):
        self.conv = conv
        self.module = frontend()
        self.handle = self.module.create_handle() if self.module is not None else None
        # cuDNN's int8 convolutions take channels in fours: a stem's 3 input channels are
        # padded with a zero channel (in the weight here, in the input per call)
        self.pad = (-weight.shape[1]) % 4
        if self.pad:
            weight = torch.cat([weight, weight.new_zeros(weight.shape[0], self.pad,
                                                         *weight.shape[2:])], 1)
        # (C_out, C_in, KH, KW) int8 in (KH, KW, C_in) order per output channel: NHWC-like
        self.weight = weight.contiguous(memory_format=torch.channels_last)
        self.scale = conv.scale.reshape(1, -1, 1, 1).contiguous()
        self.bias = None if conv.bias is None else conv.bias.reshape(1, -1, 1, 1).contiguous()
        self.graphs: dict[tuple, _Graph | None] = {}
        self.inv = {}

    def supports(self, x: torch.Tensor, x_zero_point: int, quant: tuple | None) -> bool:
        return (self.module is not None and x.dtype == torch.int8 and int(x_zero_point) == 0
                and x.dim() == 4 and self.conv.cout % 4 == 0
                and (quant is None or (int(quant[1]) == 0 and quant[2] == torch.int8)))

    def build(self, x: torch.Tensor, post_op: str, residual, float_dtype, quant,
              plan: int | None = None) -> _Graph | None:
        """The graph for this call (built the first time, its fastest execution plan on
        ``x`` kept, or ``plan``, chosen so before, alone; None where cuDNN has no plan
        that runs, or ``plan`` does not build). Never during a capture."""
        key = (tuple(x.shape), post_op, None if residual is None else residual.dtype,
               float_dtype, None if quant is None else float(quant[0]))
        if key not in self.graphs:
            try:
                n, c, h, w = x.shape
                graph = _Graph(self.module, self.handle, (n, c + self.pad, h, w),
                               tuple(self.weight.shape), self.conv, post_op, key[2],
                               float_dtype, quant, only=plan)
            except Exception:  # noqa: BLE001 - cuDNN has no engine for this graph here
                graph = None
            if plan is None:
                graph = graph and self._fastest(graph, x, residual, float_dtype, quant)
            elif graph is None:
                return None  # not kept: measured afresh at the next build
            self.graphs[key] = graph
        return self.graphs[key]

    def _fastest(self, graph: _Graph, x, residual, float_dtype, quant) -> _Graph | None:
        """``graph`` set to run its fastest plan on these inputs (each plan run once, then
        timed as a CUDA graph replays it), or None where none runs. cuDNN's heuristic
        first plan ran 64->64 3x3 layers 3.8x slower than the best one on an H100. A plan
        is a candidate only where its results agree with the first plan's that runs
        (``triton_int8._agree``): with every plan a candidate, a requantized output
        disagreed with the reference on an H100 (the 1x1 case of the cuDNN test)."""
        from deepseek.backends.cuda.autotune import graph_time
        from deepseek.backends.cuda.triton_int8 import _agree

        best = first = None
        for plan in graph.plans:
            try:
                graph.use(plan)
                out = self.run(graph, x, residual, float_dtype, quant)
                torch.cuda.synchronize(x.device)
                if first is not None and not _agree(first, out):
                    continue
                seconds = graph_time(lambda: self.run(graph, x, residual, float_dtype, quant))
            except Exception:  # noqa: BLE001 - a plan cuDNN built but cannot run here
                continue
            first = first or tuple(None if t is None else t.clone() for t in out)
            if best is None or seconds < best[0]:
                best = (seconds, plan)
        if best is None:
            return None
        graph.use(best[1])
        return graph

    def __call__(self, x: torch.Tensor, x_zero_point: int, post_op: str = "none",
                 residual: torch.Tensor | None = None, float_dtype: torch.dtype | None = None,
                 quant: tuple | None = None):
        graph = self.build(x, post_op, residual, float_dtype, quant)
        if graph is None:
            raise RuntimeError("cuDNN built no int8 convolution for this call")
        return self.run(graph, x, residual, float_dtype, quant)

    def run(self, graph: _Graph, x: torch.Tensor, residual, float_dtype, quant):
        """``graph``'s chosen plan on this call's tensors: (float result or None, int8
        result or None), channels-last."""
        cl = torch.channels_last
        if self.pad:  # zeros in the padded channel (the input's zero point is 0)
            n, c, h, w = x.shape
            padded = torch.zeros((n, c + self.pad, h, w), dtype=x.dtype, device=x.device,
                                 memory_format=cl)
            padded[:, :c].copy_(x)
            x = padded
        x = x.contiguous(memory_format=cl)
        buffers = {"x": x, "w": self.weight, "scale": self.scale, "bias": self.bias}
        y = q = None
        if residual is not None:
            buffers["residual"] = residual.contiguous(memory_format=cl)
        if float_dtype is not None:
            y = buffers["y"] = torch.empty(graph.out_shape, dtype=float_dtype, device=x.device,
                                           memory_format=cl)
        if quant is not None:
            q = buffers["q"] = torch.empty(graph.out_shape, dtype=torch.int8, device=x.device,
                                           memory_format=cl)
            scale = float(quant[0])
            if scale not in self.inv:
                self.inv[scale] = torch.full((1, 1, 1, 1), 1.0 / scale, device=x.device)
            buffers["inv"] = self.inv[scale]
        workspace = torch.empty(max(graph.workspace, 1), dtype=torch.uint8, device=x.device)
        self.module.set_stream(self.handle, torch.cuda.current_stream(x.device).cuda_stream)
        graph.graph._execute_plan_at_index(
            {uid: buffers[k].data_ptr() for k, uid in graph.uids.items()}, workspace.data_ptr(),
            graph.plan, self.handle)
        return y, q
