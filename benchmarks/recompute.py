"""Activation recomputation on training steps: peak memory saved, FLOPs paid.

    python -m benchmarks.recompute                 # both models, ~1 min on 2 cores

For a small ResNet (basic blocks, batch norm in train mode, 32x32 images,
batch 8) and a 2-layer BERT (hidden 128, sequence 64, batch 8, sequence
classification), one training step (forward, loss, backward) is captured
into one graph (``capture_train_step``). ``activate_recompute`` then meets a
budget of ``--fraction`` of the captured step's peak live memory
(``peak_live_bytes``, the planner's lower bound; gradients and every
intermediate count, parameters and the batch do not). Also printed: the same
after the opt_level-2 pipeline (fusion, in-place ops) with and without
recomputation, a sweep of budgets, the largest gradient difference to the
unrecomputed step on a fresh batch (over the largest gradient entry, both run
on the CPU backend), and the step's CPU time before and after
(median of interleaved calls; a shared machine is noisy). Results go to
benchmarks/results/recompute.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

RESULTS = os.path.join(os.path.dirname(__file__), "results")


@dataclass
class TrainCase:
    """A model and one training batch: ``loss_fn(model(*inputs), *targets)``."""

    name: str
    model: nn.Module
    inputs: tuple
    loss_fn: Callable
    targets: tuple
    fresh: Callable[[], tuple]  # a new random batch: inputs + targets

    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]


class BasicBlock(nn.Module):
    """ResNet-18/34's block: two 3x3 convolutions with batch norm and a skip connection."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, stages of basic blocks, global pooling, linear head."""

    def __init__(self, widths=(16, 32, 64), blocks: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if i > 0 and b == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def resnet_case(batch: int = 8, image: int = 32, blocks: int = 2) -> TrainCase:
    torch.manual_seed(0)
    model = SmallResNet(blocks=blocks).train()

    def fresh():
        return torch.randn(batch, 3, image, image), torch.randint(0, 10, (batch,))

    x, y = fresh()
    return TrainCase("resnet", model, (x,), F.cross_entropy, (y,), fresh)


def _classification_loss(out, labels):
    return F.cross_entropy(out.logits, labels)


def bert_case(batch: int = 8, seq: int = 64, hidden: int = 128, layers: int = 2) -> TrainCase:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=4 * hidden,
                        max_position_embeddings=128, num_labels=4, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    model = BertForSequenceClassification(config).train()

    def fresh():
        return torch.randint(1, 1000, (batch, seq)), torch.randint(0, 4, (batch,))

    ids, labels = fresh()
    return TrainCase("bert", model, (ids,), _classification_loss, (labels,), fresh)


CASES = {"resnet": resnet_case, "bert": bert_case}


def graph_flops(graph) -> int:
    from deepseek.profiler.flops import node_flops

    return sum(node_flops(n, {}) for n in graph.nodes)


def recomputed_nodes(graph, views: bool = True) -> int:
    """Copies ``activate_recompute`` made (with ``views=False``: only those that compute)."""
    from deepseek.ir.ops import Prop
    from deepseek.passes.cse import RECOMPUTED

    return sum(any(RECOMPUTED in o.name for o in n.outputs)
               and (views or n.fallback is not None or not n.opdef.has(Prop.VIEW))
               for n in graph.nodes)


def measure(case: TrainCase, fraction: float, sweep: list[float], iters: int) -> dict:
    import deepseek as ds
    from deepseek.api import _copy_graph
    from deepseek.errors import MemoryBudgetError
    from deepseek.frontend.training import capture_train_step
    from deepseek.passes import activate_recompute, optimize_graph
    from deepseek.passes.memory import peak_live_bytes
    from deepseek.runtime.plan import plan_memory
    from deepseek.timing import time_interleaved

    t0 = time.perf_counter()
    graph = capture_train_step(case.model, case.inputs, case.loss_fn, case.targets)
    capture_s = time.perf_counter() - t0
    before = peak_live_bytes(graph, {})
    budget = int(fraction * before)
    t0 = time.perf_counter()
    after_graph = activate_recompute(_copy_graph(graph), budget)
    pass_s = time.perf_counter() - t0
    after = peak_live_bytes(after_graph, {})
    flops = graph_flops(graph)

    batch = case.fresh()
    args = [p.detach() for p in case.params()] + list(batch)
    plain = ds.compile(_copy_graph(graph), backend="cpu", opt_level=0)
    recomputed = ds.compile(_copy_graph(after_graph), backend="cpu", opt_level=0)
    ref, got = plain(*args), recomputed(*args)
    # relative to the largest gradient entry: some gradients are zero in exact arithmetic
    # (a key projection's bias under softmax) and are rounding noise in both runs
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(got[1:], ref[1:])) / \
        max(float(b.abs().max()) for b in ref[1:])
    times = time_interleaved({"before": lambda: plain(*args), "after": lambda: recomputed(*args)},
                             iters=iters, warmup=2)

    pipeline = optimize_graph(_copy_graph(graph))
    pipeline_peak = peak_live_bytes(pipeline, {})
    pipeline_budget = int(fraction * pipeline_peak)
    pipeline_rc = optimize_graph(_copy_graph(graph), memory_budget=pipeline_budget)
    pipeline_rc_peak = peak_live_bytes(pipeline_rc, {})

    rows = []
    for f in sweep:
        try:
            g = activate_recompute(_copy_graph(graph), int(f * before))
            p = peak_live_bytes(g, {})
            rows.append({"fraction": f, "peak_bytes": p, "reduction": round(1 - p / before, 4),
                         "recomputed_nodes": recomputed_nodes(g),
                         "extra_flops": round(graph_flops(g) / flops - 1, 4)})
        except MemoryBudgetError as e:
            rows.append({"fraction": f, "error": str(e)})
    return {
        "nodes": len(graph.nodes), "capture_s": round(capture_s, 2), "pass_s": round(pass_s, 3),
        "budget_fraction": fraction, "budget_bytes": budget,
        "peak_bytes": {"before": before, "after": after},
        "reduction": round(1 - after / before, 4),
        "arena_bytes": {"before": plan_memory(graph, {}).arena_bytes,
                        "after": plan_memory(after_graph, {}).arena_bytes},
        "recomputed_nodes": recomputed_nodes(after_graph),
        "recomputed_kernels": recomputed_nodes(after_graph, views=False),
        "flops": {"before": flops, "after": graph_flops(after_graph)},
        "extra_flops": round(graph_flops(after_graph) / flops - 1, 4),
        "max_grad_diff_vs_unrecomputed": grad_diff,
        "cpu_step_ms": {k: round(v * 1e3, 3) for k, v in times.items()},
        "opt_level2_pipeline": {
            "peak_bytes": pipeline_peak, "budget_bytes": pipeline_budget,
            "peak_bytes_with_recompute": pipeline_rc_peak,
            "reduction": round(1 - pipeline_rc_peak / pipeline_peak, 4),
            "reduction_vs_captured": round(1 - pipeline_rc_peak / before, 4),
            "recomputed_nodes": recomputed_nodes(pipeline_rc),
            "extra_flops": round(graph_flops(pipeline_rc) / graph_flops(pipeline) - 1, 4)},
        "sweep": rows,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.65,
                   help="budget as a fraction of the captured step's peak (default 0.65)")
    p.add_argument("--iters", type=int, default=10, help="timed CPU steps per contender")
    p.add_argument("--out", default=os.path.join(RESULTS, "recompute.json"))
    args = p.parse_args(argv)
    sweep = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    results = {"machine": {"cpu": platform.processor() or platform.machine(),
                           "threads": torch.get_num_threads(), "torch": torch.__version__},
               "command": "python -m benchmarks.recompute", "models": {}}
    for name, make in CASES.items():
        r = measure(make(), args.fraction, sweep, args.iters)
        results["models"][name] = r
        pk = r["peak_bytes"]
        print(f"{name}: {r['nodes']} nodes; peak {pk['before']:,} -> {pk['after']:,} B "
              f"(budget {r['budget_bytes']:,} B, -{100 * r['reduction']:.1f}%), "
              f"{r['recomputed_nodes']} nodes recomputed ({r['recomputed_kernels']} not views), "
              f"+{100 * r['extra_flops']:.2f}% FLOPs, "
              f"max grad diff {r['max_grad_diff_vs_unrecomputed']:.1e}, CPU step "
              f"{r['cpu_step_ms']['before']:.1f} -> {r['cpu_step_ms']['after']:.1f} ms")
        q = r["opt_level2_pipeline"]
        print(f"  after the opt_level-2 pipeline: peak {q['peak_bytes']:,} -> "
              f"{q['peak_bytes_with_recompute']:,} B (-{100 * q['reduction']:.1f}%), "
              f"{q['recomputed_nodes']} nodes recomputed, +{100 * q['extra_flops']:.2f}% FLOPs")
        for row in r["sweep"]:
            if "error" in row:
                print(f"  budget {row['fraction']:.0%}: not reachable")
            else:
                print(f"  budget {row['fraction']:.0%}: peak -{100 * row['reduction']:.1f}%, "
                      f"{row['recomputed_nodes']} nodes, +{100 * row['extra_flops']:.2f}% FLOPs")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
