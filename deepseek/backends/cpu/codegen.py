"""Generate straight-line Python over PyTorch/oneDNN kernels for one concrete shape.

The generated function has one statement per node, with every shape and
attribute already evaluated: no graph walking, no dict lookups, no dispatch
through the op registry at run time. Element-wise ops write into a dying
input's buffer where that input's storage has no other live reader, and
each intermediate is released right after its last use.

Example of generated code (MNIST CNN after conv-BN folding)::

    def plan(inputs):
        x, = inputs
        convolution = k_convolution(x, c0, c1, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        relu = torch.relu_(convolution)
        ...
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import re
import time

import torch

from deepseek.ir.fused import parse_program, run_steps
from deepseek.ir.graph import Graph, Node, Value
from deepseek.ir.ops import Op, Prop, op_from_name, opdef
from deepseek.ir.serialize import decode_attr
from deepseek.ir.types import bind
from deepseek.timing import time_interleaved

# unary element-wise ops with an in-place PyTorch form: op -> callable name
_INPLACE_UNARY = {
    Op.RELU: "torch.relu_", Op.SIGMOID: "torch.sigmoid_", Op.TANH: "torch.tanh_",
    Op.EXP: "torch.exp_", Op.NEG: "torch.neg_", Op.SILU: "torch._C._nn.silu_",
}
# unary ops oneDNN fuses into a convolution as a post-op: op -> (attr, scalars, algorithm)
_CONV_POST_OPS = {
    Op.RELU: ("relu", [], ""), Op.SIGMOID: ("sigmoid", [], ""), Op.TANH: ("tanh", [], ""),
    Op.SILU: ("swish", [], ""), Op.HARDSWISH: ("hardswish", [], ""),
}
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")

# binary element-wise ops with an in-place method; True where commutative
_INPLACE_BINARY = {
    Op.ADD_TENSOR: ("add_", True), Op.MUL_TENSOR: ("mul_", True),
    Op.SUB_TENSOR: ("sub_", False), Op.DIV_TENSOR: ("div_", False),
}

# scatter-like ops updating input 0 (node.reuse == 0): their in-place ATen overloads
_UPDATE_INPLACE = {Op.INDEX_PUT: torch.ops.aten.index_put_.default,
                   Op.INDEX_COPY: torch.ops.aten.index_copy_.default}

_POST_FNS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
             "swish": torch.nn.functional.silu, "hardswish": torch.nn.functional.hardswish,
             "none": lambda t: t}


def _onednn_is_faster(onednn: Callable[[], object], aten: Callable[[], object]) -> bool:
    """Whether the oneDNN candidate beats ATen's kernel, measured for this exact shape.

    Small or odd shapes (a convolution with one input channel, a GEMM with one
    row) run faster through ATen; big ones through oneDNN. Decided once per plan.
    """
    onednn()
    t0 = time.perf_counter()
    onednn()
    first = time.perf_counter() - t0
    if first > 0.02:  # big: oneDNN wins there, and timing would cost seconds
        return True
    # about 50 ms of timing per decision: many rounds for small kernels, whose
    # medians are otherwise at the mercy of noise, few for larger ones
    iters = max(3, min(31, int(0.025 / max(first, 1e-6))))
    times = time_interleaved({"onednn": onednn, "aten": aten}, iters=iters, warmup=2)
    return times["onednn"] <= times["aten"]


def _kernel_hint(kind: str) -> str:
    """A Python identifier prefix for an op's kernel ("quantized_decomposed::x.y" too)."""
    return "k_" + re.sub(r"\W", "_", kind.split(".")[0]).lstrip("_") + "_"


def _source(x) -> str:
    """Source text of a call argument (a name, or a list of names from a Tensor[] slot)."""
    return "[" + ", ".join(map(_source, x)) + "]" if isinstance(x, list) else x


