"""oneDNN convolutions and GEMMs whose primitives are made once per plan (``onednn.c``).

PyTorch's oneDNN ops (``mkldnn._convolution_pointwise``, ``_linear_pointwise``) create
the primitive descriptor again on every call: 40-70 us each, measured on a Xeon with
AMX, against a 5 us bf16 1x1 convolution; ResNet-50 at batch 1 makes 53 such calls.
Here a kernel holds its primitive, its weight reordered once into the layout oneDNN
chose, and memory objects whose data pointers are set per call: a call is one
``dnnl_primitive_execute``.

oneDNN's headers and library come from the ``onednn`` extra (the ``onednn-cpu-gomp``
and ``onednn-devel-cpu-gomp`` wheels, found under ``sys.prefix``) or from
``$DEEPSEEK_ONEDNN_ROOT`` (``include/`` and ``lib/`` below it; a pip ``--user`` install is
found too). Without them
``available()`` is False and these kernels are simply not among the candidates. The
library is built against the libgomp PyTorch has loaded, so it shares its threads.
The same C file is also built to run on PyTorch's own, newer oneDNN (``RUNTIMES``,
``torch_onednn``), and each kernel made on both where that is found, the faster kept.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import site
import struct
import sys
from typing import Callable

import torch

from deepseek.backends.cpu import native

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# the C side's codes for the post-op activation (ACTS in onednn.c)
ACTIVATIONS = {"none": 0, "relu": 1, "gelu_tanh": 2, "gelu": 3, "sigmoid": 4, "tanh": 5,
               "swish": 6, "hardswish": 7}
# a residual: none, added as a second input ("add"), or accumulated into the output buffer,
# which holds it on entry ("sum": in place, for a residual that dies there)
_RESIDUAL = {None: 0, "add": 1, "sum": 2}


def _root() -> str | None:
    """The directory holding oneDNN's ``include/oneapi/dnnl/dnnl.h`` and ``lib/libdnnl.so``."""
    for root in (os.environ.get("DEEPSEEK_ONEDNN_ROOT"), sys.prefix, site.USER_BASE):
        if root and os.path.exists(os.path.join(root, "include", "oneapi", "dnnl", "dnnl.h")) \
                and os.path.exists(os.path.join(root, "lib", "libdnnl.so")):
            return root
    return None


# where a kernel's oneDNN comes from, in order of preference: PyTorch's own copy (linked
# into libtorch_cpu: 3.12 in PyTorch 2.13, bf16 GEMMs 15-20% faster than 3.2's on an AMX
# Xeon) and the ``onednn`` extra's library (3.2); ``DEEPSEEK_ONEDNN=torch`` or ``=extra``
# keeps one
RUNTIMES = ("torch", "extra")
_LIBRARIES: dict[str, ctypes.CDLL | None] = {}


def runtimes() -> list[str]:
    """The oneDNN runtimes kernels can be made on here, preferred first."""
    only = os.environ.get("DEEPSEEK_ONEDNN") or None
    if only is not None and only not in RUNTIMES:
        raise ValueError(f"DEEPSEEK_ONEDNN={only!r} is not a oneDNN runtime: set it to one "
                         f"of {', '.join(RUNTIMES)}, or unset it to use both")
    return [r for r in RUNTIMES if only in (None, r) and library(r) is not None]


