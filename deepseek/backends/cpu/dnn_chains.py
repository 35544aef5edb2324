"""Stretches of a CPU plan that only run oneDNN primitives, merged into one call.

A plan is Python: each oneDNN kernel costs a statement, the kernel's argument checks,
an output allocation and a ``del`` (10-12 us, against 5-300 us kernels: ResNet-50 at
batch 1 in bf16 runs 53 of them). Where consecutive statements of a plan only call
such kernels (and alias their results: post-ops fused into a producer), they become one
``onednn.Chain`` call: the intermediates get offsets in one arena (laid out by lifetime,
so memory is reused as the allocator would), and only the values read after the
stretch come back as tensors.

The plan's instrumented twin (the profiler's) keeps one statement per node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deepseek.backends.cpu import onednn

_ALIGN = 64


@dataclass
class Step:
    """A node's statement: ``out = kernel(*args)`` (``kernel`` None: ``out = args[0]``,
    an alias)."""

    out: str
    args: tuple[str, ...]
    kernel: onednn._Kernel | None = None


@dataclass
class _Draft:
    kernels: list = field(default_factory=list)
    refs: list[int] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # names read from before the stretch
    formats: list[tuple] = field(default_factory=list)  # (dtype, memory format) of each
    where: dict[str, tuple] = field(default_factory=dict)  # name -> ("in", j) | ("buf", b)
    buffers: list[list] = field(default_factory=list)  # [nbytes, first step, last step, meta]
    deleted: list[str] = field(default_factory=list)

    def locate(self, name: str, fmt: tuple, t: int) -> tuple | None:
        """Where ``name`` is read by step ``t`` in ``fmt``; None where that is not its
        format (the stretch must end before that step)."""
        loc = self.where.get(name)
        if loc is None:
            loc = self.where[name] = ("in", len(self.inputs))
            self.inputs.append(name)
            self.formats.append(fmt)
        if loc[0] == "in":
            return loc if self.formats[loc[1]] == fmt else None
        buf = self.buffers[loc[1]]
        if buf[3][1:] != fmt:
            return None
        buf[2] = t
        return loc

    def ref(self, loc: tuple | None) -> list[int]:
        if loc is None:
            return [-1, 0]
        return [1 + loc[1], 0] if loc[0] == "in" else [0, loc[1]]  # buffer: offset later

    def add(self, step: Step) -> bool:
        """Take ``step`` into the stretch; False (nothing taken) where it cannot join."""
        if step.kernel is None:
            if step.args[0] not in self.where:
                return False
            self.where[step.out] = self.where[step.args[0]]
            return True
        k, t = step.kernel, len(self.kernels)
        fmt = (k.dtype, k.format)
        mark = (dict(self.where), len(self.inputs), [b[2] for b in self.buffers])
        src = self.locate(step.args[0], k.source, t)
        res = self.locate(step.args[1], fmt, t) if k.residual else None
        if src is None or (k.residual and res is None):
            self.where, n_in, lasts = mark  # undo: the step stays out
            del self.inputs[n_in:], self.formats[n_in:]
            for b, last in zip(self.buffers, lasts):
                b[2] = last
            return False
        if k.residual == "sum":  # accumulated into the residual's memory
            dst = res
        else:
            nbytes = k.dtype.itemsize
            for d in k.shape:
                nbytes *= d
            dst = ("buf", len(self.buffers))
            self.buffers.append([nbytes, t, t, (k.shape, k.dtype, k.format)])
        self.where[step.out] = dst
        self.kernels.append(k)
        self.refs += self.ref(src) + self.ref(dst) + self.ref(res if k.residual == "add" else None)
        return True

    def layout(self, live_out: set[str]) -> int:
        """Offsets for the buffers (biggest first, the lowest offset free over each one's
        lifetime; buffers read after the stretch live to its end), patched into ``refs``;
        returns the arena's size."""
        end = len(self.kernels)
        for name in live_out:
            loc = self.where[name]
            if loc[0] == "buf":
                self.buffers[loc[1]][2] = end
        placed: list[tuple[int, int, int, int]] = []  # (offset, size, first, last)
        offsets = {}
        for b in sorted(range(len(self.buffers)), key=lambda b: -self.buffers[b][0]):
            size = -(-self.buffers[b][0] // _ALIGN) * _ALIGN
            first, last = self.buffers[b][1], self.buffers[b][2]
            offset = 0
            for o, s, f, la in sorted(p for p in placed if p[2] <= last and first <= p[3]):
                if offset + size <= o:
                    break
                offset = max(offset, o + s)
            placed.append((offset, size, first, last))
            offsets[b] = offset
        for i in range(0, len(self.refs), 2):  # buffer refs hold the buffer's index
            if self.refs[i] == 0:
                self.refs[i + 1] = offsets[self.refs[i + 1]]
        self.offsets = offsets
        return max((o + s for o, s, _, _ in placed), default=0)


def merge(lines: list[str], starts: list[int], steps: dict[int, Step],
          const) -> list[str]:
    """``lines`` with each stretch of two or more kernel steps (node i's statement is
    ``lines[starts[i]:starts[i + 1]]``: ``steps[i]``'s line, if any, then a ``del`` line,
    if any) as one ``Chain`` call (``const`` names it in the plan's globals)."""
    out = lines[:starts[0]]
    n = len(starts) - 1
    i = 0
    while i < n:
        draft, j = _Draft(), i
        while j < n and _takes(draft, lines[starts[j]:starts[j + 1]], steps.get(j)):
            j += 1
        if len(draft.kernels) < 2:  # nothing to gain: node i as it was
            j = max(j, i + 1) if not draft.kernels else j
            out += lines[starts[i]:starts[j]]
            i = j
            continue
        after = "\n".join(lines[starts[j]:])
        live_out = [name for name in draft.where if draft.where[name][0] == "buf" or
                    name not in draft.inputs]
        live_out = [name for name in live_out if name not in draft.deleted
                    and re.search(rf"\b{re.escape(name)}\b", after)]
        arena = draft.layout(set(live_out))
        outputs = []
        for name in live_out:
            kind, b = draft.where[name]
            if kind == "in":
                dtype, fmt = draft.formats[b]
                outputs.append((1 + b, 0, None, dtype, fmt))
            else:
                shape, dtype, fmt = draft.buffers[b][3]
                outputs.append((0, draft.offsets[b], shape, dtype, fmt))
        chain = onednn.Chain(draft.kernels, draft.formats, draft.refs, arena, outputs)
        call = f"{const(chain, 'chain')}({', '.join(draft.inputs)})"
        out.append(f"    {', '.join(live_out)}, = {call}" if live_out else f"    {call}")
        dead = [name for name in draft.deleted if name in draft.inputs]
        if dead:
            out.append(f"    del {', '.join(dead)}")
        i = j
    return out + lines[starts[n]:]


def _takes(draft: _Draft, node_lines: list[str], step: Step | None) -> bool:
    """Take one node (its statement lines) into ``draft``, or False (nothing taken)."""
    body = [ln for ln in node_lines if not ln.startswith("    del ")]
    if step is None:
        if body:
            return False
    elif len(body) != 1 or not draft.add(step):
        return False
    for ln in node_lines:
        if ln.startswith("    del "):
            draft.deleted += ln[len("    del "):].split(", ")
    return True