class _Emitter:
    def __init__(self, graph: Graph, env: Mapping[str, int], device: str,
                 constants: Mapping[str, torch.Tensor] | None = None):
        self.graph = graph
        self.env = env
        self.device = device
        self.constants = graph.constants if constants is None else constants
        self.names: dict[int, str] = {}
        self.globals: dict[str, Any] = {"torch": torch, "CL": torch.channels_last}
        self.lines: list[str] = []
        self.uses = {id(v): 0 for n in graph.nodes for v in n.input_values()}
        for n in graph.nodes:
            for v in n.input_values():
                self.uses[id(v)] += 1
        self.users: dict[int, list[Node]] = {}
        for n in graph.nodes:
            for v in n.input_values():
                self.users.setdefault(id(v), []).append(n)
        self.fused_into: dict[int, str] = {}  # post-op node id -> name of the fused result

    def name(self, x) -> str:
        if isinstance(x, Value):
            return self.names[id(x)]
        if isinstance(x, (list, tuple)):
            return "[" + ", ".join(self.name(v) for v in x) + "]"
        if isinstance(x, torch.dtype):
            return self.const(x, "dt")
        if isinstance(x, torch.memory_format):
            return self.const(x, "mf")
        if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
            return f"float({str(x)!r})"
        return repr(x)

    def const(self, obj, hint: str) -> str:
        name = f"{hint}{len(self.globals)}"
        self.globals[name] = obj
        return name

    def emit(self, index: int, node: Node) -> None:
        outs = node.outputs
        attrs = {k: bind(a, self.env) for k, a in node.attrs.items()}
        ins = node.inputs
        lhs = ", ".join(self.names[id(o)] for o in outs) + ("," if len(outs) == 1 and
                                                            node.opdef.n_outputs == -1 else "")
        live = [o for o in outs if self.uses.get(id(o)) or o in self.graph.outputs]
        if id(node) in self.fused_into:  # already computed by its producer's fused kernel
            self.lines.append(f"    {lhs} = {self.fused_into[id(node)]}")
            return
        expr = self.special(index, node, ins, attrs, live)
        if expr is None:
            args, kwargs = node.opdef.call_args([self.name(x) for x in ins],
                                                {k: self.name(a) for k, a in attrs.items()})
            if node.opdef.has(Prop.CREATION):
                kwargs["device"] = repr(self.device)
            fn = self.const(node.opdef.overload._op, _kernel_hint(node.kind))
            args = [_source(a) for a in args] + [f"{k}={_source(v)}" for k, v in kwargs.items()]
            expr = f"{fn}({', '.join(args)})"
        self.lines.append(f"    {lhs} = {expr}")

    def special(self, index, node, ins, attrs, live) -> str | None:
        """A faster call for common ops, or None for the generic ATen call."""
        op, out = node.op, node.outputs[0]
        n = self.name
        k = node.reuse  # set by schedule_inplace_ops: input k's buffer dies here
        if k == 0 and op in _INPLACE_UNARY:
            return f"{_INPLACE_UNARY[op]}({n(ins[0])})"
        if k is not None and op in _INPLACE_BINARY and attrs.get("alpha", 1) == 1:
            method, commutative = _INPLACE_BINARY[op]
            if k == 0 or commutative:
                return f"{n(ins[k])}.{method}({n(ins[1 - k])})"
        if k == 0 and op is Op.INDEX_PUT and self.device != "cpu":
            fused = self.kv_write(index, node, ins)
            if fused is not None:
                return fused
        if k == 0 and op in _UPDATE_INPLACE:  # e.g. a KV cache updated where it lies
            args, kwargs = node.opdef.call_args([n(x) for x in ins],
                                                {key: n(a) for key, a in attrs.items()})
            fn = self.const(_UPDATE_INPLACE[op], _kernel_hint(node.kind) + "inplace")
            args = [_source(a) for a in args] + [f"{key}={_source(v)}" for key, v in kwargs.items()]
            return f"{fn}({', '.join(args)})"
        if op is Op.ADD_LAYER_NORM:
            return self.add_layer_norm(node, ins, attrs)
        if op is Op.FUSED_POINTWISE:
            if self.device != "cpu":
                kernel = self.triton_kernel(node, ins)
                if kernel is not None:
                    return kernel
            return self.fused_chain(node, ins)
        if op is Op.NATIVE_GROUP_NORM and self.device != "cpu":  # CUDA's kernel wants NCHW
            d = node.opdef
            args, kwargs = d.call_args([f"{n(ins[0])}.contiguous()"] + [n(v) for v in ins[1:]],
                                       {k: n(a) for k, a in attrs.items()})
            return f"{self.const(d.overload._op, 'k_group_norm')}({', '.join(args)})"
        if op is Op.CONVOLUTION and self.device != "cpu" and len(attrs["stride"]) == 2 \
                and self.graph.is_constant(ins[1]):
            # cuDNN's tensor-core convolutions want channels-last activations and weights
            w = self.const(self.constants[ins[1].name].contiguous(memory_format=torch.channels_last),
                           "wcl")
            args = ", ".join(n(v) for v in (attrs["stride"], attrs["padding"], attrs["dilation"],
                                            attrs["transposed"], attrs["output_padding"],
                                            attrs["groups"]))
            return (f"torch.convolution({n(ins[0])}.contiguous(memory_format=CL), {w}, "
                    f"{n(ins[2]) if ins[2] is not None else None}, {args})")
        if op in (Op.ADDMM, Op.MM, Op.MATMUL) and _ONEDNN and self.device == "cpu":
            fused = self.onednn_linear(node, ins, attrs)
            if fused is not None:
                return fused
        if op is Op.CONVOLUTION and _ONEDNN and self.device == "cpu":
            fused = self.onednn_conv(node, ins, attrs)
            if fused is not None:
                return fused
        if op in (Op.VIEW, Op.UNSAFE_VIEW):  # reshape: inputs may be channels-last
            return f"{n(ins[0])}.reshape({n(attrs['size'])})"
        if op is Op.PERMUTE:
            return f"{n(ins[0])}.permute({n(attrs['dims'])})"
        only_first = live == [out]
        if op is Op.MAX_POOL2D and self.device == "cpu":
            a = attrs
            # pooling is 3x faster on channels-last activations (vectorized over channels)
            return (f"torch.max_pool2d({n(ins[0])}.contiguous(memory_format=CL), {a['kernel_size']}, "
                    f"{a.get('stride', [])}, {a.get('padding', 0)}, {a.get('dilation', 1)}, "
                    f"{a.get('ceil_mode', False)})")
        if op is Op.NATIVE_LAYER_NORM and only_first:
            return (f"torch.layer_norm({n(ins[0])}, {attrs['normalized_shape']}, {n(ins[1])}, "
                    f"{n(ins[2])}, {attrs['eps']!r}), None, None")
        if op is Op.NATIVE_BATCH_NORM_LEGIT_NO_TRAINING and only_first:
            x, w, b, m, v = (n(i) for i in ins)
            return f"torch.batch_norm({x}, {w}, {b}, {m}, {v}, False, 0.0, {attrs['eps']!r}, False), None, None"
        if op is Op.SOFTMAX and not attrs["half_to_float"]:
            return f"torch.softmax({n(ins[0])}, {attrs['dim']})"
        return None

    def kv_write(self, index: int, node: Node, ins) -> str | None:
        """This in-place cache write and a later one at the same positions (a layer's keys
        and values) as one Triton kernel; the partner's statement then names its cache."""
        from deepseek.backends.cuda.triton_kv import KVWrite

        def parts(n):  # (cache, positions, new rows) of a plain write along dim 2
            idx = n.inputs[1]
            if n.attrs.get("accumulate") or not (isinstance(idx, list) and len(idx) == 3
                                                   and idx[0] is None and idx[1] is None
                                                   and isinstance(idx[2], Value)):
                return None
            return n.inputs[0], idx[2], n.inputs[2]

        mine = parts(node)
        if mine is None:
            return None
        cache, idx, new = mine
        made = {id(o): i for i, n in enumerate(self.graph.nodes) for o in n.outputs}
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

    def add_layer_norm(self, node: Node, ins, attrs) -> str:
        """Residual add + layer norm: one Triton kernel on GPUs, PyTorch's two on the CPU."""
        x, r, w, b = (self.name(v) if v is not None else "None" for v in ins)
        shape = list(attrs["normalized_shape"])
        n = 1
        for d in shape:
            n *= d
        if self.device != "cpu":
            from deepseek.backends.cuda.triton_norm import AddLayerNorm

            dtypes = [v.spec.dtype for v in ins if v is not None]
            if AddLayerNorm.supported(n, dtypes):
                kernel = self.const(AddLayerNorm(n, attrs["eps"]), "triton_add_ln")
                return f"{kernel}({x}, {r}, {w}, {b})"
        s = self.names[id(node.outputs[0])]
        return (f"({s} := torch.add({x}, {r})), "
                f"torch.layer_norm({s}, {shape}, {w}, {b}, {attrs['eps']!r})")

    def triton_kernel(self, node: Node, ins) -> str | None:
        """A fused element-wise node as one generated Triton kernel (GPU backends)."""
        from deepseek.backends.cuda.triton_pointwise import PointwiseKernel

        meta = [torch.empty(v.spec.concrete(self.env), dtype=v.spec.dtype, device="meta")
                if isinstance(v, Value) else v for v in ins]
        out = node.outputs[0].spec
        program = node.attrs["program"]
        if not PointwiseKernel.supported(program, meta, out.dtype):
            return None
        kernel = PointwiseKernel(program, meta, out.concrete(self.env), out.dtype)
        return f"{self.const(kernel, 'triton')}({', '.join(self.name(v) for v in ins)})"

    def fused_chain(self, node: Node, ins) -> str:
        """A fused element-wise kernel as a chain of PyTorch ops, each step after the
        first writing into a buffer that dies there (one allocation per kernel)."""
        steps = parse_program(node.attrs["program"])
        meta = [torch.empty(v.spec.concrete(self.env), dtype=v.spec.dtype, device="meta")
                if isinstance(v, Value) else v for v in ins]
        dtypes = [r.dtype for r in run_steps(meta, node.attrs["program"])]
        base = self.names[id(node.outputs[0])]
        last = {}
        for j, (_, args, _) in enumerate(steps):
            for a in args:
                if isinstance(a, str) and a[:1] in "#$":
                    last[a] = j
        reusable = {f"${node.reuse}"} if node.reuse is not None else set()
        for j, (opname, args, attrs) in enumerate(steps):
            src = [self.name(ins[int(a[1:])]) if isinstance(a, str) and a[:1] == "$"
                   else f"{base}_{a[1:]}" if isinstance(a, str) and a[:1] == "#"
                   else self.name(a) for a in args]
            dying = [k for k, a in enumerate(args) if isinstance(a, str) and last.get(a) == j
                     and (a[:1] == "#" and dtypes[int(a[1:])] == dtypes[j] or a in reusable)]
            op = op_from_name(opname)
            expr = None
            if op in _INPLACE_UNARY and 0 in dying:
                expr = f"{_INPLACE_UNARY[op]}({src[0]})"
            elif op in _INPLACE_BINARY and attrs.get("alpha", 1) == 1 and len(src) == 2:
                method, commutative = _INPLACE_BINARY[op]
                k = 0 if 0 in dying else 1 if commutative and 1 in dying else None
                if k is not None:
                    expr = f"{src[k]}.{method}({src[1 - k]})"
            if expr is None:
                d = opdef(op)
                call_args, kwargs = d.call_args(src, {k: self.name(decode_attr(v))
                                                      for k, v in attrs.items()})
                fn = self.const(d.overload._op, _kernel_hint(opname))
                expr = f"{fn}({', '.join(list(call_args) + [f'{k}={v}' for k, v in kwargs.items()])})"
            target = base if j == len(steps) - 1 else f"{base}_{j}"
            if j < len(steps) - 1:
                self.lines.append(f"    {target} = {expr}")
        return expr

    def onednn_conv(self, node: Node, ins, attrs) -> str | None:
        """A 2-D float32 convolution as oneDNN with a pre-packed weight, channels-last
        activations and the following unary op (ReLU, SiLU...) fused as a post-op."""
        x, w, b = ins
        g = self.graph
        if (attrs["transposed"] or len(attrs["stride"]) != 2 or not g.is_constant(w)
                or (b is not None and not g.is_constant(b)) or x.spec.dtype != torch.float32
                or w.spec.dtype != torch.float32):
            return None
        shape = list(x.spec.concrete(self.env))
        try:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                g.constants[w.name].to_mkldnn(), attrs["padding"], attrs["stride"],
                attrs["dilation"], attrs["groups"], shape)
        except RuntimeError:
            return None
        post, scalars, algo = "none", [], ""
        out = node.outputs[0]
        users = self.users.get(id(out), [])
        fuse = len(users) == 1 and users[0].op in _CONV_POST_OPS and out not in g.outputs
        if fuse:
            post, scalars, algo = _CONV_POST_OPS[users[0].op]
        bias = g.constants[b.name] if b is not None else None
        xr = torch.randn(shape)
        xcl, a = xr.contiguous(memory_format=torch.channels_last), attrs
        if not _onednn_is_faster(
                lambda: torch.ops.mkldnn._convolution_pointwise(
                    xcl, packed, bias, a["padding"], a["stride"], a["dilation"], a["groups"], post,
                    scalars, algo),
                lambda: _POST_FNS[post](torch.convolution(
                    xr, g.constants[w.name], bias, a["stride"], a["padding"], a["dilation"], False,
                    a["output_padding"], a["groups"]))):
            return None
        if fuse:
            self.fused_into[id(users[0])] = self.names[id(out)]
        xs = self.name(x)
        return (f"torch.ops.mkldnn._convolution_pointwise({xs}.contiguous(memory_format=CL), "
                f"{self.const(packed, 'packed')}, {self.name(b) if b is not None else None}, "
                f"{attrs['padding']}, {attrs['stride']}, {attrs['dilation']}, {attrs['groups']}, "
                f"{post!r}, {scalars}, {algo!r})")

    def onednn_linear(self, node: Node, ins, attrs) -> str | None:
        """A float32 GEMM with a constant weight as oneDNN's linear on a weight in its own
        blocked layout (2-3x MKL's sgemm on AMD CPUs), chosen by measurement."""
        g = self.graph
        if node.op is Op.ADDMM:
            b, x, w = ins
            if attrs.get("beta", 1) != 1 or attrs.get("alpha", 1) != 1:
                return None
        else:
            (x, w), b = ins, None
        if not (isinstance(x, Value) and g.is_constant(w) and x.spec.dtype == torch.float32
                and w.spec.dtype == torch.float32 and x.spec.rank >= 2 and w.spec.rank == 2
                and (x.spec.rank == 2 or node.op is Op.MATMUL)):
            return None
        if b is not None and not (g.is_constant(b) and b.spec.shape == (w.spec.shape[1],)
                                  and b.spec.dtype == torch.float32):
            return None
        wt = self.constants[w.name]  # (K, N)
        weight = wt.t().contiguous().to_mkldnn()  # (N, K), oneDNN's layout
        bias = self.constants[b.name] if b is not None else None
        shape = x.spec.concrete(self.env)  # (..., K): leading dims fold into the GEMM's rows
        xr = torch.randn(-(-x.spec.nbytes(self.env) // 4 // shape[-1]), shape[-1])
        if not _onednn_is_faster(
                lambda: torch.ops.mkldnn._linear_pointwise(xr, weight, bias, "none", [], ""),
                lambda: torch.addmm(bias, xr, wt) if bias is not None else torch.mm(xr, wt)):
            return None
        rows = self.name(x) + (f".reshape(-1, {shape[-1]})" if len(shape) > 2 else "")
        call = (f"torch.ops.mkldnn._linear_pointwise({rows}, {self.const(weight, 'wdnn')}, "
                f"{self.name(b) if b is not None else None}, 'none', [], '')")
        out = list(node.outputs[0].spec.concrete(self.env))
        return call if len(shape) == 2 else f"{call}.view({out})"

    def generate(self) -> Callable:
        g = self.graph
        for v in g.inputs:
            self.names[id(v)] = f"i_{v.name}"
        for name, v in g.const_values.items():
            self.names[id(v)] = self.const(self.constants[name], "c")
        for n in g.nodes:
            for o in n.outputs:
                self.names[id(o)] = f"v_{o.name}"
        self.lines = ["def plan(inputs):"]
        if g.inputs:
            self.lines.append(f"    {', '.join(self.names[id(v)] for v in g.inputs)}, = inputs")
        last = g.last_use()
        dying: dict[int, list[str]] = {}
        for v, i in last.items():
            if i < len(g.nodes) and v not in g.inputs and not g.is_constant(v):
                dying.setdefault(i, []).append(self.names[id(v)])
        starts = []  # index in self.lines of each node's statement, then of the return
        for i, node in enumerate(g.nodes):
            starts.append(len(self.lines))
            self.emit(i, node)
            for o in node.outputs:  # outputs nobody reads die at once
                if id(o) not in self.uses and o not in g.outputs:
                    dying.setdefault(i, []).append(self.names[id(o)])
            if dying.get(i):
                self.lines.append(f"    del {', '.join(dying[i])}")
        starts.append(len(self.lines))
        # outputs leave in PyTorch's default layout, whatever layout was used inside
        self.lines.append(f"    return [{', '.join(self.names[id(v)] + '.contiguous()' for v in g.outputs)}]")
        fused = frozenset(i for i, n in enumerate(g.nodes) if id(n) in self.fused_into)
        return _build(self.lines, self.globals, starts, fused, None)


def _build(lines: list[str], globals_: dict, starts: list[int], fused: frozenset,
           hook: Callable[[int], object] | None) -> Callable:
    """Exec the plan's source; with ``hook``, a ``_hook(i)`` line goes before node i's
    statement (its ``del`` line stays with it) and ``_hook(len(nodes))`` before the return."""
    if hook is not None:
        lines = list(lines)
        for i in reversed(range(len(starts))):
            lines.insert(starts[i], f"    _hook({i})")
    source = "\n".join(lines) + "\n"
    namespace = dict(globals_)
    if hook is not None:
        namespace["_hook"] = hook
    name = "<deepseek-cpu-plan>" if hook is None else "<deepseek-cpu-plan-instrumented>"
    exec(compile(source, name, "exec"), namespace)  # our own generated code
    fn = namespace["plan"]
    fn.source = source
    fn.fused_nodes = fused  # indices of nodes computed by their producer's kernel (post-ops)
    if hook is None:  # the twin shares this plan's kernels, packed weights and choices
        fn.instrumented = lambda h: _build(lines, globals_, starts, fused, h)
    return fn


def generate_plan(graph: Graph, env: Mapping[str, int], device: str = "cpu",
                  instrument: Callable[[int], object] | None = None,
                  constants: Mapping[str, torch.Tensor] | None = None) -> Callable:
    """Compile ``graph`` for the symbol bindings ``env`` into ``plan(inputs) -> outputs``.

    With ``instrument``, the plan calls ``instrument(i)`` just before node i and
    ``instrument(len(graph.nodes))`` after the last (the profiler's clock); without
    it the code is exactly the plain plan. ``plan.instrumented(hook)`` makes such a
    twin of a plan that already exists, with the same kernels and packed weights.
    ``constants`` replaces the graph's weights (e.g. copies on the backend's device).
    """
    plan = _Emitter(graph, env, device, constants).generate()
    return plan if instrument is None else plan.instrumented(instrument)
