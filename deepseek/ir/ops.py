"""The op registry: every op the IR knows, each defined once.

An op's registration is one row of ``_TABLE``: the ATen overload it mirrors
(its schema and its PyTorch reference implementation) and its properties.
The reference implementation is the oracle of every test, the fallback kernel
of every backend, and the shape rule (run on meta tensors).

A node's ``inputs`` are the schema's tensor arguments in order (a ``Tensor[]``
argument contributes a variable number of them; a Python scalar may stand in a
``Tensor`` slot, as ATen allows); its ``attrs`` are the other arguments by name.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from deepseek.errors import IRError

log = logging.getLogger(__name__)
aten = torch.ops.aten


class Prop(enum.Flag):
    NONE = 0
    ELEMENTWISE = enum.auto()  # output[i] depends on input[i] only (after broadcasting)
    UNARY = enum.auto()
    BINARY = enum.auto()
    REDUCTION = enum.auto()
    VIEW = enum.auto()  # output may alias its first input's storage
    CREATION = enum.auto()  # no tensor inputs; takes a device
    RANDOM = enum.auto()  # not deterministic: never fold or deduplicate
    MATMUL = enum.auto()  # GEMM / convolution class: compute-bound
    QUANT = enum.auto()  # quantize / dequantize
    FUSED = enum.auto()  # a fused kernel of several ops (deepseek::fused_*)


EW1 = Prop.ELEMENTWISE | Prop.UNARY
EW2 = Prop.ELEMENTWISE | Prop.BINARY
RED = Prop.REDUCTION
VIEW = Prop.VIEW
NEW = Prop.CREATION
MM = Prop.MATMUL

# (ATen overload name, properties). The Op member is the name with '.' -> '_',
# upper-cased, and "_default" dropped: "add.Tensor" -> Op.ADD_TENSOR,
# "relu.default" -> Op.RELU.
_TABLE: list[tuple[str, Prop]] = [
    # element-wise, unary
    *[(f"{n}.default", EW1) for n in (
        "abs", "neg", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt",
        "sin", "cos", "tan", "tanh", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh",
        "atanh", "sigmoid", "relu", "gelu", "silu", "mish", "erf", "erfinv", "floor", "ceil",
        "round", "trunc", "sign", "sgn", "reciprocal", "logical_not", "bitwise_not", "isnan",
        "isinf", "hardtanh", "hardsigmoid", "hardswish", "leaky_relu", "elu", "softplus",
        "clamp", "frac", "lift_fresh_copy", "clone", "_to_copy", "nan_to_num",
        "sigmoid_backward", "threshold_backward", "positive",
    )],
    ("clamp.Tensor", EW1), ("pow.Tensor_Scalar", EW1), ("round.decimals", EW1),
    ("prelu.default", Prop.ELEMENTWISE), ("gelu_backward.default", Prop.ELEMENTWISE),
    # element-wise, binary (Tensor and Scalar overloads)
    *[(f"{n}.{o}", EW2) for n in (
        "add", "sub", "mul", "div", "eq", "ne", "lt", "le", "gt", "ge", "fmod", "remainder",
        "bitwise_and", "bitwise_or", "bitwise_xor",
    ) for o in ("Tensor", "Scalar")],
    *[(f"{n}.default", EW2) for n in (
        "maximum", "minimum", "atan2", "logical_and", "logical_or", "logical_xor",
        "floor_divide", "hypot", "fmax", "fmin",
    )],
    ("copysign.Tensor", EW2), ("copysign.Scalar", EW2), ("xlogy.Tensor", EW2),
    ("rsub.Tensor", EW2), ("rsub.Scalar", EW2), ("div.Tensor_mode", EW2), ("div.Scalar_mode", EW2),
    ("pow.Tensor_Tensor", EW2), ("pow.Scalar", EW2),
    ("bitwise_left_shift.Tensor", EW2), ("bitwise_right_shift.Tensor", EW2),
    ("where.self", Prop.ELEMENTWISE), ("lerp.Scalar", Prop.ELEMENTWISE),
    ("lerp.Tensor", Prop.ELEMENTWISE), ("addcmul.default", Prop.ELEMENTWISE),
    ("addcdiv.default", Prop.ELEMENTWISE), ("masked_fill.Scalar", Prop.ELEMENTWISE),
    ("masked_fill.Tensor", Prop.ELEMENTWISE),
    # reductions and scans
    ("sum.dim_IntList", RED), ("sum.default", RED), ("mean.dim", RED), ("mean.default", RED),
    ("amax.default", RED), ("amin.default", RED), ("max.dim", RED), ("min.dim", RED),
    ("max.default", RED), ("min.default", RED), ("argmax.default", RED), ("argmin.default", RED),
    ("prod.dim_int", RED), ("prod.default", RED), ("var.correction", RED),
    ("var_mean.correction", RED), ("std.correction", RED), ("any.dim", RED), ("any.dims", RED),
    ("any.default", RED), ("all.dim", RED), ("all.default", RED), ("logsumexp.default", RED),
    ("norm.ScalarOpt_dim", RED), ("linalg_vector_norm.default", RED),
    ("cumsum.default", Prop.NONE), ("cumprod.default", Prop.NONE),
    ("_softmax.default", RED), ("_log_softmax.default", RED),
    ("topk.default", Prop.NONE), ("sort.default", Prop.NONE), ("sort.stable", Prop.NONE),
    # normalization
    ("native_layer_norm.default", RED), ("native_group_norm.default", RED),
    ("_native_batch_norm_legit_no_training.default", RED),
    ("_native_batch_norm_legit.default", RED), ("_native_batch_norm_legit.no_stats", RED),
    ("native_batch_norm.default", RED), ("rms_norm.default", RED),
    # GEMM, convolution, attention
    ("mm.default", MM), ("bmm.default", MM), ("addmm.default", MM), ("baddbmm.default", MM),
    ("matmul.default", MM), ("linear.default", MM), ("dot.default", MM), ("mv.default", MM),
    ("convolution.default", MM), ("scaled_dot_product_attention.default", MM),
    ("_scaled_dot_product_flash_attention_for_cpu.default", MM),
    # gradients of the above, in training graphs (an output whose mask entry is False is None)
    ("convolution_backward.default", MM),
    # pooling, resampling, padding
    ("max_pool2d_with_indices.default", Prop.NONE), ("max_pool2d.default", Prop.NONE), ("max_pool3d_with_indices.default", Prop.NONE),
    ("avg_pool1d.default", Prop.NONE), ("avg_pool2d.default", Prop.NONE),
    ("avg_pool3d.default", Prop.NONE), ("_adaptive_avg_pool2d.default", Prop.NONE),
    ("_adaptive_avg_pool3d.default", Prop.NONE), ("adaptive_max_pool2d.default", Prop.NONE),
    ("max_pool2d_with_indices_backward.default", Prop.NONE),
    ("avg_pool2d_backward.default", Prop.NONE), ("_adaptive_avg_pool2d_backward.default", Prop.NONE),
    ("upsample_nearest1d.vec", Prop.NONE), ("upsample_nearest2d.vec", Prop.NONE),
    ("upsample_nearest3d.vec", Prop.NONE), ("_upsample_nearest_exact2d.vec", Prop.NONE),
    ("upsample_bilinear2d.vec", Prop.NONE), ("upsample_linear1d.vec", Prop.NONE),
    ("upsample_bicubic2d.vec", Prop.NONE), ("_upsample_bilinear2d_aa.vec", Prop.NONE),
    ("constant_pad_nd.default", Prop.NONE), ("reflection_pad1d.default", Prop.NONE),
    ("reflection_pad2d.default", Prop.NONE), ("replication_pad1d.default", Prop.NONE),
    ("replication_pad2d.default", Prop.NONE), ("grid_sampler_2d.default", Prop.NONE),
    ("pixel_shuffle.default", Prop.NONE), ("im2col.default", Prop.NONE),
    ("col2im.default", Prop.NONE),
    # views and layout
    ("view.default", VIEW), ("_unsafe_view.default", VIEW), ("reshape.default", VIEW),
    ("permute.default", VIEW), ("expand.default", VIEW), ("slice.Tensor", VIEW),
    ("select.int", VIEW), ("unsqueeze.default", VIEW), ("squeeze.dims", VIEW),
    ("squeeze.dim", VIEW), ("squeeze.default", VIEW), ("t.default", VIEW),
    ("transpose.int", VIEW), ("as_strided.default", VIEW), ("unfold.default", VIEW),
    ("diagonal.default", VIEW), ("split_with_sizes.default", VIEW), ("split.Tensor", VIEW),
    ("unbind.int", VIEW), ("detach.default", VIEW), ("view_as_real.default", VIEW),
    ("view_as_complex.default", VIEW), ("view.dtype", VIEW), ("alias.default", VIEW),
    ("contiguous.default", VIEW),
    # data movement
    ("cat.default", Prop.NONE), ("stack.default", Prop.NONE), ("gather.default", Prop.NONE),
    ("index.Tensor", Prop.NONE), ("_unsafe_index.Tensor", Prop.NONE),
    ("index_select.default", Prop.NONE), ("embedding.default", Prop.NONE),
    ("scatter.src", Prop.NONE), ("scatter.value", Prop.NONE), ("scatter_add.default", Prop.NONE),
    ("scatter_reduce.two", Prop.NONE), ("index_put.default", Prop.NONE),
    ("index_add.default", Prop.NONE), ("index_copy.default", Prop.NONE),
    ("slice_scatter.default", Prop.NONE), ("select_scatter.default", Prop.NONE),
    ("flip.default", Prop.NONE), ("roll.default", Prop.NONE), ("repeat.default", Prop.NONE),
    ("tril.default", Prop.NONE), ("triu.default", Prop.NONE), ("copy.default", Prop.NONE),
    ("masked_scatter.default", Prop.NONE), ("one_hot.default", Prop.NONE),
    ("searchsorted.Tensor", Prop.NONE), ("bucketize.Tensor", Prop.NONE),
    ("tile.default", Prop.NONE),
    # creation
    ("full.default", NEW), ("arange.start_step", NEW), ("arange.default", NEW),
    ("arange.start", NEW), ("empty.memory_format", NEW), ("zeros.default", NEW),
    ("ones.default", NEW), ("scalar_tensor.default", NEW), ("empty_strided.default", NEW),
    ("full_like.default", Prop.NONE), ("zeros_like.default", Prop.NONE),
    ("ones_like.default", Prop.NONE), ("empty_like.default", Prop.NONE),
    ("rand.default", NEW | Prop.RANDOM), ("randn.default", NEW | Prop.RANDOM),
    ("bernoulli.p", Prop.RANDOM), ("native_dropout.default", Prop.RANDOM),
    ("rand_like.default", Prop.RANDOM), ("randn_like.default", Prop.RANDOM),
    # fused kernels made by the optimizer (deepseek/ir/fused.py)
    ("deepseek::fused_pointwise.default", Prop.ELEMENTWISE | Prop.FUSED),
    ("deepseek::add_layer_norm.default", Prop.REDUCTION | Prop.FUSED),
    ("deepseek::fused_rms_norm.default", Prop.REDUCTION | Prop.FUSED),
    ("deepseek::fp8_linear.default", MM | Prop.FUSED),
    # quantize / dequantize (QDQ): what compression leaves and lowering turns into int8 kernels
    *[(f"quantized_decomposed::{n}", Prop.ELEMENTWISE | Prop.QUANT) for n in (
        "quantize_per_tensor.default", "dequantize_per_tensor.default",
        "quantize_per_tensor.tensor", "dequantize_per_tensor.tensor",
        "quantize_per_channel.default", "dequantize_per_channel.default",
    )],
    *[(f"quantized_decomposed::{n}", Prop.QUANT) for n in (
        "quantize_per_channel_group.default", "dequantize_per_channel_group.default",
        "quantize_per_token.default", "dequantize_per_token.default",
        "choose_qparams_per_token.default", "choose_qparams_per_token_asymmetric.default",
    )],
    # integer kernels that quantization lowering emits (deepseek/quantization/kernels.py)
    *[(f"deepseek_quant::{n}.default", MM) for n in (
        "linear_int8", "conv2d_int8", "linear_int8_dynamic", "linear_weight_only",
    )],
]


def _split(name: str) -> tuple[str, str, str]:
    """("aten" | namespace, packet, overload) of a table name."""
    namespace, _, rest = name.rpartition("::")
    base, _, ov = rest.partition(".")
    return namespace or "aten", base, ov


def _member_name(overload_name: str) -> str:
    _, base, ov = _split(overload_name)
    name = base if ov == "default" else f"{base}_{ov}"
    return name.lstrip("_").upper()


_MEMBERS = {_member_name(n): n for n, _ in _TABLE}
if len(_MEMBERS) != len(_TABLE):  # two overloads must never share a member name
    raise RuntimeError("op table rows with one member name: " + ", ".join(
        sorted({n for n, _ in _TABLE if _MEMBERS[_member_name(n)] != n})))
Op = enum.Enum("Op", _MEMBERS)
Op.__doc__ = "Every op of the IR; the value is the ATen overload it mirrors."

_TENSOR_KINDS = {"Tensor": "tensor", "Optional[Tensor]": "optional", "List[Tensor]": "list",
                 "List[Optional[Tensor]]": "optional_list"}
_DROPPED_ATTRS = {"layout", "pin_memory", "device", "non_blocking"}


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str  # "tensor" | "optional" | "list" | "optional_list" | "attr"
    kwarg_only: bool
    default: Any = None
    has_default: bool = False


@dataclass
class OpDef:
    """An op's schema, reference implementation and properties."""

    op: "Op"
    overload: Any  # the torch OpOverload
    args: tuple[Arg, ...]
    props: Prop
    n_outputs: int  # -1: variable (Tensor[] return)
    tensor_args: tuple[Arg, ...] = field(init=False)
    attr_args: tuple[Arg, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.tensor_args = tuple(a for a in self.args if a.kind != "attr")
        self.attr_args = tuple(a for a in self.args if a.kind == "attr")

    @property
    def name(self) -> str:
        return self.op.value

    def has(self, prop: Prop) -> bool:
        return bool(self.props & prop)

    def call_args(self, inputs: list, attrs: dict) -> tuple[list, dict]:
        """Regroup flat ``inputs`` and ``attrs`` into the ATen call's (args, kwargs)."""
        n_fixed = sum(1 for a in self.tensor_args if a.kind in ("tensor", "optional"))
        n_list = len(inputs) - n_fixed
        it = iter(inputs)
        args, kwargs = [], {}
        skipped = False  # after a skipped defaulted argument, later ones go by keyword
        for a in self.args:
            if a.kind in ("list", "optional_list"):
                value = [next(it) for _ in range(n_list)]
            elif a.kind != "attr":
                value = next(it)
            elif a.name in attrs:
                value = attrs[a.name]
            elif a.name in _DROPPED_ATTRS or a.has_default:
                skipped = True
                continue
            else:
                raise IRError(f"{self.name}: missing attribute {a.name!r}")
            if a.kwarg_only or skipped:
                kwargs[a.name] = value
            else:
                args.append(value)
        return args, kwargs

    def reference(self, inputs: list, attrs: dict, device: torch.device | str | None = None):
        """Run the PyTorch reference implementation; returns a tensor or a tuple/list."""
        args, kwargs = self.call_args(inputs, attrs)
        if self.has(Prop.CREATION) and device is not None:
            kwargs["device"] = device
        return self.overload(*args, **kwargs)


def _arg_kind(arg) -> str:
    return _TENSOR_KINDS.get(str(arg.type), "attr")


def _n_outputs(schema) -> int:
    rets = schema.returns
    if len(rets) == 1 and str(rets[0].type) == "List[Tensor]":
        return -1
    return len(rets)


def _build_registry() -> dict:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines quantized_decomposed ops)

    import deepseek.ir.fused  # noqa: F401  (defines deepseek::fused_pointwise)
    import deepseek.quantization.kernels  # noqa: F401  (defines deepseek_quant::* int8 kernels)

    registry = {}
    for op in Op:
        namespace, base, ov = _split(op.value)
        packet = getattr(getattr(torch.ops, namespace), base, None)
        overload = getattr(packet, ov, None) if packet is not None else None
        if overload is None:
            log.debug("op %s is not in this torch build; skipped", op.value)
            continue
        schema = overload._schema
        args = tuple(
            Arg(a.name, _arg_kind(a), a.kwarg_only, a.default_value if a.has_default_value() else None,
                a.has_default_value())
            for a in schema.arguments
        )
        props = dict(_TABLE)[op.value]
        registry[op] = OpDef(op, overload, args, props, _n_outputs(schema))
    return registry