def library(runtime: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernels on ``runtime`` (None: the preferred one available), or None
    without oneDNN's headers (the extra), a C compiler, or that runtime."""
    if runtime is None:
        available = runtimes()
        return library(available[0]) if available else None
    if runtime not in _LIBRARIES:
        _LIBRARIES[runtime] = _library(runtime)
    return _LIBRARIES[runtime]


def _library(runtime: str) -> ctypes.CDLL | None:
    root = _root()
    if root is None:
        native.unavailable["onednn"] = ("oneDNN not found: pip install 'deepseek[onednn]' "
                                        "or set DEEPSEEK_ONEDNN_ROOT")
        return None
    p = ctypes.c_void_p
    signatures = {
        "ds_onednn_conv_create": ([p, p, p], p), "ds_onednn_matmul_create": ([p, p, p], p),
        "ds_onednn_pool_create": ([p], p), "ds_onednn_reorder_create": ([p], p),
        "ds_onednn_qconv_create": ([p, p, p, p], p), "ds_onednn_qmatmul_create": ([p, p, p, p], p),
        "ds_onednn_run": ([p, p, p, p], ctypes.c_int),
        "ds_onednn_run_chain": ([ctypes.c_int, p, p, p, p], ctypes.c_int),
        "ds_onednn_destroy": ([p], None),
        "ds_onednn_attention_create": ([p, ctypes.c_float], p),
        "ds_onednn_attention_run": ([p, p, p, p, p, p, p], ctypes.c_int),
        "ds_onednn_attention_destroy": ([p], None)}
    include = f"-I{os.path.join(root, 'include')}"
    if runtime == "extra":
        lib_dir = os.path.join(root, "lib")
        return native.library("onednn", signatures, extra=(
            include, f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-ldnnl", "-lpthread"))
    lib = native.library("onednn_torch", dict(signatures, ds_onednn_bind=([p], None)),
                         extra=(include, "-DDS_DNNL_TABLE", "-lpthread"), source="onednn")
    if lib is None:
        return None
    names = ctypes.string_at(ctypes.addressof(ctypes.c_char.in_dll(
        lib, "ds_onednn_symbol_names"))).decode().strip(",").split(",")
    functions = torch_onednn(names)
    if functions is None:
        native.unavailable["onednn_torch"] = ("PyTorch's oneDNN functions not found in "
                                              "libtorch_cpu's symbol table")
        return None
    lib.ds_onednn_bind((ctypes.c_void_p * len(functions))(*functions))
    return lib


def torch_onednn(names: list[str]) -> list[int] | None:
    """Addresses of the oneDNN C API functions ``names`` inside PyTorch's
    ``libtorch_cpu``, which links oneDNN in with its symbols hidden from the dynamic table
    but listed in the static one; None where that table is stripped, a function is
    missing, or the oneDNN found is not a 3.x (3.2 or later: the C API ``onednn.c`` is
    compiled against) with OpenMP threading."""
    try:
        return _torch_onednn(names)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint),
                ("gpu_runtime", ctypes.c_uint)]


def _torch_onednn(names: list[str]) -> list[int] | None:
    path = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib",
                                         "libtorch_cpu.so"))
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as elf:
        found = _functions(elf, path, names + ["dnnl_version"])
    if found is None:
        return None
    version = ctypes.CFUNCTYPE(ctypes.POINTER(_Version))(found["dnnl_version"])().contents
    if version.major != 3 or version.minor < 2 or version.cpu_runtime != 2:  # DNNL_RUNTIME_OMP
        return None
    return [found[name] for name in names]


