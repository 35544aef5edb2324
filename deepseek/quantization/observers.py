"""The arithmetic of quantization (pure functions) and the activation calibrators.

Conventions (the NumPy reference in tests/test_quant_formulae.py restates them):

- ``symmetric``: zero point 0, ``scale = amax / qmax`` with ``qmax = 2**(bits-1) - 1``.
  Weights use ``[-qmax, qmax]``; activations use the int8 container's full
  ``[-qmax - 1, qmax]`` (so an output quantizer can be fused into a kernel).
- ``asymmetric``: the range is widened to hold 0, ``scale = (max - min) / (qmax - qmin)``,
  ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)``. Activations are
  unsigned (``[0, 2**bits - 1]``, uint8), weights signed (``[-2**(bits-1), 2**(bits-1) - 1]``).
- ``quantize(x) = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax)``, rounding half
  to even, in float32 (what ``quantized_decomposed.quantize_per_tensor`` computes);
  ``dequantize(q) = (q - zero_point) * scale``. Scales are at least float32 eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = torch.finfo(torch.float32).eps
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")


@dataclass(frozen=True)
class QRange:
    """The integer range of one quantized tensor and the dtype that holds it."""

    qmin: int
    qmax: int
    dtype: torch.dtype


def qrange(bits: int, symmetric: bool, weight: bool) -> QRange:
    """The integer range for ``bits`` (2..8) under the conventions above."""
    half = 2 ** (bits - 1)
    if symmetric:
        return QRange(-(half - 1) if weight else -half, half - 1, torch.int8)
    if weight:
        return QRange(-half, half - 1, torch.int8)
    return QRange(0, 2 ** bits - 1, torch.uint8)


def choose_qparams(min_val: torch.Tensor, max_val: torch.Tensor, r: QRange,
                   symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) for ranges ``[min_val, max_val]`` (any shape)."""
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    lo = torch.minimum(min_val, torch.zeros_like(min_val))
    hi = torch.maximum(max_val, torch.zeros_like(max_val))
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.clamp(amax / r.qmax, min=EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((hi - lo) / (r.qmax - r.qmin), min=EPS)
    zp = torch.clamp(r.qmin - torch.round(lo / scale), r.qmin, r.qmax).to(torch.int32)
    return scale, zp


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
             r: QRange) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point)`` with broadcasting scale/zero point."""
    q = torch.round(x.float() * (1.0 / scale)) + zero_point
    return torch.clamp(q, r.qmin, r.qmax).to(r.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, r: QRange):
    return dequantize(quantize(x, scale, zero_point, r), scale, zero_point)


# --- weights -------------------------------------------------------------------------
def weight_ranges(w: torch.Tensor, granularity: str, group_size: int = 128):
    """(min, max) per tensor ([1]), per output channel ([N]) or per group ([N, K/g])."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    if granularity == "per_tensor":
        return w2.min().reshape(1), w2.max().reshape(1)
    if granularity == "per_channel":
        return w2.amin(1), w2.amax(1)
    g = w2.reshape(w2.shape[0], -1, group_size)
    return g.amin(-1), g.amax(-1)


def weight_qparams(w: torch.Tensor, r: QRange, symmetric: bool, granularity: str,
                   group_size: int = 128, search: str = "minmax"):
    """Scale and zero point of a weight; ``search="mse"`` shrinks each range to the
    clipping (from 100% down to 50% in 1% steps) with the least squared error."""
    lo, hi = weight_ranges(w, granularity, group_size)
    if search != "mse":
        return choose_qparams(lo, hi, r, symmetric)
    w2 = w.detach().float().reshape(w.shape[0], -1)
    rows = {"per_tensor": w2.reshape(1, -1), "per_channel": w2}.get(granularity)
    if rows is None:
        rows = w2.reshape(-1, group_size)
    lo_f, hi_f = lo.reshape(-1, 1), hi.reshape(-1, 1)
    best_err = torch.full_like(lo_f, float("inf"))
    best = choose_qparams(lo_f, hi_f, r, symmetric)
    for i in range(51):
        ratio = 1.0 - 0.01 * i
        s, z = choose_qparams(lo_f * ratio, hi_f * ratio, r, symmetric)
        err = (fake_quantize(rows, s, z, r) - rows).pow(2).sum(1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, s, best[0]), torch.where(better, z, best[1]))
    return best[0].reshape(lo.shape), best[1].reshape(lo.shape)


