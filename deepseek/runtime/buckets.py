"""Shape buckets: a batch of any size runs on the plan made for the next power of two.

A backend that captures one CUDA graph per input shape would otherwise capture
(and keep the memory of) one graph per batch size a server ever sees. With
buckets, a batch of 5 runs on the graph for 8: the inputs are padded along the
batch dim (with copies of the last sample, never zeros: an all-zero attention
mask would make NaN rows), the outputs sliced back.

Taken only where it is sound by construction of the graph's signature: one
symbolic dim, named by a single symbol and appearing in the inputs and outputs
only as a whole dim (not inside an expression such as ``batch*128``), and no
input donated to be written in place. Whether
the model keeps samples independent (no reduction or normalization across the
batch) is checked on the first padded call against the plan for the exact
shape; a mismatch turns buckets off for the engine, with a warning, and the
exact result is returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from deepseek.ir.graph import Graph
from deepseek.ir.types import Sym

log = logging.getLogger(__name__)


class ShapeBuckets:
    """Power-of-two buckets of a graph's one symbolic dim (see the module doc)."""

    def __init__(self, graph: Graph, largest: int = 1 << 16):
        self.largest = largest
        self.checked = False
        self.symbol = self._symbol(graph)
        self.in_dims = self._dims(graph.inputs) if self.symbol else None
        self.out_dims = self._dims(graph.outputs) if self.symbol else None
        # donated inputs are written in place: a padded copy would take the writes
        self.enabled = self.in_dims is not None and self.out_dims is not None \
            and any(d is not None for d in self.in_dims) and not graph.donated

    @staticmethod
    def _symbol(graph: Graph) -> str | None:
        """The inputs' one symbolic dim name, or None (none, several, or an expression)."""
        names = {size.expr if size.expr.isidentifier() else "" for v in graph.inputs
                 for size in v.spec.shape if isinstance(size, Sym)}
        return names.pop() if len(names) == 1 and "" not in names else None

    def _dims(self, values) -> list[int | None] | None:
        """Per value, the dim that is exactly the symbol (or None); None when the symbol
        also appears otherwise (twice in one value, or inside an expression)."""
        dims: list[int | None] = []
        for v in values:
            at = [d for d, size in enumerate(v.spec.shape)
                  if isinstance(size, Sym) and self.symbol in size.symbols()]
            if len(at) > 1 or (at and v.spec.shape[at[0]].expr != self.symbol):
                return None
            dims.append(at[0] if at else None)
        return dims

    def bucket(self, n: int) -> int:
        return min(max(1, 1 << (n - 1).bit_length()), max(n, self.largest))

    def pad(self, inputs: Sequence[torch.Tensor]):
        """(padded inputs, unpad) for a batch not on a bucket, or None."""
        sizes = {x.shape[d] for x, d in zip(inputs, self.in_dims) if d is not None}
        if len(sizes) != 1:
            return None
        n = sizes.pop()
        b = self.bucket(n)
        if b == n or n == 0:
            return None

        def grow(x: torch.Tensor, d: int | None) -> torch.Tensor:
            if d is None:
                return x
            tail = x.narrow(d, n - 1, 1).expand(*x.shape[:d], b - n, *x.shape[d + 1:])
            return torch.cat([x, tail], d)

        def unpad(outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return [o.narrow(d, 0, n) if d is not None else o for o, d in zip(outs, self.out_dims)]

        return [grow(x, d) for x, d in zip(inputs, self.in_dims)], unpad

    def __call__(self, run: Callable, exact: Callable, inputs: Sequence[torch.Tensor]) -> list:
        """``run`` on the padded inputs (sliced back), or ``run`` as it is on a bucket's
        size; the first padded call is checked against ``exact(inputs)``."""
        padded = self.pad(inputs) if self.enabled else None
        if padded is None:
            return run(inputs)
        xs, unpad = padded
        out = unpad(run(xs))
        if not self.checked:
            self.checked = True
            ref = exact(inputs)
            if not all(_close(a, b) for a, b in zip(out, ref)):
                self.enabled = False
                log.warning("this model mixes samples across its %r dim: shape buckets are off "
                            "(each batch size gets its own plan)", self.symbol)
                return ref
        return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    a, b = a.float(), b.float()
    return bool(torch.isfinite(a).eq(torch.isfinite(b)).all()) and \
        float((a - b).nan_to_num().norm()) <= 1e-3 * max(float(b.nan_to_num().norm()), 1e-12)
