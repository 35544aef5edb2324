"""RNN, GRU and LSTM, unrolled over a static sequence length into GEMMs and activations.

Follows the ONNX definitions: gate orders (LSTM ``iofc``, GRU ``zrh``), biases
``Wb``/``Rb``, peepholes, ``clip``, ``input_forget``, ``linear_before_reset``,
custom activations with alpha/beta, forward/reverse/bidirectional, both
layouts, and ``sequence_lens`` (steps past a sequence's length leave its state
unchanged and output zeros).
"""

from __future__ import annotations

import torch

from deepseek.frontend.onnx_import import onnx_op
from deepseek.frontend.onnx_ops.common import scalar
from deepseek.ir.ops import Op

MAX_STEPS = 4096

_DEFAULTS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
# alpha, beta defaults of the activations that take them
_AB = {"LeakyRelu": (0.01, None), "ThresholdedRelu": (1.0, None), "ScaledTanh": (1.0, 1.0),
       "HardSigmoid": (0.2, 0.5), "Elu": (1.0, None), "Affine": (1.0, 0.0)}


def _activation(n, name: str, alpha, beta):
    dt_of = lambda v: v.spec.dtype  # noqa: E731
    name_l = name.lower()
    a0, b0 = _AB.get({k.lower(): k for k in _AB}.get(name_l, ""), (None, None))
    alpha = a0 if alpha is None else alpha
    beta = b0 if beta is None else beta

    def f(v):
        dt = dt_of(v)
        if name_l == "sigmoid":
            return n.emit(Op.SIGMOID, [v])
        if name_l == "tanh":
            return n.emit(Op.TANH, [v])
        if name_l == "relu":
            return n.emit(Op.RELU, [v])
        if name_l == "leakyrelu":
            return n.emit(Op.LEAKY_RELU, [v], {"negative_slope": alpha})
        if name_l == "thresholdedrelu":
            return n.emit(Op.WHERE_SELF, [n.emit(Op.GT_TENSOR, [v, scalar(n, alpha, dt)]), v,
                                          scalar(n, 0, dt)])
        if name_l == "scaledtanh":
            return n.emit(Op.MUL_TENSOR, [n.emit(Op.TANH, [n.emit(Op.MUL_TENSOR, [v, scalar(n, beta, dt)])]),
                                          scalar(n, alpha, dt)])
        if name_l == "hardsigmoid":
            y = n.emit(Op.ADD_TENSOR, [n.emit(Op.MUL_TENSOR, [v, scalar(n, alpha, dt)]), scalar(n, beta, dt)])
            return n.emit(Op.CLAMP, [y], {"min": 0.0, "max": 1.0})
        if name_l == "elu":
            return n.emit(Op.ELU, [v], {"alpha": alpha})
        if name_l == "softsign":
            return n.emit(Op.DIV_TENSOR, [v, n.emit(Op.ADD_TENSOR, [n.emit(Op.ABS, [v]), scalar(n, 1, dt)])])
        if name_l == "softplus":
            return n.emit(Op.SOFTPLUS, [v], {"beta": 1, "threshold": 1e9})
        if name_l == "affine":
            return n.emit(Op.ADD_TENSOR, [n.emit(Op.MUL_TENSOR, [v, scalar(n, alpha, dt)]), scalar(n, beta, dt)])
        raise n.fail(f"activation {name!r} is not supported")
    return f


def _sel(n, v, dim, i):
    return n.emit(Op.SELECT_INT, [v], {"dim": dim, "index": i})