def _functions(elf: mmap.mmap, path: str, names: list[str]) -> dict[str, int] | None:
    """name -> address in this process of each function in ``names``, read from the ELF
    file ``elf`` (mapped at ``path``), or None."""
    import numpy as np

    if elf[:5] != b"\x7fELF\x02":  # 64-bit ELF
        return None
    phoff, shoff = struct.unpack_from("<QQ", elf, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", elf, 0x36)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize)
                for i in range(shnum)]
    symtab = next((s for s in sections if s[1] == 2), None)  # SHT_SYMTAB
    if symtab is None:  # stripped
        return None
    lo, hi = sections[symtab[6]][4], sections[symtab[6]][4] + sections[symtab[6]][5]
    offsets = {}  # each name's first place in the string table: one scan of the mapping
    pattern = re.compile(b"\0(" + b"|".join(re.escape(n.encode()) for n in names) + b")(?=\0)")
    for m in pattern.finditer(elf, lo, hi):
        offsets.setdefault(m.group(1).decode(), m.start(1) - lo)
    if len(offsets) != len(names):
        return None
    symbols = np.frombuffer(elf, np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"),
                                           ("shndx", "<u2"), ("value", "<u8"),
                                           ("size", "<u8")]),
                            symtab[5] // 24, symtab[4])
    wanted = np.isin(symbols["name"], list(offsets.values()))
    rows = symbols[wanted & ((symbols["info"] & 0xF) == 2) & (symbols["value"] != 0)].copy()
    del symbols, wanted  # (views of the mapping, which closes after this returns)
    # the load bias: where the segment at file offset 0 is mapped, less its address
    vaddr0 = next(struct.unpack_from("<QQ", elf, phoff + i * phentsize + 8)[1]
                  for i in range(phnum)
                  if struct.unpack_from("<IIQ", elf, phoff + i * phentsize)[::2] == (1, 0))
    with open("/proc/self/maps") as maps:  # the loader's private mapping, not a file view
        start = next(int(line.split("-")[0], 16) for line in maps
                     if line.rstrip().endswith(path) and line.split()[1].endswith("p")
                     and int(line.split()[2], 16) == 0)
    bias = start - (vaddr0 & ~0xFFF)
    addresses = {}
    for name in names:
        match = rows["value"][rows["name"] == offsets[name]]
        if len(match) != 1:
            return None
        addresses[name] = bias + int(match[0])
    return addresses


def available() -> bool:
    return library() is not None