# --- activation calibrators ----------------------------------------------------------
class Calibrator:
    """Collects statistics of one activation over calibration batches; ``qparams()``
    returns its (scale, zero_point) as one-element tensors."""

    def __init__(self, r: QRange, symmetric: bool):
        self.r = r
        self.symmetric = symmetric
        self.min = math.inf
        self.max = -math.inf

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.numel():
            self.min = min(self.min, float(x.min()))
            self.max = max(self.max, float(x.max()))

    def range(self) -> tuple[float, float]:
        return (self.min, self.max) if self.min <= self.max else (0.0, 0.0)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        s, z = choose_qparams(torch.tensor([lo]), torch.tensor([hi]), self.r, self.symmetric)
        return s, z


class MinMaxCalibrator(Calibrator):
    """The observed minimum and maximum."""


class PercentileCalibrator(Calibrator):
    """The ``percentile``-th percentile of |x| (symmetric) or the (100 - p, p) percentiles
    of x (asymmetric), over the observed values; batches are subsampled to at most
    ``max_values`` values each (with a fixed seed) to bound memory."""

    def __init__(self, r: QRange, symmetric: bool, percentile: float = 99.99,
                 max_values: int = 1 << 20):
        super().__init__(r, symmetric)
        self.percentile = percentile
        self.max_values = max_values
        self.samples: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(0)

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        flat = x.detach().float().reshape(-1)
        if flat.numel() > self.max_values:
            flat = flat[torch.randperm(flat.numel(), generator=self.gen)[:self.max_values]]
        self.samples.append(flat.clone())

    def range(self) -> tuple[float, float]:
        if not self.samples:
            return 0.0, 0.0
        v = torch.cat(self.samples).double()
        if v.numel() > 1 << 24:  # torch.quantile's limit
            v = v[torch.randperm(v.numel(), generator=self.gen)[:1 << 24]]
        p = self.percentile / 100
        if self.symmetric:
            t = float(torch.quantile(v.abs(), p))
            return -t, t
        return float(torch.quantile(v, 1 - p)), float(torch.quantile(v, p))


