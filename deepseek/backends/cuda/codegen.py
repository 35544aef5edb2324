"""The CUDA backend's kernel choices on top of the shared plan generator.

Fused element-wise programs, residual add + layer norm, RMS norm, a layer's
key/value cache writes and fp8 GEMMs' activation quantization run as Triton
kernels (``triton_*.py``).

Convolutions run through cuDNN on channels-last activations and weights. In
bf16/fp16, a convolution's epilogue runs inside cuDNN's fused kernels:

- convolution + bias + ReLU -> ``torch.cudnn_convolution_relu``;
- convolution + bias + residual add + ReLU (a ResNet block's end) ->
  ``torch.cudnn_convolution_add_relu``; when the residual is itself a
  convolution read only there (the block's downsample), that one runs without
  its bias and the two biases are added once, at compile time.

In quantized graphs, ``conv2d_int8`` runs as the Triton implicit-GEMM kernel
(``triton_int8.py``); at a ResNet block's end, that kernel's epilogue also adds
the residual, applies ReLU and writes the block's output quantized for the next
block's convolutions, and in float16 or float32 only where a float reader needs it
(``int8_conv_residual``).

PyTorch's plain convolution adds the bias in a second pass over the output,
which on an H200 costs as much as the convolution itself for ResNet-50's 1x1
layers. GEMMs with a constant bias and a following ReLU or GELU run as one
cuBLASLt call with the activation as its epilogue (``torch._addmm_activation``).
cuBLASLt's GELU is the tanh form: it stands for a tanh GELU exactly, and for
the erf GELU only in bf16/fp16, where the two differ by at most 4.8e-4, less
than a bf16 rounding step for any |y| > 0.12.
"""

from __future__ import annotations

import math

import torch

from deepseek.backends.cpu.codegen import _Emitter
from deepseek.backends.cuda.triton_attention import Attention
from deepseek.backends.cuda.triton_fp8 import FP8Linear
from deepseek.backends.cuda.triton_int8 import Conv2dInt8, quantize_per_tensor
from deepseek.backends.cuda.triton_kv import KVWrite
from deepseek.backends.cuda.triton_norm import AddLayerNorm, RMSNorm
from deepseek.backends.cuda.triton_pointwise import PointwiseKernel
from deepseek.backends.cuda.triton_pool import max_pool2d
from deepseek.ir.graph import Node, Value
from deepseek.ir.ops import Op
from deepseek.quantization.kernels import triton_conv2d_int8
from deepseek.quantization.lowering import QDQMatcher

_LOW = (torch.bfloat16, torch.float16)
_RESHAPES = (Op.VIEW, Op.UNSAFE_VIEW, Op.RESHAPE)


def _pool_args(attrs) -> tuple:
    """A max pool node's (kernel_size, stride, padding, dilation, ceil_mode), as
    ``torch.max_pool2d`` and ``triton_pool.max_pool2d`` take them."""
    return (list(attrs["kernel_size"]), list(attrs.get("stride", [])), attrs.get("padding", 0),
            attrs.get("dilation", 1), bool(attrs.get("ceil_mode", False)))