OPS: dict = _build_registry()
_BY_OVERLOAD = {d.overload: d for d in OPS.values()}


def opdef(op: "Op") -> OpDef:
    try:
        return OPS[op]
    except KeyError:
        raise IRError(f"op {op} is not available in torch {torch.__version__}") from None


def lookup_overload(overload) -> OpDef | None:
    """The OpDef that mirrors a torch OpOverload, or None if the IR lacks it."""
    return _BY_OVERLOAD.get(overload)


def op_from_name(name: str) -> "Op":
    try:
        return Op(name)
    except ValueError:
        raise IRError(f"unknown op {name!r}: this Deepseek version has no such op") from None


def resolve_aten(name: str):
    """An ATen overload by name ("aten.foo.default"), for fallback nodes; never imports."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "aten":
        raise IRError(f"fallback target {name!r} is not an ATen overload name")
    packet = getattr(aten, parts[1], None)
    overload = getattr(packet, parts[2], None) if packet is not None else None
    if overload is None:
        raise IRError(f"fallback target {name!r} does not exist in torch {torch.__version__}")
    return overload


CallableKernel = Callable[..., Any]


def pool2d_attrs(kernel_size, stride=(), padding=0, dilation=1) -> tuple[list, list, list, list]:
    """A 2-D pooling op's attributes as PyTorch reads them, each a pair: an int stands for
    both dims, and an empty (or None) stride means the kernel size."""
    def pair(v, default):
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        v = v or [default]
        return v * 2 if len(v) == 1 else v
    k = pair(kernel_size, 1)
    stride = list(k) if stride is None or stride in ((), []) else pair(stride, 1)
    return k, stride, pair(padding, 0), pair(dilation, 1)