def _chunks(n, v, k, dim):
    if k == 1:
        return [v]
    return list(n.emit(Op.SPLIT_WITH_SIZES, [v], {"split_sizes": [n.shape(v)[dim] // k] * k, "dim": dim}))


@onnx_op("RNN", "GRU", "LSTM")
def rnn(n):
    kind = n.op_type
    x, W, R = n.x(0), n.x(1), n.x(2)
    B = n.opt(3)
    lens = n.opt(4)
    h0 = n.opt(5)
    c0 = n.opt(6) if kind == "LSTM" else None
    P = n.opt(7) if kind == "LSTM" else None
    layout = n.attr("layout", 0)
    if layout:
        x = n.emit(Op.PERMUTE, [x], {"dims": [1, 0, 2]})
    T, batch, _ = n.shape(x)
    if not isinstance(T, int):
        raise n.fail("recurrent ops need a static sequence length")
    if T > MAX_STEPS:
        raise n.fail(f"sequences longer than {MAX_STEPS} steps are not unrolled")
    H = n.attr("hidden_size") or n.shape(R)[-1]
    direction = n.attr("direction", "forward")
    dirs = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(direction)
    if dirs is None:
        raise n.bad(f"unknown direction {direction!r}")
    names = n.attr("activations") or _DEFAULTS[kind] * len(dirs)
    alphas = n.attr("activation_alpha") or []
    betas = n.attr("activation_beta") or []
    per_dir = len(_DEFAULTS[kind])
    clip = n.attr("clip")
    dt = x.spec.dtype
    mask_steps = None
    if lens is not None:
        lens64 = n.emit(Op.TO_COPY, [lens], {"dtype": torch.int64}) if lens.spec.dtype != torch.int64 else lens
        mask_steps = [n.emit(Op.UNSQUEEZE, [n.emit(Op.GT_TENSOR, [lens64, scalar(n, t, torch.int64)])], {"dim": 1})
                      for t in range(T)]
    ys, hs, cs = [], [], []
    for d, reverse in enumerate(dirs):
        acts = [_activation(n, names[d * per_dir + j],
                            alphas[d * per_dir + j] if d * per_dir + j < len(alphas) else None,
                            betas[d * per_dir + j] if d * per_dir + j < len(betas) else None)
                for j in range(per_dir)]
        w, r = _sel(n, W, 0, d), _sel(n, R, 0, d)
        wt = n.emit(Op.PERMUTE, [w], {"dims": [1, 0]})
        rt = n.emit(Op.PERMUTE, [r], {"dims": [1, 0]})
        wb = rb = None
        if B is not None:
            b = _sel(n, B, 0, d)
            wb, rb = _chunks(n, b, 2, 0)
        zeros = n.emit(Op.FULL, [], {"size": [batch, H], "fill_value": 0.0, "dtype": dt})
        h = _sel(n, h0, 0, d) if h0 is not None else zeros
        c = _sel(n, c0, 0, d) if c0 is not None else zeros
        peep = _chunks(n, _sel(n, P, 0, d), 3, 0) if P is not None else None
        out = [None] * T
        # input projections of all steps at once: [T, batch, G*H]
        xw = n.emit(Op.MATMUL, [x, wt])
        if wb is not None:
            xw = n.emit(Op.ADD_TENSOR, [xw, wb])
        order = range(T - 1, -1, -1) if reverse else range(T)
        for t in order:
            xt = _sel(n, xw, 0, t)
            if kind == "GRU":
                xz, xr, xh = _chunks(n, xt, 3, 1)
                rz, rr, rh = _chunks(n, rt, 3, 1)
                bz = br = bh = None
                if rb is not None:
                    bz, br, bh = _chunks(n, rb, 3, 0)
                f, g = acts

                def gate(xg, rg, bg, hin):
                    v = n.emit(Op.ADD_TENSOR, [xg, n.emit(Op.MATMUL, [hin, rg])])
                    return n.emit(Op.ADD_TENSOR, [v, bg]) if bg is not None else v
                z = f(_clipped(n, gate(xz, rz, bz, h), clip))
                rr_ = f(_clipped(n, gate(xr, rr, br, h), clip))
                if n.attr("linear_before_reset", 0):
                    hr = n.emit(Op.MATMUL, [h, rh])
                    if bh is not None:
                        hr = n.emit(Op.ADD_TENSOR, [hr, bh])
                    ht = g(_clipped(n, n.emit(Op.ADD_TENSOR, [xh, n.emit(Op.MUL_TENSOR, [rr_, hr])]), clip))
                else:
                    ht = g(_clipped(n, gate(xh, rh, bh, n.emit(Op.MUL_TENSOR, [rr_, h])), clip))
                one_minus = n.emit(Op.SUB_TENSOR, [scalar(n, 1, dt), z])
                h_new = n.emit(Op.ADD_TENSOR, [n.emit(Op.MUL_TENSOR, [one_minus, ht]),
                                               n.emit(Op.MUL_TENSOR, [z, h])])
                c_new = c
            else:
                pre = n.emit(Op.ADD_TENSOR, [xt, n.emit(Op.MATMUL, [h, rt])])
                if rb is not None:
                    pre = n.emit(Op.ADD_TENSOR, [pre, rb])
                if kind == "RNN":
                    h_new = acts[0](_clipped(n, pre, clip))
                    c_new = c
                else:
                    f, g, hact = acts
                    gi, go, gf, gc = _chunks(n, pre, 4, 1)
                    if peep is not None:
                        pi, po, pf = peep
                        gi = n.emit(Op.ADD_TENSOR, [gi, n.emit(Op.MUL_TENSOR, [pi, c])])
                        gf = n.emit(Op.ADD_TENSOR, [gf, n.emit(Op.MUL_TENSOR, [pf, c])])
                    i_g = f(_clipped(n, gi, clip))
                    f_g = f(_clipped(n, gf, clip))
                    if n.attr("input_forget", 0):
                        f_g = n.emit(Op.SUB_TENSOR, [scalar(n, 1, dt), i_g])
                    c_t = g(_clipped(n, gc, clip))
                    c_new = n.emit(Op.ADD_TENSOR, [n.emit(Op.MUL_TENSOR, [f_g, c]),
                                                   n.emit(Op.MUL_TENSOR, [i_g, c_t])])
                    if peep is not None:
                        go = n.emit(Op.ADD_TENSOR, [go, n.emit(Op.MUL_TENSOR, [po, c_new])])
                    o_g = f(_clipped(n, go, clip))
                    h_new = n.emit(Op.MUL_TENSOR, [o_g, hact(c_new)])
            if mask_steps is not None:
                m = mask_steps[t]
                h = n.emit(Op.WHERE_SELF, [m, h_new, h])
                c = n.emit(Op.WHERE_SELF, [m, c_new, c])
                out[t] = n.emit(Op.WHERE_SELF, [m, h_new, scalar(n, 0, dt)])
            else:
                h, c = h_new, c_new
                out[t] = h_new
        ys.append(n.emit(Op.STACK, out, {"dim": 0}))
        hs.append(h)
        cs.append(c)
    Y = n.emit(Op.STACK, ys, {"dim": 1})  # [T, dirs, batch, H]
    Yh = n.emit(Op.STACK, hs, {"dim": 0})
    Yc = n.emit(Op.STACK, cs, {"dim": 0})
    if layout:
        Y = n.emit(Op.PERMUTE, [Y], {"dims": [2, 0, 1, 3]})
        Yh = n.emit(Op.PERMUTE, [Yh], {"dims": [1, 0, 2]})
        Yc = n.emit(Op.PERMUTE, [Yc], {"dims": [1, 0, 2]})
    return [Y, Yh, Yc] if kind == "LSTM" else [Y, Yh]


def _clipped(n, v, clip):
    if clip is None:
        return v
    return n.emit(Op.CLAMP, [v], {"min": -float(clip), "max": float(clip)})