class _Kernel:
    """A oneDNN primitive made once; calling it runs it on new data."""

    def __init__(self, lib: ctypes.CDLL, handle, in_shape, out_shape, dtype: torch.dtype,
                 channels_last: bool, residual: str | None = None, source: tuple | None = None):
        self.lib = lib  # the library (runtime) that made it: it runs and frees it
        self.handle = handle
        self.residual = residual
        self.in_shape = tuple(in_shape)
        self.shape = tuple(out_shape)
        self.dtype = dtype
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        # (dtype, memory format) the source is read in: the result's, but for a reorder
        self.source = source or (dtype, self.format)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The result of ``x`` (its memory as the kernel reads it, ``self.source``:
        channels-last for a convolution, row-major rows for a GEMM), plus ``residual`` (the
        result's shape and memory) where the kernel adds one: in a new tensor, or, for a
        "sum" kernel, in ``residual``'s own memory (where it has the kernel's dtype and
        layout)."""
        dtype, fmt = self.source
        if x.dtype != dtype or not x.is_contiguous(memory_format=fmt):
            x = x.to(dtype).contiguous(memory_format=fmt)
        if residual is not None and (residual.dtype != self.dtype or not residual.is_contiguous(
                memory_format=self.format)):
            residual = residual.to(self.dtype).contiguous(memory_format=self.format)
        if self.residual == "sum":
            y, r = residual, None
        else:
            y = torch.empty(self.shape, dtype=self.dtype, memory_format=self.format)
            r = None if residual is None else residual.data_ptr()
        status = self.lib.ds_onednn_run(self.handle, x.data_ptr(), y.data_ptr(), r)
        if status:
            raise RuntimeError(f"oneDNN execution failed (dnnl_status_t {status})")
        return y

    def step(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Callable[[], int]:
        """A call running the primitive alone on ``x`` (and ``residual``, each in the
        kernel's dtype and memory format) into an output allocated once: what the kernel
        costs as a step of a ``Chain``, for measuring it against other kernels."""
        y = residual if self.residual == "sum" else \
            torch.empty(self.shape, dtype=self.dtype, memory_format=self.format)
        ptrs = (x.data_ptr(), y.data_ptr(), residual.data_ptr() if self.residual == "add" else None)
        return lambda keep=(x, y, residual): self.lib.ds_onednn_run(self.handle, *ptrs)

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.ds_onednn_destroy(self.handle)
            self.handle = None


class Chain:
    """Kernels run one after another in one C call (``ds_onednn_run_chain``), where a plan
    runs a stretch of them: the interpreter's statement, the argument checks and the
    output's allocation per kernel (10-12 us each; ResNet-50 makes 53 such calls) become
    one call, the intermediates laid out in one arena allocated per call (so concurrent
    calls never share one).

    ``inputs``: (dtype, memory format) each input is read in (converted where it is not);
    ``refs``: per kernel, its source, destination and residual as (base, byte offset)
    pairs, base 0 the arena, 1 + j input j, -1 none; ``outputs``: (base, byte offset,
    shape, dtype, memory format) of each tensor the call returns (a "sum" kernel's result
    lies in its residual's memory, which may be an input's).
    """

    def __init__(self, kernels: list[_Kernel], inputs: list[tuple], refs: list[int],
                 arena_bytes: int, outputs: list[tuple]):
        self.lib = kernels[0].lib
        self.kernels = kernels  # keeps the primitives alive
        self.n = len(kernels)
        self.handles = (ctypes.c_void_p * self.n)(*(k.handle for k in kernels))
        # each kernel runs through its own library's entry (kernels of both runtimes mix)
        self.runs = (ctypes.c_void_p * self.n)(*(
            ctypes.cast(k.lib.ds_onednn_run, ctypes.c_void_p).value for k in kernels))
        self.refs = (ctypes.c_longlong * len(refs))(*refs)
        self.inputs = inputs
        self.arena_bytes = arena_bytes
        self.outputs = [(base, offset // dtype.itemsize, shape,
                         None if base else _strides(shape, fmt), dtype)
                        for base, offset, shape, dtype, fmt in outputs]

    def __call__(self, *xs: torch.Tensor):
        xs = [x if x.dtype == dtype and x.is_contiguous(memory_format=fmt)
              else x.to(dtype).contiguous(memory_format=fmt)
              for x, (dtype, fmt) in zip(xs, self.inputs)]
        arena = torch.empty(self.arena_bytes, dtype=torch.uint8)
        bases = (ctypes.c_void_p * (1 + len(xs)))(arena.data_ptr(), *(x.data_ptr() for x in xs))
        status = self.lib.ds_onednn_run_chain(self.n, self.handles, self.runs, self.refs, bases)
        if status:
            raise RuntimeError(f"oneDNN execution failed (dnnl_status_t {status})")
        typed = {}
        out = []
        for base, offset, shape, strides, dtype in self.outputs:
            if base:
                out.append(xs[base - 1])
                continue
            if dtype not in typed:
                typed[dtype] = arena.view(dtype)
            out.append(typed[dtype].as_strided(shape, strides, offset))
        return out


class Attention:
    """``softmax(scale * q @ k^T + mask) @ v`` as three oneDNN primitives made once
    (``ds_onednn_attention_create``: a batched matmul scaling the scores and adding the
    mask in its post-ops, a softmax, a batched matmul), for 4-D (batch, heads, rows,
    head dim) float32/bf16 ``q``, ``k``, ``v`` of fixed shapes, read with the strides they
    come in (the heads of a projection's output are strided views: no copy). One set of
    primitives per strides met, made at its first call; a plan meets one.

    ``mask``: an additive float mask broadcast to (batch, heads, rows, keys) at each
    call (a query row with every key masked gives zeros, as PyTorch's attention does),
    or ``causal`` (a constant one: query i sees keys j <= i); ``heads_inner``: the
    result is written in (batch, rows, heads, head dim) memory, so that a following
    merge of the heads reads it without a copy, and returned as its (batch, heads, rows,
    head dim) view. Measured on the AMX VM (BERT-base's 12 x 128 x 64, 2 threads): 0.35-0.41
    ms against 0.45-0.57 ms for PyTorch's flash attention on the same views."""

    def __init__(self, q_shape, keys: int, dtype: torch.dtype, scale: float,
                 causal: bool = False, heads_inner: bool = False):
        self.lib = library()
        self.dtype = dtype
        self.scale = float(scale)
        b, h, sq, d = q_shape
        self.dims = (b, h, sq, keys, d)
        self.mask = torch.zeros(sq, keys).masked_fill_(
            torch.ones(sq, keys, dtype=torch.bool).triu_(1), float("-inf"))[None, None] \
            if causal else None
        self.out_shape = (b, sq, h, d) if heads_inner else (b, h, sq, d)
        self.heads_inner = heads_inner
        scores = b * h * sq * keys
        self.scratch_bytes = scores * (4 + (dtype.itemsize if dtype != torch.float32 else 0))
        self._made: dict[tuple, int] = {}

    def _make(self, key: tuple, tensors: list) -> int:
        """The primitives for ``tensors`` (q, k, v, the output, the mask or None), whose
        strides ``key`` names."""
        *qkvo, mask = tensors
        strides = [s for t in qkvo for s in _dense_strides(t)]
        m = [*mask.shape, *_dense_strides(mask)] if mask is not None else [0] * 8
        params = torch.tensor([*self.dims, _DTYPES[self.dtype], _DTYPES[mask.dtype]
                               if mask is not None else -1, *strides, *m], dtype=torch.int32)
        handle = self.lib.ds_onednn_attention_create(params.data_ptr(), self.scale)
        if not handle:
            raise RuntimeError(f"oneDNN made no attention primitive for {self.dims} {key}")
        self._made[key] = handle
        return handle

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = self.mask if mask is None else mask
        if mask is not None:
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            if self.dtype == torch.bfloat16 and mask.shape[0] == 1 < self.dims[0]:
                # a bf16 kernel broadcasting the mask over batch and heads both gave wrong
                # rows (oneDNN 3.12, batch 2 x 4 heads): over the heads only
                mask = mask.expand(self.dims[0], *mask.shape[1:])
            if any(st == 0 and n > 1 for st, n in zip(mask.stride(), mask.shape)):
                mask = mask.contiguous()  # an expanded mask: oneDNN broadcasts size-1 dims
        o = torch.empty(self.out_shape, dtype=self.dtype)
        out = o.transpose(1, 2) if self.heads_inner else o
        key = (q.stride(), k.stride(), v.stride(), out.stride(),
               None if mask is None else (mask.dtype, mask.shape, mask.stride()))
        handle = self._made.get(key) or self._make(key, [q, k, v, out, mask])
        scratch = torch.empty(self.scratch_bytes, dtype=torch.uint8)
        status = self.lib.ds_onednn_attention_run(
            handle, q.data_ptr(), k.data_ptr(), v.data_ptr(),
            None if mask is None else mask.data_ptr(), o.data_ptr(), scratch.data_ptr())
        if status:
            raise RuntimeError(f"oneDNN execution failed (dnnl_status_t {status})")
        if mask is not None and mask is not self.mask:
            # a query row whose keys are all masked: softmax of -infs is NaN here and 0 in
            # PyTorch's attention, which the rows of padding tokens rely on
            if mask.amax(-1).min().item() == float("-inf"):
                out.masked_fill_(torch.isneginf(mask).all(-1, keepdim=True), 0.0)
        return out

    def __del__(self):
        for handle in getattr(self, "_made", {}).values():
            self.lib.ds_onednn_attention_destroy(handle)
        self._made = {}


def attention(q_shape, keys: int, dtype: torch.dtype, scale: float, causal: bool = False,
              heads_inner: bool = False) -> Attention | None:
    """An ``Attention`` (see there), or None without oneDNN or for another dtype."""
    if dtype not in _DTYPES or library() is None:
        return None
    return Attention(q_shape, keys, dtype, scale, causal, heads_inner)


def _dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides, a size-1 dimension's replaced by the span of those after it (any
    stride addresses it alike; oneDNN wants strides that do not overlap)."""
    strides, span = list(t.stride()), 1
    for i in reversed(range(t.dim())):
        if t.shape[i] == 1:
            strides[i] = span
        span = max(span, strides[i] * t.shape[i])
    return tuple(strides)


def _strides(shape, fmt: torch.memory_format) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=fmt).stride()


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().float().contiguous()


def _conv_geometry(weight, stride, padding, dilation, groups, in_shape) -> tuple[list, tuple]:
    """(the C side's geometry parameters, the output's shape) of a 2-D convolution."""
    n, c, h, w = in_shape
    oc, _, kh, kw = weight.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ([n, c, h, w, oc, kh, kw, *stride, *padding, *padding, *dilation, groups, oh, ow],
            (n, oc, oh, ow))


def conv2d(weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
           groups: int, in_shape, dtype: torch.dtype, activation: str = "none",
           residual: str | None = None, choose=None) -> _Kernel | None:
    """``activation(conv2d(x, weight, bias) [+ residual])`` for NHWC inputs of ``in_shape``
    (N, C, H, W) in ``dtype`` (float32/bf16), or None where oneDNN makes no primitive;
    ``residual``: None, "add" or "sum" (see ``_RESIDUAL``); ``choose``: see ``_made``."""
    if dtype not in _DTYPES:
        return None
    geometry, out_shape = _conv_geometry(weight, stride, padding, dilation, groups, in_shape)
    params = torch.tensor([*geometry, _DTYPES[dtype], _RESIDUAL[residual],
                           ACTIVATIONS[activation]], dtype=torch.int32)
    wt = weight.detach().to(dtype).contiguous()
    b = _bias(bias)

    def make(lib):
        handle = lib.ds_onednn_conv_create(params.data_ptr(), wt.data_ptr(),
                                           None if b is None else b.data_ptr())
        return _Kernel(lib, handle, in_shape, out_shape, dtype, True, residual) \
            if handle else None
    return _made(make, choose)


def linear(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, dtype: torch.dtype,
           activation: str = "none", choose=None) -> _Kernel | None:
    """``activation(x @ weight + bias)`` for (rows, K) row-major ``x`` and a (K, N)
    ``weight``, in ``dtype``, or None where oneDNN makes no primitive; ``choose``: see
    ``_made``."""
    if dtype not in _DTYPES:
        return None
    k, n = weight.shape
    params = torch.tensor([rows, k, n, _DTYPES[dtype], 0, ACTIVATIONS[activation]],
                          dtype=torch.int32)
    wt = weight.detach().to(dtype).contiguous()
    b = _bias(bias)
    def make(lib):
        handle = lib.ds_onednn_matmul_create(params.data_ptr(), wt.data_ptr(),
                                             None if b is None else b.data_ptr())
        return _Kernel(lib, handle, (rows, k), (rows, n), dtype, False) if handle else None
    return _made(make, choose)


def _made(make: Callable, choose: Callable | None) -> _Kernel | None:
    """The kernel ``make(library)`` makes on the preferred oneDNN runtime; with
    ``choose`` (the codegen's measured choice: candidate name -> call, returns a name),
    the one ``choose`` picks among the runtimes available, each timed as a chain step on
    random inputs (the runtimes' kernels differ per shape: PyTorch's oneDNN 3.12 runs
    bf16 GEMMs 15-20% faster than 3.2, 3.2 some stride-2 convolutions 1.4x faster). A
    candidate is made at its first (warm-up) call, so a choice answered from the disk
    cache makes only the kernel it names."""
    available = runtimes()
    built: dict[str, _Kernel | None] = {}

    def get(runtime: str) -> _Kernel | None:
        if runtime not in built:
            built[runtime] = make(library(runtime))
        return built[runtime]

    if choose is None or len(available) < 2:
        return get(available[0]) if available else None

    def candidate(runtime: str) -> Callable[[], object]:
        step: list[Callable[[], object]] = []

        def call():
            if not step:  # a runtime that makes no primitive stands in with the first's
                kernel = get(runtime) or get(available[0])
                step.append(_timed_step(kernel) if kernel is not None else (lambda: 0))
            return step[0]()
        return call

    name = choose({runtime: candidate(runtime) for runtime in available})
    return get(name) or get(available[0])


def _timed_step(kernel: _Kernel) -> Callable[[], int]:
    """``kernel`` as a chain step on random inputs in the layouts it reads."""
    dtype, fmt = kernel.source
    x = torch.randn(kernel.in_shape).to(dtype).contiguous(memory_format=fmt)
    residual = None if not kernel.residual else \
        torch.randn(kernel.shape).to(kernel.dtype).contiguous(memory_format=kernel.format)
    return kernel.step(x, residual)


# the C side's codes for int8 kernels' source and destination types
_QTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.uint8: 2, torch.int8: 3}


def _int8_operands(weight, weight_scale, bias, x_dtype, x_scale, out_dtype, out_scale,
                   out_zero_point):
    """(library, out dtype, out scale, out zero point, weight scales, scales memory, weight,
    bias) of an int8 kernel, or None where one cannot be asked for (see ``qconv2d``)."""
    lib = library()
    if out_dtype in (None, torch.float32):
        out_dtype, out_scale, out_zero_point = torch.float32, 1.0, 0
    if lib is None or x_dtype not in (torch.uint8, torch.int8) or weight.dtype != torch.int8 \
            or out_dtype not in _QTYPES:
        return None
    ws = weight_scale.detach().float().reshape(-1)
    scales = torch.cat([torch.tensor([float(x_scale), float(out_scale)]), ws]).contiguous()
    return (lib, out_dtype, out_scale, out_zero_point, ws, scales, weight.detach().contiguous(),
            _bias(bias))


def qconv2d(weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
            stride, padding, dilation, in_shape, x_dtype: torch.dtype, x_scale: float,
            x_zero_point: int, activation: str = "none", out_dtype: torch.dtype | None = None,
            out_scale: float = 1.0, out_zero_point: int = 0,
            residual: str | None = None) -> _Kernel | None:
    """An int8 convolution (``weight`` int8, symmetric, ``weight_scale`` per output channel
    or one) of NHWC ``x_dtype`` (uint8/int8) inputs of ``in_shape`` with ``x_scale`` and
    ``x_zero_point``: ``activation(conv(dequantized x, dequantized weight) + bias)``,
    returned in float32 (``out_dtype`` None or float32: the output scale and zero point
    are then unused) or quantized to ``out_dtype`` (uint8/int8) with ``out_scale`` and
    ``out_zero_point``; ``residual`` (None, "add" or "sum", see ``_RESIDUAL``; a float
    result only) added before the activation; None where oneDNN makes no primitive. Made
    on the preferred
    runtime: PyTorch's int8 op runs the same oneDNN, making its primitive every call."""
    operands = _int8_operands(weight, weight_scale, bias, x_dtype, x_scale, out_dtype,
                              out_scale, out_zero_point)
    if operands is None:
        return None
    lib, out_dtype, out_scale, out_zero_point, ws, scales, wt, b = operands
    geometry, out_shape = _conv_geometry(weight, stride, padding, dilation, 1, in_shape)
    params = torch.tensor([*geometry, _QTYPES[x_dtype], _QTYPES[out_dtype],
                           ACTIVATIONS[activation], int(ws.numel() > 1), int(x_zero_point),
                           int(out_zero_point), _RESIDUAL[residual]], dtype=torch.int32)
    handle = lib.ds_onednn_qconv_create(params.data_ptr(), wt.data_ptr(),
                                        None if b is None else b.data_ptr(), scales.data_ptr())
    return _Kernel(lib, handle, in_shape, out_shape, out_dtype, True, residual,
                   source=(x_dtype, torch.channels_last)) if handle else None


def qlinear(weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
            rows: int, x_dtype: torch.dtype, x_scale: float, x_zero_point: int,
            activation: str = "none", out_dtype: torch.dtype | None = None,
            out_scale: float = 1.0, out_zero_point: int = 0) -> _Kernel | None:
    """As ``qconv2d``, for a linear layer: (``rows``, K) row-major ``x_dtype`` rows times
    the int8 (N, K) ``weight``; None where oneDNN makes no primitive."""
    operands = _int8_operands(weight, weight_scale, bias, x_dtype, x_scale, out_dtype,
                              out_scale, out_zero_point)
    if operands is None or weight.dim() != 2:
        return None
    lib, out_dtype, out_scale, out_zero_point, ws, scales, wt, b = operands
    n, k = weight.shape
    params = torch.tensor([rows, k, n, _QTYPES[x_dtype], _QTYPES[out_dtype],
                           ACTIVATIONS[activation], int(ws.numel() > 1), int(x_zero_point),
                           int(out_zero_point)], dtype=torch.int32)
    handle = lib.ds_onednn_qmatmul_create(params.data_ptr(), wt.data_ptr(),
                                          None if b is None else b.data_ptr(), scales.data_ptr())
    return _Kernel(lib, handle, (rows, k), (rows, n), out_dtype, False,
                   source=(x_dtype, torch.contiguous_format)) if handle else None


def reorder(in_shape, dtype: torch.dtype, to: torch.dtype) -> _Kernel | None:
    """An (N, C, H, W) contiguous tensor in ``dtype`` copied into channels-last memory in
    ``to``: one pass (a network's float32 input as its bf16 stem convolution reads it), or
    None where oneDNN makes no primitive."""
    lib = library()
    if lib is None or dtype not in _DTYPES or to not in _DTYPES:
        return None
    params = torch.tensor([*in_shape, _DTYPES[dtype], _DTYPES[to]], dtype=torch.int32)
    handle = lib.ds_onednn_reorder_create(params.data_ptr())
    return _Kernel(lib, handle, in_shape, in_shape, to, True,
                   source=(dtype, torch.contiguous_format)) if handle else None


# pooling algorithms, by the C side's code: max, the average over the window's positions
# inside the input, the average counting padded positions as zeros
_POOLS = {"max": 0, "avg": 1, "avg_include_pad": 2}


def _pooled_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (``pooling_output_shape``): a last window that
    ceil_mode starts inside the right padding is dropped."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    return out - 1 if ceil_mode and (out - 1) * s >= size + p else out


def pool2d(algorithm: str, kernel_size, stride, padding, dilation, ceil_mode: bool, in_shape,
           dtype: torch.dtype) -> _Kernel | None:
    """2-D pooling (``algorithm`` in ``_POOLS``; PyTorch's attributes, normalized to pairs)
    of NHWC inputs of ``in_shape`` in ``dtype``, or None where oneDNN makes no primitive.
    The output size is max pooling's formula, which average pooling shares."""
    lib = library()
    if lib is None or dtype not in _DTYPES:
        return None
    n, c, h, w = in_shape
    oh, ow = (_pooled_size(*a, ceil_mode) for a in
              zip((h, w), kernel_size, stride, padding, dilation))
    # right padding as oneDNN counts it: what ceil_mode's last window reaches past the input
    pad_r = [max(0, (o - 1) * s + d * (k - 1) + 1 - size - p) for o, s, d, k, size, p in
             zip((oh, ow), stride, dilation, kernel_size, (h, w), padding)]
    params = torch.tensor([n, c, h, w, *kernel_size, *stride, *padding, *pad_r, *dilation,
                           oh, ow, _DTYPES[dtype], _POOLS[algorithm]], dtype=torch.int32)
    handle = lib.ds_onednn_pool_create(params.data_ptr())
    return _Kernel(lib, handle, in_shape, (n, c, oh, ow), dtype, True) if handle else None
