"""Triton kernels of quantized graphs on CUDA: per-tensor quantization in one pass, and
``deepseek_quant::conv2d_int8`` as one kernel: an implicit GEMM over
channels-last int8 activations and int8 weights (int32 accumulation on the integer
tensor cores), with the whole epilogue in the same kernel.

    rows    = output pixels (N * OH * OW), columns = output channels,
    K       = KH * KW * C_in, read straight from the input (no im2col buffer);
    y       = (acc - x_zp * colsum[n]) * x_scale * w_scale[n] + bias[n]   (float32)
    [+ residual] [relu] -> stored as a float (float32, float16, bf16), and/or
    quantized (round half to even, + output zero point, clamped) to int8 / uint8.

A padded pixel loads the input's zero point, so that ``acc - x_zp * colsum`` is the
exact integer sum of ``(x - x_zp) * w`` over the window, as the reference's float
formula (``reference_conv2d_int8``) computes it up to float rounding. uint8 inputs
flip their top bit as they are loaded (``u ^ 128`` is ``u - 128`` as an int8) with the
zero point moved alike. Symmetric weights only (a weight zero point falls back).

Two ways through K, each one loop (Triton pipelines an innermost loop's loads):
per filter tap, ``BLOCK_K`` input channels at a time (wide layers); or K
flattened (tap, channel) when there are fewer channels than a block (the
3-channel stem), each element's tap decoded from its K index. Runs under
Triton's interpreter too (``TRITON_INTERPRET=1``), on CPU tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


try:  # host-made TMA descriptors (Triton 3.4+)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer kernel only
    TensorDescriptor = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# 1.5 * 2**23: in float32, (v + R) - R rounds |v| < 2**22 to an integer, half to even
_ROUND = tl.constexpr(12582912.0)


def _configs():  # tried at the first call per key; the choice is kept in Triton's disk cache
    if _INTERPRET:  # the interpreter runs every config it is given: one, small
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in ((128, 128, 64, 8, 4), (128, 256, 64, 8, 4), (256, 128, 64, 8, 4),
                                  (128, 128, 128, 8, 4),
                                  # short K (1x1 layers of 64 channels): more blocks per SM
                                  (128, 64, 64, 4, 2), (64, 64, 64, 4, 2))]


@triton.autotune(configs=_configs(), key=["M", "COUT", "C", "KH", "KW", "FLAT"],
                 cache_results=True)
@triton.jit
def _conv_int8(X, W, CS, SC, B, R, Y, Q,
               M, H, WD, C, OH, OW, COUT, K,
               SH, SW, PH, PW, DH, DW,
               x_pad, x_zp, out_inv_scale, out_zp, qmin, qmax,  # x_pad: int; the rest floats
               KH: tl.constexpr, KW: tl.constexpr, FLAT: tl.constexpr, U8: tl.constexpr,
               HAS_B: tl.constexpr, HAS_R: tl.constexpr, RELU: tl.constexpr,
               HAS_Y: tl.constexpr, HAS_Q: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < COUT
    nb, oh, ow = _pixels(rm, OH, OW)
    nb = nb.to(tl.int64)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    if FLAT:  # K = (tap, channel) flattened: few input channels
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = _patches(X, nb, ih0, iw0, m_ok, kk, H, WD, C, K, DH, DW, x_pad, KW)
            if U8:
                a = (a ^ -128).to(tl.int8)
            b = tl.load(W + rn[None, :] * K + kk[:, None],
                        mask=(kk < K)[:, None] & n_ok[None, :], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    else:  # per filter tap, BLOCK_K channels at a time, as one flat loop: Triton
        # pipelines the loads of an innermost loop only (a nested channel loop of one
        # iteration, 64 channels, would wait for every load)
        blocks = tl.cdiv(C, BLOCK_K)
        for it in range(0, KH * KW * blocks):
            tap = it // blocks
            c = (it % blocks) * BLOCK_K + rk
            ih = ih0 + (tap // KW) * DH
            iw = iw0 + (tap % KW) * DW
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < WD)
            ok = row_ok[:, None] & (c < C)[None, :]
            a = tl.load(X + (((nb * H + ih) * WD + iw) * C)[:, None] + c[None, :], mask=ok,
                        other=x_pad)
            if U8:
                a = (a ^ -128).to(tl.int8)
            b = tl.load(W + rn[None, :] * K + (tap * C + c)[:, None],
                        mask=(c < C)[:, None] & n_ok[None, :], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    _epilogue(acc, rm.to(tl.int64) * COUT, m_ok, rn, n_ok, CS, SC, B, R, Y, Q,
              x_zp, out_inv_scale, out_zp, qmin, qmax, HAS_B, HAS_R, RELU, HAS_Y, HAS_Q)


@triton.jit
def _pixels(rm, OH, OW):
    """(image, row, column) of output pixels ``rm`` (row-major N, OH, OW order)."""
    t = rm // OW
    return t // OH, t % OH, rm % OW


@triton.jit
def _patches(X, nb, ih0, iw0, m_ok, kk, H, W, C, K, DH, DW, x_pad, KW: tl.constexpr):
    """The [pixels, kk] tile of the patch matrix of NHWC ``X``: column kk = (tap, channel);
    padded pixels and columns past K read ``x_pad``."""
    c = kk % C
    tap = kk // C
    ih = ih0[:, None] + ((tap // KW) * DH)[None, :]
    iw = iw0[:, None] + ((tap % KW) * DW)[None, :]
    ok = m_ok[:, None] & (kk < K)[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(X + ((nb[:, None] * H + ih) * W + iw) * C + c[None, :], mask=ok,
                   other=x_pad)


@triton.jit
def _epilogue(acc, row_offs, m_ok, rn, n_ok, CS, SC, B, R, Y, Q,
              x_zp, out_inv_scale, out_zp, qmin, qmax,
              HAS_B: tl.constexpr, HAS_R: tl.constexpr, RELU: tl.constexpr,
              HAS_Y: tl.constexpr, HAS_Q: tl.constexpr):
    """De-quantize the int32 tile (rows at ``row_offs`` elements, columns ``rn``), add
    bias and residual, ReLU; store float and/or quantized."""
    cs = tl.load(CS + rn, mask=n_ok, other=0.0)
    sc = tl.load(SC + rn, mask=n_ok, other=0.0)
    y = (acc.to(tl.float32) - x_zp * cs[None, :]) * sc[None, :]
    if HAS_B:
        y = y + tl.load(B + rn, mask=n_ok, other=0.0)[None, :]
    offs = row_offs[:, None] + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_R:
        y = y + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.maximum(y, 0.0)
    if HAS_Y:
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if HAS_Q:
        v = tl.minimum(tl.maximum(y * out_inv_scale, qmin - out_zp - 1.0), qmax - out_zp + 1.0)
        v = (v + _ROUND) - _ROUND  # round half to even, as torch.round
        q = tl.minimum(tl.maximum(v + out_zp, qmin), qmax)
        tl.store(Q + offs, q.to(tl.int32).to(Q.dtype.element_ty), mask=mask)


def _tma_configs():
    """Tiles of the descriptor kernel: BLOCK_W is the output tile's width where tiles are
    spatial (BLOCK_M // BLOCK_W rows of it)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_W": 8},
                              num_warps=4, pre_hook=_tma_blocks)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "BLOCK_W": bw},
                          num_warps=w, num_stages=st, pre_hook=_tma_blocks)
            for m, n, k, bw, w, st in ((128, 128, 128, 16, 8, 4), (128, 256, 128, 16, 8, 3),
                                       (256, 128, 128, 16, 8, 3), (128, 128, 64, 8, 8, 4),
                                       (128, 256, 64, 8, 8, 4), (64, 128, 128, 8, 4, 4))]