class HistogramCalibrator(Calibrator):
    """Histograms of the positive values and of |negative values| over ``[0, R]`` with
    ``bins`` bins each (exact zeros, as ReLU makes, are left out: zero is represented
    exactly). When a batch exceeds R, R doubles and pairs of bins merge, so the bin
    edges stay exact. Each side is clipped on its own histogram; a symmetric
    range takes the larger threshold."""

    def __init__(self, r: QRange, symmetric: bool, bins: int = 2048):
        super().__init__(r, symmetric)
        self.bins = bins
        self.pos = torch.zeros(bins, dtype=torch.float64)
        self.neg = torch.zeros(bins, dtype=torch.float64)
        self.limit = 0.0

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        x = x.detach().float().reshape(-1)
        if not x.numel():
            return
        amax = float(x.abs().max())
        if self.limit == 0.0:
            self.limit = amax if amax > 0 else 1.0
        while amax > self.limit:
            half = torch.zeros(self.bins // 2, dtype=torch.float64)
            self.pos = torch.cat([self.pos.reshape(-1, 2).sum(1), half])
            self.neg = torch.cat([self.neg.reshape(-1, 2).sum(1), half])
            self.limit *= 2
        self.pos += torch.histc(x[x > 0], self.bins, 0.0, self.limit).double()
        self.neg += torch.histc(-x[x < 0], self.bins, 0.0, self.limit).double()

    def side_levels(self) -> int:
        """Quantization levels one side gets: all for one-sided data, else half."""
        n = self.r.qmax - self.r.qmin + 1
        one_sided = not (self.pos.sum() > 0 and self.neg.sum() > 0)
        return n if one_sided and not self.symmetric else n // 2

    def threshold(self, hist: torch.Tensor, levels: int) -> float:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        lo, hi = super().range()
        if self.limit == 0.0:
            return lo, hi
        levels = self.side_levels()
        t_pos = self.threshold(self.pos, levels) if self.pos.sum() > 0 else 0.0
        t_neg = self.threshold(self.neg, levels) if self.neg.sum() > 0 else 0.0
        if self.symmetric:
            t_pos = t_neg = max(t_pos, t_neg)
        return max(lo, -t_neg), min(hi, t_pos)


class EntropyCalibrator(HistogramCalibrator):
    """TensorRT's entropy calibration, per side: the clipping threshold minimizing
    KL(P || Q), where P is the histogram clipped at the threshold (outliers added
    to the last bin) and Q is P merged into the quantization levels and expanded
    back over P's non-empty bins (see :func:`entropy_threshold`)."""

    def threshold(self, hist: torch.Tensor, levels: int) -> float:
        return entropy_threshold(hist.numpy(), self.limit, levels)


def entropy_threshold(hist, limit: float, levels: int) -> float:
    """The KL-optimal clipping threshold for a histogram of |x| over ``[0, limit]``.

    For each candidate count ``i`` of kept bins (``levels`` .. all): P is
    ``hist[:i]`` with the outliers ``hist[i:]`` added to its last bin; bin ``j``
    falls in level ``floor(j * levels / i)``, and Q spreads each level's sum of
    ``hist[:i]`` evenly over that level's non-empty bins. The threshold is the
    upper edge of the last kept bin, ``i * limit / bins``.
    """
    import numpy as np

    hist = np.asarray(hist, dtype=np.float64)
    bins = len(hist)
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = hist[i:].sum()
    best, best_i = math.inf, bins
    for i in range(min(levels, bins), bins + 1):
        kept = hist[:i]
        p = kept.copy()
        p[-1] += tail[i]
        level = (np.arange(i) * levels) // i
        nonzero = (kept > 0).astype(np.float64)
        sums = np.bincount(level, weights=kept, minlength=levels)
        counts = np.bincount(level, weights=nonzero, minlength=levels)
        q = np.where(nonzero > 0, sums[level] / np.maximum(counts[level], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        pn, qn = p / ps, q / qs
        mask = pn > 0
        if np.any(qn[mask] == 0):
            continue  # P has mass where Q has none: infinite divergence
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
        if kl < best:
            best, best_i = kl, i
    return best_i * limit / bins


class MSECalibrator(HistogramCalibrator):
    """Per side, the clipping threshold (a fraction 1.00, 0.99, ... 0.20 of that side's
    maximum) whose quantization error, summed over the histogram with each bin at its
    centre, is least (the error of clipped values included)."""

    def threshold(self, hist: torch.Tensor, levels: int) -> float:
        centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * (self.limit / self.bins)
        top = float(centres[hist > 0].max()) + 0.5 * self.limit / self.bins
        t = top * (1.0 - 0.01 * torch.arange(81, dtype=torch.float64)).reshape(-1, 1)
        step = t / (levels - 1)  # a side's uniform grid of ``levels`` values over [0, t]
        q = torch.clamp(torch.round(centres / step), 0, levels - 1) * step
        err = (hist * (q - centres) ** 2).sum(1)
        return float(t[int(torch.argmin(err))])


def make_calibrator(kind: str, r: QRange, symmetric: bool, percentile: float = 99.99) -> Calibrator:
    if kind == "minmax":
        return MinMaxCalibrator(r, symmetric)
    if kind == "percentile":
        return PercentileCalibrator(r, symmetric, percentile)
    if kind == "entropy":
        return EntropyCalibrator(r, symmetric)
    if kind == "mse":
        return MSECalibrator(r, symmetric)
    raise ValueError(f"unknown calibrator {kind!r}; choose one of {CALIBRATORS}")
