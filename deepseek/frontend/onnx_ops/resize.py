"""Resize and Upsample.

Resizing is separable, so each resized axis is handled on its own with
per-axis tables computed at import (static sizes):

* ``nearest``: an ``index_select`` with the source index of every output
  position (exact for every dtype);
* ``linear`` / ``cubic``: the interpolation as a dense (in x out) weight matrix
  applied with a matmul, built exactly as the ONNX specification computes its
  taps (every coordinate transformation mode, ``exclude_outside``,
  ``antialias``, ``tf_crop_and_resize`` with its extrapolation value).

The common cases of real models (2-D bilinear/bicubic with half_pixel or
align_corners) use PyTorch's upsample kernels instead.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from deepseek.frontend.onnx_import import onnx_op
from deepseek.frontend.onnx_ops.common import FLOATS, cast
from deepseek.ir.ops import Op


def _source_coords(mode: str, out: int, in_w: int, scale: float, roi) -> tuple[np.ndarray, np.ndarray | None]:
    y = np.arange(out, dtype=np.float64)
    out_w = scale * in_w
    extrap = None
    if mode == "align_corners":
        x = np.zeros(out) if out_w == 1 else y * (in_w - 1) / (out_w - 1)
    elif mode == "asymmetric":
        x = y / scale
    elif mode == "tf_crop_and_resize":
        if out_w == 1:
            x = np.full(out, (roi[1] - roi[0]) * (in_w - 1) / 2)
        else:
            x = y * (roi[1] - roi[0]) * (in_w - 1) / (out_w - 1)
        x = x + roi[0] * (in_w - 1)
        extrap = (x < 0) | (x > in_w - 1)
    elif mode == "pytorch_half_pixel":
        x = np.full(out, -0.5) if out_w == 1 else (y + 0.5) / scale - 0.5
    elif mode == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif mode == "half_pixel_symmetric":
        adjustment = out / out_w
        x = in_w / 2 * (1 - adjustment) + (y + 0.5) / scale - 0.5
    else:
        raise ValueError(f"unknown coordinate_transformation_mode {mode!r}")
    return x, extrap


def _nearest(ratio: float, mode: str) -> list[float]:
    if float(ratio).is_integer():
        return [0, 1]
    if mode == "round_prefer_floor":
        return [ratio <= 0.5, ratio > 0.5]
    if mode == "round_prefer_ceil":
        return [ratio < 0.5, ratio >= 0.5]
    if mode == "floor":
        return [1, 0]
    if mode == "ceil":
        return [0, 1]
    raise ValueError(f"unknown nearest_mode {mode!r}")


def _cubic(ratio: float, A: float) -> list[float]:
    r = ratio
    return [((A * (r + 1) - 5 * A) * (r + 1) + 8 * A) * (r + 1) - 4 * A,
            ((A + 2) * r - (A + 3)) * r * r + 1,
            ((A + 2) * (1 - r) - (A + 3)) * (1 - r) * (1 - r) + 1,
            ((A * ((1 - r) + 1) - 5 * A) * ((1 - r) + 1) + 8 * A) * ((1 - r) + 1) - 4 * A]


def _cubic_aa(ratio: float, scale: float, A: float) -> list[float]:
    scale = min(scale, 1.0)

    def c(x):
        x = abs(x)
        if x <= 1:
            return (A + 2) * x ** 3 - (A + 3) * x ** 2 + 1
        if x < 2:
            return A * x ** 3 - 5 * A * x ** 2 + 8 * A * x - 4 * A
        return 0.0

    start = int(np.floor(-2 / scale) + 1)
    vals = [c(scale * (i - ratio)) for i in range(start, 2 - start)]
    s = sum(vals)
    return [v / s for v in vals]


def _linear_aa(ratio: float, scale: float) -> list[float]:
    scale = min(scale, 1.0)
    start = int(np.floor(-1 / scale) + 1)
    args = (np.arange(start, start + 2 - 2 * start) - ratio) * scale
    vals = np.clip(1 - np.abs(args), 0, 1)
    return list(vals / vals.sum())


def axis_weights(in_w: int, out: int, scale: float, mode: str, coord: str, roi, *, nearest_mode="round_prefer_floor",
                 cubic_a=-0.75, exclude_outside=False, antialias=False):
    """(W, extrapolated): the out x in matrix of one axis' interpolation (ONNX semantics)."""
    x, extrap = _source_coords(coord, out, in_w, scale, roi)
    xi = np.floor(x).astype(np.int64)
    ratios = np.where(x == xi, 1.0, x - xi)

    def taps(r):
        if mode == "nearest":
            return _nearest(r, nearest_mode)
        if mode == "linear":
            return _linear_aa(r, scale) if antialias else [1 - r, r]
        return _cubic_aa(r, scale, cubic_a) if antialias else _cubic(r, cubic_a)

    coeffs = np.array([taps(float(r)) for r in ratios], dtype=np.float64).reshape(out, -1)
    n = coeffs.shape[1] if out else 2
    pad = int(np.ceil(n / 2))
    xp = x + pad
    p = np.floor(xp).astype(np.int64)
    frac = xp - p
    if n % 2 == 0:
        off = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        base = -((n - 1) // 2)
        off = np.where(frac <= 0.5, base, base + 1)
    idx = (p + off)[:, None] + np.arange(n)[None, :] - pad
    if exclude_outside:
        coeffs = np.where((idx < 0) | (idx >= in_w), 0.0, coeffs)
        s = coeffs.sum(axis=-1, keepdims=True)
        coeffs = coeffs / np.where(s == 0, 1.0, s)
    idx = np.clip(idx, 0, in_w - 1)
    W = np.zeros((out, in_w), dtype=np.float64)
    for k in range(n):
        np.add.at(W, (np.arange(out), idx[:, k]), coeffs[:, k])
    if extrap is not None:
        W[extrap] = 0.0
    return W, extrap


def _resize_axis(n, x, axis: int, W: np.ndarray, extrap, extrap_value: float, nearest: bool):
    dt = x.spec.dtype
    if nearest:
        src = W.argmax(axis=1)
        y = n.emit(Op.INDEX_SELECT, [x, n.const(torch.tensor(src, dtype=torch.int64))], {"dim": axis})
    else:
        work = dt if dt in FLOATS and dt != torch.float16 and dt != torch.bfloat16 else torch.float32
        rank = n.rank(x)
        perm = [d for d in range(rank) if d != axis] + [axis]
        inv = [perm.index(d) for d in range(rank)]
        xt = n.emit(Op.PERMUTE, [cast(n, x, work)], {"dims": perm})
        y = n.emit(Op.MATMUL, [xt, n.const(torch.tensor(W.T.copy(), dtype=work))])
        y = n.emit(Op.PERMUTE, [y], {"dims": inv})
        if dt not in FLOATS:
            info = torch.iinfo(dt)
            y = n.emit(Op.CLAMP, [n.emit(Op.ROUND, [y])], {"min": float(info.min), "max": float(info.max)})
        y = cast(n, y, dt)
    if extrap is not None and extrap.any():
        shape = [1] * n.rank(y)
        shape[axis] = len(extrap)
        mask = n.const(torch.tensor(extrap).reshape(shape))
        y = n.emit(Op.WHERE_SELF, [mask, n.const(torch.tensor(extrap_value, dtype=dt)), y])
    return y


@onnx_op("Resize", "Upsample")
def resize(n):
    x = n.x(0)
    shape = n.shape(x)
    r = len(shape)
    mode = n.attr("mode", "nearest")
    if n.op_type == "Upsample" or n.opset < 11:
        scales = [float(v) for v in (n.attr("scales") if n.opset < 9 and n.op_type == "Upsample"
                                     else _floats(n, 1))]
        sizes, roi, axes = None, None, None
        coord = "asymmetric"
        nearest_mode = "floor" if n.op_type == "Upsample" or n.opset < 11 else "round_prefer_floor"
        mode = "linear" if mode in ("bilinear", "linear") else mode
    else:
        roi = _floats(n, 1) if n.has(1) else None
        scales = _floats(n, 2) if n.has(2) else None
        sizes = n.ints(3, "sizes") if n.has(3) else None
        if scales is not None and len(scales) == 0:
            scales = None
        if sizes is not None and len(sizes) == 0:
            sizes = None
        axes = n.attr("axes")
        coord = n.attr("coordinate_transformation_mode", "half_pixel")
        nearest_mode = n.attr("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear", "cubic"):
        raise n.fail(f"mode {mode!r} is not supported")
    axes = [a % r for a in axes] if axes else list(range(r))
    if roi is not None and len(roi) == 0:
        roi = None
    full_roi = None
    if roi is not None:
        full_roi = [0.0] * r + [1.0] * r
        for i, a in enumerate(axes):
            full_roi[a], full_roi[r + a] = roi[i], roi[len(axes) + i]
    scale_f = [1.0] * r
    out = list(shape)
    if sizes is not None:
        if len(sizes) != len(axes):
            raise n.bad(f"sizes {sizes} must have one entry per axis {axes}")
        for i, a in enumerate(axes):
            if not isinstance(sizes[i], int) or not isinstance(shape[a], int):
                if sizes[i] is shape[a] or str(sizes[i]) == str(shape[a]):
                    continue  # a symbolic dim kept as it is
                raise n.fail("Resize of a symbolic dim is not supported")
            out[a] = int(sizes[i])
            scale_f[a] = sizes[i] / shape[a] if shape[a] else 1.0
        policy = n.attr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            s = pick(scale_f[a] for a in axes)
            for a in axes:
                scale_f[a] = s
                out[a] = int(s * shape[a] + 0.5)
    elif scales is not None:
        if len(scales) != len(axes):
            raise n.bad(f"scales {scales} must have one entry per axis {axes}")
        for i, a in enumerate(axes):
            if scales[i] <= 0:
                raise n.bad(f"scales must be positive, got {scales}")
            scale_f[a] = scales[i]
            if not isinstance(shape[a], int):
                if scales[i] != 1.0:
                    raise n.fail("Resize of a symbolic dim is not supported")
                continue
            out[a] = int(math.floor(scales[i] * shape[a]))
    else:
        raise n.bad("needs scales or sizes")
    if n.attr("antialias", 0) and mode == "nearest":
        raise n.bad("antialias is not defined for nearest mode")
    fast = _fast_path(n, x, shape, out, scale_f, mode, coord, full_roi, sizes is not None)
    if fast is not None:
        return [fast]
    y = x
    for a in range(r):
        if not isinstance(shape[a], int):
            continue
        identity = math.isclose(scale_f[a], 1.0) and out[a] == shape[a] and (
            full_roi is None or (math.isclose(full_roi[a], 0.0) and math.isclose(full_roi[a + r], 1.0)))
        if identity:
            continue
        axis_roi = None if full_roi is None else [full_roi[a], full_roi[a + r]]
        n.budget(shape[a], out[a], what="a resize table")
        if coord == "tf_crop_and_resize" and axis_roi is None:
            raise n.bad("tf_crop_and_resize needs roi")
        W, extrap = axis_weights(shape[a], out[a], scale_f[a], mode, coord, axis_roi,
                                 nearest_mode=nearest_mode, cubic_a=n.attr("cubic_coeff_a", -0.75),
                                 exclude_outside=bool(n.attr("exclude_outside", 0)),
                                 antialias=bool(n.attr("antialias", 0)))
        y = _resize_axis(n, y, a, W, extrap, n.attr("extrapolation_value", 0.0), mode == "nearest")
    return [y]


def _floats(n, i: int) -> list[float]:
    k = n.known(i)
    if not isinstance(k, torch.Tensor):
        n.imp.needs_value(n.node.input[i])
        raise n.fail(f"input {i} (roi/scales) must be known when the model is imported")
    return [float(v) for v in k.reshape(-1).tolist()]


def _fast_path(n, x, shape, out, scale_f, mode, coord, roi, by_size):
    """PyTorch's 2-D upsample kernels where they compute exactly the ONNX result."""
    if len(shape) != 4 or out[:2] != shape[:2] or scale_f[:2] != [1.0, 1.0] or roi is not None:
        return None
    if not all(isinstance(d, int) for d in shape[2:] + out[2:]):
        return None
    if n.attr("antialias", 0) or n.attr("exclude_outside", 0) or x.spec.dtype != torch.float32:
        return None
    if mode == "cubic" and n.attr("cubic_coeff_a", -0.75) != -0.75:
        return None
    if mode not in ("linear", "cubic") or min(out[2:]) < 2 or min(shape[2:]) < 2:
        return None
    if coord in ("half_pixel", "pytorch_half_pixel"):
        align = False
    elif coord == "align_corners" and mode == "linear":
        align = True
    else:
        return None
    op = Op.UPSAMPLE_BILINEAR2D_VEC if mode == "linear" else Op.UPSAMPLE_BICUBIC2D_VEC
    if by_size or align:
        return n.emit(op, [x], {"output_size": out[2:], "align_corners": align, "scale_factors": None})
    return n.emit(op, [x], {"output_size": None, "align_corners": align, "scale_factors": scale_f[2:]})