class CUDAEmitter(_Emitter):
    """Plans for CUDA devices: cuDNN and cuBLASLt epilogues (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a downsample convolution read only by a fused residual call leaves it its bias:
        # id(that call's conv) -> the downsample; and the downsamples' ids
        self.bias_from: dict[int, Node] = {}
        self.bias_moved: set[int] = set()
        self.tuner = None  # an Autotuner (autotune.py): measured or cached kernel choices

    # --- decisions spanning nodes -------------------------------------------
    def fusable_conv(self, node: Node | None) -> bool:
        """A 2-D convolution that cuDNN's fused kernels can run, read by one node only."""
        if node is None or node.op is not Op.CONVOLUTION:
            return False
        x, w, b = node.inputs
        a, out, g = node.attrs, node.outputs[0], self.graph
        return (len(a["stride"]) == 2 and not a["transposed"] and g.is_constant(w)
                and (b is None or g.is_constant(b)) and isinstance(x, Value)
                and x.spec.dtype in _LOW and w.spec.dtype == x.spec.dtype
                and len(self.users.get(id(out), [])) == 1 and out not in g.outputs)

    def int8_kernel(self, node: Node | None, post_op: str = "none") -> bool:
        """A quantized convolution with a float result and ``post_op``, read by one node
        only, that the Triton kernel runs (its epilogue can then take more work)."""
        if node is None or node.op is not Op.CONV2D_INT8:
            return False
        x, w, ws, wz, b = node.inputs
        a, g, out = node.attrs, self.graph, node.outputs[0]
        return (all(g.is_constant(v) for v in (w, ws, wz, b) if v is not None)
                and a["post_op"] == post_op and a["output_dtype"] in (None, torch.float32)
                and len(self.users.get(id(out), [])) == 1 and out not in g.outputs
                and isinstance(x, Value) and Conv2dInt8.supported(
                    x.spec.dtype, *(None if v is None else self.constants[v.name]
                                    for v in (w, ws, wz)), a["groups"]))

    def int8_call(self, conv: Node) -> str:
        """The start of a call of ``conv``'s Triton kernel: ``kernel(x, x_zero_point``."""
        x, w, ws, _, b = conv.inputs
        a = conv.attrs
        kernel = self.const(triton_conv2d_int8(
            self.constants[w.name], self.constants[ws.name], a["x_scale"],
            None if b is None else self.constants[b.name], a["stride"], a["padding"],
            a["dilation"]), "int8_conv")
        return f"{kernel}({self.name(x)}, {a['x_zero_point']}"

    def find_pooled_quantize(self) -> None:
        """int8 convolution -> max pool -> full-range quantize (a ResNet's stem): the
        convolution writes the quantized values and the pool runs on the integers;
        quantization is monotone, so the max of the quantized values is the quantized
        max. Saves the float result's write and reads and the quantize's pass."""
        for node in self.graph.nodes:
            if not any(self.int8_kernel(node, post) for post in ("none", "relu")):
                continue
            pool = self.users[id(node.outputs[0])][0]
            if pool.op is not Op.MAX_POOL2D or pool.outputs[0] in self.graph.outputs:
                continue
            after = self.users.get(id(pool.outputs[0]), [])
            params = self.qdq.output_quantize(after[0]) if len(after) == 1 else None
            if params is not None:
                self.pooled[id(node)] = params
                self.fused_into[id(after[0])] = self.names[id(pool.outputs[0])]

    def prepare(self) -> None:
        """Convolution + residual add + ReLU as one cuDNN call or one int8 kernel
        (``find_conv_residuals``); a downsample convolution read only by a cuDNN call
        leaves its bias to that call."""
        self.qdq = QDQMatcher(self.graph)
        self.find_conv_residuals(lambda n: self.fusable_conv(n) or self.int8_kernel(n))
        self.pooled: dict[int, tuple] = {}  # id(conv) -> (scale, zero point, dtype)
        self.find_pooled_quantize()
        for conv, z in self.conv_add_relu.values():
            other = self.producer(z)
            if self.fusable_conv(other) and other.inputs[2] is not None \
                    and id(other) not in self.deferred:
                self.bias_from[id(conv)] = other
                self.bias_moved.add(id(other))

    # --- statements -----------------------------------------------------------
    def weight(self, conv: Node) -> str:
        w = self.constants[conv.inputs[1].name]
        return self.const(w.contiguous(memory_format=torch.channels_last), "wcl")

    def conv_args(self, node: Node, bias: str) -> str:
        a = node.attrs
        return (f"{self.as_cl(node.inputs[0])}, {self.weight(node)}, {bias}, "
                f"{a['stride']}, {a['padding']}, {a['dilation']}")

    def bias(self, node: Node) -> str:
        """This convolution's bias, plus the bias of a convolution whose call it takes over."""
        b, moved = node.inputs[2], self.bias_from.get(id(node))
        if moved is None:
            return self.name(b) if b is not None else "None"
        total = sum(self.constants[v.name].float() for v in [b, moved.inputs[2]] if v is not None)
        return self.const(total.to(node.inputs[1].spec.dtype), "bsum")

    def convolution(self, node: Node, attrs) -> str | None:
        if len(attrs["stride"]) != 2 or not self.graph.is_constant(node.inputs[1]):
            return None
        out = node.outputs[0]
        users = self.users.get(id(out), [])
        if id(node) in self.bias_moved:  # its bias is added by the fused call reading it
            self.cl.add(id(out))
            return (f"torch.convolution({self.conv_args(node, 'None')}, False, "
                    f"{attrs['output_padding']}, {attrs['groups']})")
        if self.fusable_conv(node) and users[0].op is Op.RELU:
            self.fused_into[id(users[0])] = self.names[id(out)]
            self.cl.update((id(out), id(users[0].outputs[0])))
            return f"torch.cudnn_convolution_relu({self.conv_args(node, self.bias(node))}, {attrs['groups']})"
        # cuDNN's tensor-core convolutions want channels-last activations and weights
        self.cl.add(id(out))
        b = self.name(node.inputs[2]) if node.inputs[2] is not None else "None"
        return (f"torch.convolution({self.conv_args(node, b)}, {attrs['transposed']}, "
                f"{attrs['output_padding']}, {attrs['groups']})")

    def gemm_activation(self, node: Node, attrs) -> str | None:
        """bias + GEMM + ReLU/GELU as one cuBLASLt call with the activation as epilogue."""
        b, x, w = node.inputs
        g, out = self.graph, node.outputs[0]
        if not (isinstance(x, Value) and x.spec.rank == 2 and g.is_constant(w)
                and g.is_constant(b) and b.spec.rank == 1 and x.spec.dtype in _LOW
                and attrs.get("beta", 1) == 1 and attrs.get("alpha", 1) == 1):
            return None
        reader = self.activation_reader(out)
        if reader is None:
            return None
        act, act_input, post = reader
        self.fused_into[id(act)] = self.names[id(act_input)]
        return (f"torch._addmm_activation({self.name(b)}, {self.name(x)}, {self.name(w)}, "
                f"use_gelu={post[0] == 'gelu'})")

    def add_layer_norm(self, node: Node, ins, attrs) -> str:
        """One Triton kernel. It also writes the normalized rows in the dtype a cast of
        them (directly or through a reshape) wants: bf16 for the next GEMM while the
        residual stream stays float32; or only in that dtype when the cast is their only
        reader."""
        y, g = node.outputs[1], self.graph
        users = self.users.get(id(y), [])

        def cast(n: Node) -> bool:
            return (n.op is Op.TO_COPY and set(n.attrs) <= {"dtype"} and n.attrs["dtype"] in _LOW
                    and n.outputs[0] not in g.outputs)

        found = None  # (cast node, reshape node between y and it, or None)
        for u in users:
            if cast(u):
                found = (u, None)
            elif u.op in _RESHAPES and u.outputs[0] not in g.outputs:
                after = self.users.get(id(u.outputs[0]), [])
                if len(after) == 1 and cast(after[0]):
                    found = (after[0], u)
            if found:
                break
        n = math.prod(attrs["normalized_shape"])
        if not AddLayerNorm.supported(n, [v.spec.dtype for v in ins if v is not None]):
            return super().add_layer_norm(node, ins, attrs)
        kernel = self.const(AddLayerNorm(n, attrs["eps"]), "triton_add_ln")
        args = ", ".join(self.name(v) if v is not None else "None" for v in ins)
        s_out = node.outputs[0]
        if not self.users.get(id(s_out)) and s_out not in g.outputs:
            args += ", keep_sum=False"  # no reader of the residual sum (a post-norm block)
        if found is None:
            return f"{kernel}({args})"
        (c, view), dtype = found, self.name(found[0].attrs["dtype"])
        if len(users) == 1 and y not in g.outputs:  # only the low-precision rows are read
            self.fused_into[id(c)] = self.names[id(view.outputs[0] if view else y)]
            return f"{kernel}({args}, y_dtype={dtype})"
        s_, y_, low = (self.names[id(v)] for v in (node.outputs[0], y, c.outputs[0]))
        self.lines.append(f"    {s_}, {y_}, {low} = {kernel}({args}, also={dtype})")
        if view is not None:
            self.lines.append(f"    {low} = {low}.reshape({list(c.outputs[0].spec.concrete(self.env))})")
        self.fused_into[id(c)] = low  # assigned here, before the cast's place
        return f"{s_}, {y_}"

    def kv_write(self, index: int, node: Node, ins) -> str | None:
        """This in-place cache write and a later one at the same positions (a layer's keys
        and values) as one Triton kernel; the partner's statement then names its cache."""
        def parts(n):  # (cache, positions, new rows) of a plain write along dim 2
            if n.attrs.get("accumulate") or len(n.inputs) != 5 or n.inputs[1] is not None \
                    or n.inputs[2] is not None or not isinstance(n.inputs[3], Value):
                return None  # inputs: cache, the indices [None, None, positions], new rows
            return n.inputs[0], n.inputs[3], n.inputs[4]

        mine = parts(node)
        if mine is None:
            return None
        cache, idx, new = mine
        made = self.position()
        for other in self.graph.nodes[index + 1:index + 8]:
            theirs = parts(other) if other.op is Op.INDEX_PUT and other.reuse == 0 else None
            if theirs is None or theirs[1] is not idx or theirs[0].spec != cache.spec \
                    or theirs[2].spec != new.spec or len(self.users.get(id(theirs[0]), [])) != 1 \
                    or any(made.get(id(v), -1) >= index for v in other.input_values()):
                continue
            if not KVWrite.supported(cache.spec.shape, new.spec.shape,
                                     [cache.spec.dtype, new.spec.dtype]):
                return None
            self.fused_into[id(other)] = self.name(theirs[0])
            kernel = self.const(KVWrite(), "triton_kv")
            return (f"{kernel}({self.name(cache)}, {self.name(theirs[0])}, {self.name(idx)}, "
                    f"{self.name(new)}, {self.name(theirs[2])})")
        return None

    def triton_kernel(self, node: Node, ins) -> str | None:
        """A fused element-wise node as one generated Triton kernel (GPU backends)."""
        meta = [torch.empty(v.spec.concrete(self.env), dtype=v.spec.dtype, device="meta")
                if isinstance(v, Value) else v for v in ins]
        out = node.outputs[0].spec
        program = node.attrs["program"]
        if not PointwiseKernel.supported(program, meta, out.dtype):
            return None
        kernel = PointwiseKernel(program, meta, out.concrete(self.env), out.dtype)
        return f"{self.const(kernel, 'triton')}({', '.join(self.name(v) for v in ins)})"

    def attention(self, node: Node, ins, attrs) -> str | None:
        """SDPA through PyTorch's kernels or the Triton kernel (``triton_attention.py``) in
        one of its tilings, as the tuner chose (measured at opt_level=3, cached on disk).
        Unmeasured, the Triton kernel runs where PyTorch's 64-128-query tiles would leave
        most SMs idle: few heads and sequences of 32-1024 tokens (BERT at batch 1)."""
        q, k, v = ins[:3]
        mask = ins[3] if len(ins) > 3 else None
        if not all(isinstance(x, Value) for x in (q, k, v)) or \
                (mask is not None and not isinstance(mask, Value)):
            return None
        metas = [None if x is None else torch.empty(x.spec.concrete(self.env), dtype=x.spec.dtype,
                                                    device="meta") for x in (q, k, v, mask)]
        causal, scale = bool(attrs.get("is_causal", False)), attrs.get("scale")
        gqa, dropout = bool(attrs.get("enable_gqa", False)), attrs.get("dropout_p", 0.0)
        if not Attention.supported(*metas, dropout, gqa):
            return None
        kernels = {f"triton_m{m}_n{n}": Attention(m, n) for m, n in ((16, 64), (32, 64),
                                                                      (64, 64), (16, 128))}
        b, h, sq, _ = metas[0].shape
        # (plans generated without a GPU, as in tests, assume an H100/H200's 132 SMs)
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count \
            if torch.cuda.is_available() else 132
        few = b * h * -(-sq // 64) < sms // 2 and 32 <= sq and metas[1].shape[2] <= 1024
        default = "triton_m16_n128" if few else "sdpa"
        samples: list = []

        def sample():  # random inputs of these shapes, made only if the tuner measures
            if not samples:
                def rand(m, heads_last=True):
                    if m.dtype == torch.bool:
                        return torch.rand(m.shape, device=self.device) > 0.2
                    x = torch.randn(m.shape, device=self.device).to(m.dtype)
                    return x.transpose(1, 2).contiguous().transpose(1, 2) if heads_last else x
                samples.extend([rand(m) for m in metas[:3]] +
                               [None if metas[3] is None else rand(metas[3], False)])
            return samples

        def sdpa():
            qs, ks, vs, ms = sample()
            return torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, ms, dropout, causal, scale=scale, enable_gqa=gqa)

        candidates = {"sdpa": sdpa, **{name: (lambda a=a: a(*sample(), causal, scale))
                                       for name, a in kernels.items()}}
        problem = (f"sdpa q{tuple(metas[0].shape)} kv{tuple(metas[1].shape)} "
                   f"mask{None if mask is None else (tuple(metas[3].shape), str(metas[3].dtype))}"
                   f" causal={causal} {metas[0].dtype}")
        choice = default if self.tuner is None else self.tuner.choose(problem, candidates,
                                                                      default)
        if choice == "sdpa":
            return None  # PyTorch's call, as written in the graph
        return (f"{self.const(kernels[choice], 'triton_attention')}({self.name(q)}, "
                f"{self.name(k)}, {self.name(v)}, {self.name(mask) if mask is not None else None},"
                f" {causal}, {scale})")

    def special(self, index, node, ins, attrs, live) -> str | None:
        op = node.op
        if op is Op.SCALED_DOT_PRODUCT_ATTENTION:
            call = self.attention(node, ins, attrs)
            if call is not None:
                return call
        if id(node) in self.conv_add_relu:
            conv, z = self.conv_add_relu[id(node)]
            self.cl.add(id(node.outputs[0]))
            if conv.op is Op.CONV2D_INT8:
                return self.int8_conv_residual(conv, z, node)
            return self.add_relu_call(conv, z)
        if id(node) in self.pooled:
            scale, zp, dtype = self.pooled[id(node)]
            self.cl.add(id(node.outputs[0]))
            return (f"{self.int8_call(node)}, {attrs['post_op']!r}, "
                    f"quant=({scale!r}, {zp}, {self.name(dtype)}))[1]")
        if op is Op.MAX_POOL2D and (ins[0].spec.dtype in (torch.uint8, torch.int8)
                                    or id(self.producer(ins[0])) in self.pooled):
            return self.triton_max_pool(node, ins[0], _pool_args(attrs), "max_pool_int8")
        if op is Op.MAX_POOL2D and ins[0].spec.dtype.is_floating_point and ins[0].spec.rank == 4:
            call = self.float_max_pool(node, ins[0], attrs)
            if call is not None:
                return call
        if op in (Op.QUANTIZE_PER_TENSOR, Op.QUANTIZE_PER_TENSOR_TENSOR):
            params = self.qdq.qparams(node)
            if params is not None and ins[0].spec.dtype.is_floating_point \
                    and attrs["dtype"] in (torch.uint8, torch.int8):
                return (f"{self.const(quantize_per_tensor, 'quantize')}({self.name(ins[0])}, "
                        f"{1.0 / params[0]!r}, {params[1]}, {attrs['quant_min']}, "
                        f"{attrs['quant_max']}, {self.name(attrs['dtype'])})")
        if op is Op.INDEX_PUT and node.reuse == 0:
            fused = self.kv_write(index, node, ins)
            if fused is not None:
                return fused
        if op is Op.FUSED_POINTWISE:
            kernel = self.triton_kernel(node, ins)
            if kernel is not None:
                return kernel
        if op is Op.FP8_LINEAR and FP8Linear.supported(ins[0].spec.shape[-1]):
            x, w, ws, b = ins
            kernel = self.const(FP8Linear(self.constants[w.name], self.constants[ws.name]),
                                "fp8_linear")
            return f"{kernel}({self.name(x)}, {self.name(b) if b is not None else None})"
        if op is Op.FUSED_RMS_NORM:
            x, w = ins
            n = x.spec.concrete(self.env)[-1]
            if RMSNorm.supported(n, [v.spec.dtype for v in ins if v is not None]):
                kernel = self.const(RMSNorm(n, attrs["eps"]), "triton_rms_norm")
                return f"{kernel}({self.name(x)}, {self.name(w) if w is not None else None})"
        if op is Op.NATIVE_GROUP_NORM:  # CUDA's kernel wants NCHW
            d = node.opdef
            args, _ = d.call_args([f"{self.name(ins[0])}.contiguous()"]
                                       + [self.name(v) for v in ins[1:]],
                                       {k: self.name(a) for k, a in attrs.items()})
            return f"{self.const(d.overload._op, 'k_group_norm')}({', '.join(args)})"
        if node.op is Op.CONVOLUTION:
            call = self.convolution(node, attrs)
            if call is not None:
                return call
        if node.op is Op.ADDMM:
            call = self.gemm_activation(node, attrs)
            if call is not None:
                return call
        return super().special(index, node, ins, attrs, live)

    def float_max_pool(self, node: Node, x: Value, attrs) -> str | None:
        """Max pooling of a float activation through the Triton kernel (``triton_pool``)
        where the tuner chose it over ATen's (measured at opt_level=3, cached on disk);
        unmeasured, ATen's. ATen's ran bf16 ResNet-50's stem pool at 21% of an H100's
        bandwidth (0.86 ms at batch 256); the Triton kernel's int8 form pools the same
        shape's int8 values in 0.19 ms."""
        if self.tuner is None:
            return None
        shape, dtype, args = x.spec.concrete(self.env), x.spec.dtype, _pool_args(attrs)
        samples: list = []

        def sample():  # made only if the tuner measures
            if not samples:
                samples.append(torch.randn(shape, device=self.device).to(dtype)
                               .contiguous(memory_format=torch.channels_last))
            return samples[0]

        candidates = {"aten": lambda: torch.max_pool2d(sample(), *args),
                      "triton": lambda: max_pool2d(sample(), *args)}
        if self.tuner.choose(f"max_pool2d x{tuple(shape)} {dtype} {args}", candidates,
                             "aten") != "triton":
            return None
        return self.triton_max_pool(node, x, args)

    def triton_max_pool(self, node: Node, x: Value, args: tuple, hint: str = "max_pool") -> str:
        """The call of ``triton_pool.max_pool2d`` (channels-last result) on ``x``."""
        self.cl.add(id(node.outputs[0]))
        return (f"{self.const(max_pool2d, hint)}({self.name(x)}, "
                f"{', '.join(repr(a) for a in args)})")

    def int8_conv_residual(self, conv: Node, z: Value, host: Node) -> str:
        """The quantized convolution with the residual add and ReLU in its epilogue. Its
        result (a ResNet block's output) is written as its readers want it: quantized
        when a full-range quantize node reads it (the next block's input; that node then
        costs no pass of its own); in float only for other readers, and as float16 when
        those are the next block's residual adds alone and the quantize's calibrated
        range sits 64x inside float16's (the residual stream's traffic halved)."""
        out, g = host.outputs[0], self.graph
        quant, others = None, []
        for user in self.users.get(id(out), []):
            params = self.qdq.output_quantize(user) if quant is None else None
            if params is not None:
                quant = (user, params)
            else:
                others.append(user)

        def residual_add(n: Node) -> bool:  # a later block end's int8 kernel reading it as z
            hosted = self.conv_add_relu.get(id(n))
            return hosted is not None and hosted[0].op is Op.CONV2D_INT8 and hosted[1] is out

        float_dtype = out.spec.dtype
        if quant is not None and out not in g.outputs:
            scale, zp, dtype = quant[1]
            full = torch.iinfo(dtype)
            if not others:
                float_dtype = None
            elif all(map(residual_add, others)) and \
                    scale * max(zp - full.min, full.max - zp) * 64 < torch.finfo(torch.float16).max:
                float_dtype = torch.float16
        call = (f"{self.int8_call(conv)}, 'relu', {self.name(z)}, "
                f"{'None' if float_dtype is None else self.name(float_dtype)}")
        if quant is None:
            return f"{call})[0]"
        (user, (scale, zp, dtype)) = quant
        y, q = self.names[id(out)], self.names[id(user.outputs[0])]
        self.lines.append(f"    {y}, {q} = {call}, ({scale!r}, {zp}, {self.name(dtype)}))")
        self.fused_into[id(user)] = q
        return y

    def add_relu_call(self, conv: Node, z: Value) -> str:
        a = conv.attrs
        return (f"torch.cudnn_convolution_add_relu({self.as_cl(conv.inputs[0])}, "
                f"{self.weight(conv)}, {self.as_cl(z)}, 1.0, {self.bias(conv)}, "
                f"{a['stride']}, {a['padding']}, {a['dilation']}, {a['groups']})")