def _tma_blocks(nargs):
    """Each config's block shapes on the (host-made) tensor descriptors."""
    bm, bn, bk, bw = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"], nargs["BLOCK_W"]
    nargs["XD"].block_shape = [1, bm // bw, bw, bk] if nargs["SPATIAL"] else [bm, bk]
    nargs["WD"].block_shape = [bn, bk]


@triton.autotune(configs=_tma_configs(), key=["M", "COUT", "C", "KH", "KW", "OW", "SPATIAL"],
                 cache_results=True)
@triton.jit
def _conv_int8_tma(XD, WD, CS, SC, B, R, Y, Q,
                   M, C, OH, OW, COUT, PH, PW, DH, DW,
                   x_zp, out_inv_scale, out_zp, qmin, qmax,
                   KH: tl.constexpr, KW: tl.constexpr, SPATIAL: tl.constexpr, U8: tl.constexpr,
                   HAS_B: tl.constexpr, HAS_R: tl.constexpr, RELU: tl.constexpr,
                   HAS_Y: tl.constexpr, HAS_Q: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_W: tl.constexpr):
    """A stride-1 convolution whose operands come through tensor descriptors (TMA on
    Hopper: no per-element address arithmetic; out-of-bounds reads are zeros). Not
    SPATIAL: a 1x1 convolution as the GEMM (N*H*W, C) x (C, C_out). SPATIAL: tiles of
    BLOCK_M // BLOCK_W x BLOCK_W output pixels of one image; per filter tap, the shifted
    input window comes from a 4-D (N, H, W, C) descriptor, its padding read as zeros (so
    the input's zero point must be 0)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    BLOCK_H: tl.constexpr = BLOCK_M // BLOCK_W
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    blocks = tl.cdiv(C, BLOCK_K)
    if SPATIAL:
        tiles_w = tl.cdiv(OW, BLOCK_W)
        tiles_h = tl.cdiv(OH, BLOCK_H)
        tw = pid_m % tiles_w
        t = pid_m // tiles_w
        oh0 = (t % tiles_h) * BLOCK_H
        ow0 = tw * BLOCK_W
        nb = t // tiles_h
        for it in range(0, KH * KW * blocks):
            tap = it // blocks
            c0 = (it % blocks) * BLOCK_K
            a = XD.load([nb, oh0 - PH + (tap // KW) * DH, ow0 - PW + (tap % KW) * DW, c0])
            a = a.reshape(BLOCK_M, BLOCK_K)
            if U8:
                a = (a ^ -128).to(tl.int8)
            # K beyond this tap's channels reads the next tap's weights, against zeros of a
            b = WD.load([pid_n * BLOCK_N, tap * C + c0])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        i = tl.arange(0, BLOCK_M)
        oh = oh0 + i // BLOCK_W
        ow = ow0 + i % BLOCK_W
        m_ok = (oh < OH) & (ow < OW)
        rows = (nb.to(tl.int64) * OH + oh) * OW + ow
    else:
        for it in range(0, blocks):
            a = XD.load([pid_m * BLOCK_M, it * BLOCK_K])
            if U8:
                a = (a ^ -128).to(tl.int8)
            b = WD.load([pid_n * BLOCK_N, it * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rows < M
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _epilogue(acc, rows * COUT, m_ok, rn, rn < COUT, CS, SC, B, R, Y, Q,
              x_zp, out_inv_scale, out_zp, qmin, qmax, HAS_B, HAS_R, RELU, HAS_Y, HAS_Q)


@triton.jit
def _im2col(X, COLS, M, H, W, C, OH, OW, K, KPAD, SH, SW, PH, PW, DH, DW, x_pad,
            KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (M, KPAD) patch matrix of an NHWC int8 input: row = output pixel, column =
    (tap, channel); padded pixels hold the zero point as stored, columns past K too
    (their weights are zero)."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = rm < M
    nb, oh, ow = _pixels(rm, OH, OW)
    v = _patches(X, nb, oh * SH - PH, ow * SW - PW, m_ok, rk, H, W, C, K, DH, DW, x_pad, KW)
    tl.store(COLS + rm[:, None] * KPAD + rk[None, :], v,
             mask=m_ok[:, None] & (rk < KPAD)[None, :])


_INT8 = (torch.uint8, torch.int8)


@triton.jit
def _quantize(X, Q, N, inv_scale, zp, qmin, qmax, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.minimum(tl.maximum(x * inv_scale, qmin - zp - 1.0), qmax - zp + 1.0)
    v = (v + _ROUND) - _ROUND
    q = tl.minimum(tl.maximum(v + zp, qmin), qmax)
    tl.store(Q + offs, q.to(tl.int32).to(Q.dtype.element_ty), mask=mask)


def quantize_per_tensor(x: torch.Tensor, inv_scale: float, zero_point: int, qmin: int,
                        qmax: int, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(round(x * inv_scale) + zero_point, qmin, qmax)`` as ``dtype`` (uint8/int8),
    in ``x``'s memory format: one pass (ATen's steps are five)."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    q = torch.empty_like(x, dtype=dtype)  # the same memory format
    n = x.numel()
    if n:
        _quantize[(triton.cdiv(n, 4096),)](x, q, n, float(inv_scale), float(zero_point),
                                           float(qmin), float(qmax), BLOCK=4096, num_warps=8)
    return q


def _agree(a: tuple, b: tuple) -> bool:
    """Whether two kernels' ``(y, q)`` results agree: float results to 1e-3 relative L2
    (the epilogue's float rounding differs), quantized ones at most one step apart on at
    most 0.5% of the values (rounding ties)."""
    (ya, qa), (yb, qb) = a, b
    if ya is not None:
        err = (ya.float() - yb.float()).norm() / ya.float().norm().clamp_min(1e-30)
        if not bool(err < 1e-3):
            return False
    if qa is not None:
        diff = (qa.int() - qb.int()).abs()
        return bool(diff.max() <= 1) and int((diff > 0).sum()) <= max(2, diff.numel() // 200)
    return True


def _stored(dtype: torch.dtype, zero_point: int) -> int:
    """A padded pixel's value as the kernels load it: the zero point as stored (uint8 bits
    read as int8; the kernels then flip the top bit of all they load)."""
    zp = int(zero_point)
    return zp - 256 if dtype == torch.uint8 and zp >= 128 else zp


class Conv2dInt8:
    """One quantized convolution's packed operands: the int8 weight as a (C_out, K)
    matrix, K in (kh, kw, c_in) order, its column sums, and ``x_scale * w_scale`` per
    output channel (float32)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, x_scale: float,
                 bias: torch.Tensor | None, stride, padding, dilation):
        cout, cin, kh, kw = weight.shape
        self.kh, self.kw, self.cin, self.cout = kh, kw, cin, cout
        # (C_out, K) rows: K contiguous in both operands, the layout 8-bit wgmma reads
        self.matrix = weight.permute(0, 2, 3, 1).reshape(cout, kh * kw * cin).contiguous()
        self.colsum = weight.sum((1, 2, 3), dtype=torch.int32).float().contiguous()
        self.scale = (weight_scale.float().reshape(-1).expand(cout) * x_scale).contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.tma_gemm = False  # 1x1 layers through the descriptor kernel (see tma_layout)
        # few input channels (a stem: K = 7 * 7 * 3): an explicit patch matrix, K padded to
        # a multiple of 32 with zero weights, then the GEMM; else K decoded per element
        k = kh * kw * cin
        self.kpad = -(-k // 32) * 32 if cin < 32 and kh * kw > 1 else None
        self.patch_matrix = None if self.kpad is None else torch.nn.functional.pad(
            self.matrix, (0, self.kpad - k)).contiguous()
        self.tma_min_channels = 128  # KxK layers with fewer input channels: pointer kernel
        self.weight = weight
        # per call signature: "triton" or "cudnn" (cuDNN's fused int8 convolution, where
        # it measured faster at the first call outside a capture); ``prefer`` forces one
        self.choices: dict[tuple, str] = {}
        self.prefer: str | None = None
        self._cudnn = None

    @staticmethod
    def supported(x_dtype: torch.dtype, weight: torch.Tensor, weight_scale: torch.Tensor,
                  weight_zero_point: torch.Tensor | None, groups: int) -> bool:
        return (weight.dim() == 4 and groups == 1
                and x_dtype in _INT8 and weight.dtype == torch.int8
                and weight_scale.numel() in (1, weight.shape[0])
                and (weight_zero_point is None or not bool(weight_zero_point.ne(0).any())))

    def __call__(self, x: torch.Tensor, x_zero_point: int, post_op: str = "none",
                 residual: torch.Tensor | None = None, float_dtype: torch.dtype | None = None,
                 quant: tuple | None = None):
        """The convolution of quantized ``x`` (N, C, H, W; any memory format). Returns
        ``(y, q)``: ``y`` in ``float_dtype`` (None: not stored) and ``q`` quantized with
        ``quant = (scale, zero_point, dtype)`` (None: not stored), both (N, C_out, OH,
        OW) in channels-last memory. ``residual`` (same shape) is added before ReLU."""
        if self.choose(x, x_zero_point, post_op, residual, float_dtype, quant) == "cudnn":
            return self._cudnn(x, x_zero_point, post_op, residual, float_dtype, quant)
        return self.triton(x, x_zero_point, post_op, residual, float_dtype, quant)

    def choose(self, x, x_zero_point, post_op, residual, float_dtype, quant) -> str:
        """"cudnn" where cuDNN takes this call, agreed with the Triton kernel on it and
        ran it faster (checked and timed once per call signature and machine, never
        during a CUDA-graph capture; the choice and cuDNN's plan kept on disk,
        ``autotune.kernel_choices``), else "triton"."""
        if not x.is_cuda:
            return "triton"
        key = (tuple(x.shape), x.dtype, int(x_zero_point), post_op,
               None if residual is None else residual.dtype, float_dtype,
               None if quant is None else tuple(quant))
        choice = self.choices.get(key)
        if choice is not None:
            return choice
        from deepseek.backends.cuda.autotune import graph_time, kernel_choices
        from deepseek.backends.cuda.cudnn_int8 import CudnnConv2dInt8, frontend

        if frontend() is None or self.prefer == "triton":
            self.choices[key] = "triton"
            return "triton"
        if self._cudnn is None:
            self._cudnn = CudnnConv2dInt8(self, self.weight)
        args = (x, x_zero_point, post_op, residual, float_dtype, quant)
        if not self._cudnn.supports(x, x_zero_point, quant):
            self.choices[key] = "triton"
            return "triton"
        if torch.cuda.is_current_stream_capturing():
            return "triton"  # built and timed at a later call outside the capture
        # a choice measured before on this machine (and cuDNN's plan for it) is kept on
        # disk: measuring every call signature again took most of a 150 s int8 compile
        stored, problem = kernel_choices(x.device, "int8_conv"), self.problem(key)
        hit = (stored.get(problem) or {}) if self.prefer is None else {}
        kernel, plan = hit.get("kernel"), hit.get("plan")
        if kernel == "triton" or (kernel == "cudnn" and isinstance(plan, int) and self._cudnn
                                  .build(x, post_op, residual, float_dtype, quant, plan=plan)):
            self.choices[key] = kernel
            return kernel
        graph = self._cudnn.build(x, post_op, residual, float_dtype, quant)
        if graph is None:
            choice = "triton"
        elif self.prefer == "cudnn":
            self.choices[key] = "cudnn"
            return "cudnn"
        else:
            times = {"triton": graph_time(lambda: self.triton(*args))}  # as the plan replays
            try:
                if _agree(self.triton(*args), self._cudnn(*args)):
                    times["cudnn"] = graph_time(lambda: self._cudnn(*args))
            except RuntimeError:  # cuDNN failed to run the plan it built: Triton's
                pass
            choice = min(times, key=times.get)
        stored.put(problem, {"kernel": choice, "plan": graph.plan if graph else None})
        self.choices[key] = choice
        return choice

    def problem(self, key: tuple) -> str:
        """A call signature named for the on-disk choices: the weight's geometry and the
        call's shapes, types and epilogue (not the weight's values, which decide nothing
        about speed)."""
        return (f"conv2d_int8 w{tuple(self.weight.shape)} s{self.stride} p{self.padding} "
                f"d{self.dilation} bias{self.bias is not None} {key}")

    def triton(self, x: torch.Tensor, x_zero_point: int, post_op: str = "none",
               residual: torch.Tensor | None = None, float_dtype: torch.dtype | None = None,
               quant: tuple | None = None):
        """The call through the Triton kernels (arguments as ``__call__``)."""
        n, c, h, w = x.shape
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        oh = (h + 2 * ph - dh * (self.kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (self.kw - 1) - 1) // sw + 1
        x = x.contiguous(memory_format=torch.channels_last)
        u8 = x.dtype == torch.uint8
        xs = x.view(torch.int8) if u8 else x
        zp = int(x_zero_point) - 128 if u8 else int(x_zero_point)
        pad = _stored(x.dtype, x_zero_point)
        m, k = n * oh * ow, self.kh * self.kw * self.cin
        shape, cl = (n, self.cout, oh, ow), torch.channels_last
        y = None if float_dtype is None else torch.empty(shape, dtype=float_dtype,
                                                         device=x.device, memory_format=cl)
        q = None
        inv, ozp, qmin, qmax = 1.0, 0, 0, 0
        if quant is not None:
            scale, ozp, qdtype = quant
            q = torch.empty(shape, dtype=qdtype, device=x.device, memory_format=cl)
            inv, qmin, qmax = 1.0 / scale, torch.iinfo(qdtype).min, torch.iinfo(qdtype).max
        if residual is not None:
            residual = residual.contiguous(memory_format=cl)
        dummy = self.colsum
        epilogue = (self.colsum, self.scale, self.bias if self.bias is not None else dummy,
                    residual if residual is not None else dummy,
                    y if y is not None else dummy, q if q is not None else xs)
        flags = dict(U8=u8, HAS_B=self.bias is not None, HAS_R=residual is not None,
                     RELU=post_op == "relu", HAS_Y=y is not None, HAS_Q=q is not None)
        tma = self.tma_layout(x, x_zero_point)
        if m and self.cout and tma is not None:
            spatial = tma == "spatial"
            xd = TensorDescriptor.from_tensor(xs.permute(0, 2, 3, 1), [1, 1, 1, 16]) \
                if spatial else TensorDescriptor.from_tensor(xs.permute(0, 2, 3, 1).reshape(
                    m, self.cin), [1, 16])  # block shapes: set per config (_tma_blocks)
            wd = TensorDescriptor.from_tensor(self.matrix, [1, 16])
            grid = lambda meta: (  # noqa: E731
                (n * triton.cdiv(oh, meta["BLOCK_M"] // meta["BLOCK_W"])
                 * triton.cdiv(ow, meta["BLOCK_W"])) if spatial
                else triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(self.cout, meta["BLOCK_N"]))
            _conv_int8_tma[grid](xd, wd, *epilogue, m, self.cin, oh, ow, self.cout,
                                 ph, pw, dh, dw, float(zp), inv, float(ozp), float(qmin),
                                 float(qmax), KH=self.kh, KW=self.kw, SPATIAL=spatial, **flags)
        elif m and self.cout and self.kpad is not None:  # patches, then a 1x1 convolution
            cols = torch.empty((n, oh, ow, self.kpad), dtype=xs.dtype, device=x.device)
            _im2col[(triton.cdiv(m, 128), triton.cdiv(self.kpad, 32))](
                xs, cols, m, h, w, self.cin, oh, ow, k, self.kpad, sh, sw, ph, pw, dh, dw, pad,
                KW=self.kw, BLOCK_M=128, BLOCK_K=32, num_warps=4)
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),  # noqa: E731
                                 triton.cdiv(self.cout, meta["BLOCK_N"]))
            _conv_int8[grid](
                cols, self.patch_matrix, *epilogue,
                m, oh, ow, self.kpad, oh, ow, self.cout, self.kpad, 1, 1, 0, 0, 1, 1,
                pad, float(zp), inv, float(ozp), float(qmin), float(qmax),
                KH=1, KW=1, FLAT=False, **flags)
        elif m and self.cout:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),  # noqa: E731
                                 triton.cdiv(self.cout, meta["BLOCK_N"]))
            _conv_int8[grid](
                xs, self.matrix, *epilogue,
                m, h, w, self.cin, oh, ow, self.cout, k, sh, sw, ph, pw, dh, dw,
                pad, float(zp), inv, float(ozp), float(qmin), float(qmax),
                KH=self.kh, KW=self.kw, FLAT=self.cin < 32, **flags)
        return y, q

    def tma_layout(self, x: torch.Tensor, x_zero_point: int) -> str | None:
        """Whether the descriptor kernel takes ``x``: "spatial" (a KxK stride-1 convolution
        where TMA's zero fill is the zero point as stored, or without padding), or None
        (the pointer kernel). TMA needs 16-byte aligned rows. Timed layer by layer on an
        H100 (ResNet-50 at batch 256, int8): spatial tiles 1.1-1.2x the pointer kernel
        on 3x3 layers of 128-512 channels, 0.71x at 64 channels; 1x1 layers through the
        kernel's GEMM form 0.65-1.07x, so they keep the pointer kernel (``tma_gemm`` and
        ``tma_min_channels`` change both choices, for tests and experiments)."""
        if TensorDescriptor is None or not (x.is_cuda or _INTERPRET) or self.stride != (1, 1) \
                or self.cin % 16 or x.data_ptr() % 16:
            return None
        if self.kh == self.kw == 1 and self.padding == (0, 0):
            return "gemm" if self.tma_gemm else None
        if self.cin < self.tma_min_channels:
            return None
        return "spatial" if _stored(x.dtype, x_zero_point) == 0 or self.padding == (0, 0) \
            else None
