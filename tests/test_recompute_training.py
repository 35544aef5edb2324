"""Recomputation on whole training steps (forward + loss + backward in one graph).

For a small ResNet (train-mode batch norm) and a 2-layer BERT: the captured
step's loss and gradients equal eager autograd's; under a budget of 65% of its
peak, ``activate_recompute`` brings peak live memory within the budget (at
least 30% lower) while the gradients stay those of the unrecomputed step, in
the reference interpreter and on the CPU backend, on fresh random batches.
"""

import pytest
import torch
import torch.nn.functional as F

import deepseek as ds
from benchmarks.recompute import bert_case, recomputed_nodes, resnet_case
from deepseek.api import _copy_graph
from deepseek.frontend.training import capture_train_step
from deepseek.ir.interpreter import run_graph
from deepseek.ir.verify import verify
from deepseek.passes import activate_recompute, eliminate_common_subexpr, optimize_graph
from deepseek.passes.memory import peak_live_bytes
from deepseek.profiler.flops import node_flops

BUDGET = 0.65  # of the captured step's peak


def assert_grads_close(got, ref, rtol):
    """Each gradient within ``rtol`` (relative L2) of the reference; gradients that are
    zero in exact arithmetic (a key projection's bias under softmax) are held to
    ``rtol`` of the largest gradient instead of to their own rounding noise."""
    floor = 1e-3 * max(float(r.norm()) for r in ref)
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, f"gradient {i}"
        err = float((a.double() - b.double()).norm()) / max(float(b.norm()), floor)
        assert err < rtol, f"gradient {i} {tuple(b.shape)}: relative error {err:.2e}"


def eager_step(case, batch):
    n = len(case.inputs)
    loss = case.loss_fn(case.model(*batch[:n]), *batch[n:])
    return loss.detach(), torch.autograd.grad(loss, case.params())


@pytest.fixture(scope="module", params=["resnet", "bert"])
def step(request):
    case = {"resnet": resnet_case, "bert": bert_case}[request.param]()
    graph = capture_train_step(case.model, case.inputs, case.loss_fn, case.targets)
    before = peak_live_bytes(graph, {})
    budget = int(BUDGET * before)
    recomputed = activate_recompute(_copy_graph(graph), budget)
    return case, graph, recomputed, before, budget


def test_captured_step_is_loss_and_gradients_of_eager_autograd(step):
    case, graph, _, _, _ = step
    assert len(graph.inputs) == len(case.params()) + len(case.inputs) + len(case.targets)
    assert len(graph.outputs) == 1 + len(case.params())
    assert not graph.fallback_nodes()
    verify(graph)
    batch = case.fresh()
    loss, *grads = run_graph(graph, [p.detach() for p in case.params()] + list(batch))
    ref_loss, ref_grads = eager_step(case, batch)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert_grads_close(grads, ref_grads, 5e-5)


def test_recompute_meets_the_budget_with_few_extra_flops(step):
    _, graph, recomputed, before, budget = step
    after = peak_live_bytes(recomputed, {})
    assert after <= budget
    assert after <= 0.7 * before  # at least 30% lower
    assert recomputed_nodes(recomputed) > 0
    flops = [sum(node_flops(n, {}) for n in g.nodes) for g in (graph, recomputed)]
    assert flops[0] < flops[1] < 1.15 * flops[0]  # work was added, and not much
    verify(recomputed)


def test_recomputed_step_has_the_same_gradients(step):
    case, graph, recomputed, _, _ = step
    params = [p.detach() for p in case.params()]
    batch = case.fresh()
    ref = run_graph(graph, params + list(batch))
    got = run_graph(recomputed, params + list(batch))
    assert torch.allclose(got[0], ref[0], rtol=1e-6)
    assert_grads_close(got[1:], ref[1:], 1e-5)
    _, eager = eager_step(case, batch)
    assert_grads_close(got[1:], eager, 5e-5)

    engine = ds.compile(_copy_graph(recomputed), backend="cpu", opt_level=0)
    assert engine.report().peak_memory_bytes["optimized"] == peak_live_bytes(recomputed, {})
    batch = case.fresh()
    on_cpu = engine(*params, *batch)
    assert_grads_close(on_cpu[1:], run_graph(graph, params + list(batch))[1:], 1e-5)


@pytest.mark.parametrize("fraction", [0.6, 0.5])
def test_the_kept_rewrites_add_the_least_work(step, fraction):
    """activate_recompute runs both candidate orders, drops the rewrites the budget holds
    without, and keeps the cheaper result: no more FLOPs than either order alone, and on
    the BERT step strictly fewer than the bytes-per-work order alone (at 60%: +7.9%
    against +11.7% FLOPs; at 50%: +21.9% against +27.1%, when measured)."""
    from deepseek.passes.recompute import _greedy

    case, graph, _, before, _ = step
    budget = int(fraction * before)
    flops = lambda g: sum(node_flops(n, {}) for n in g.nodes)  # noqa: E731
    alone = []
    for covering_first in (False, True):
        g = _copy_graph(graph)
        for n in g.nodes:
            n.reuse = None
        _greedy(g, {}, budget, 10_000, covering_first)
        alone.append(flops(g) if peak_live_bytes(g, {}) <= budget else float("inf"))
    kept = activate_recompute(_copy_graph(graph), budget)
    assert peak_live_bytes(kept, {}) <= budget
    assert flops(kept) <= min(alone)
    if case.name == "bert":
        assert flops(kept) < alone[0]
    verify(kept)
    params = [p.detach() for p in case.params()]
    batch = case.fresh()
    ref, got = run_graph(graph, params + list(batch)), run_graph(kept, params + list(batch))
    assert_grads_close(got[1:], ref[1:], 1e-5)


def test_cse_keeps_the_recomputed_copies(step):
    _, _, recomputed, _, budget = step
    g = eliminate_common_subexpr(_copy_graph(recomputed))
    assert peak_live_bytes(g, {}) <= budget
    assert recomputed_nodes(g) == recomputed_nodes(recomputed)


def test_impossible_budget_is_a_clear_error_and_leaves_the_graph_alone(step):
    _, graph, _, before, _ = step
    g = _copy_graph(graph)
    text = str(g)
    with pytest.raises(ds.MemoryBudgetError, match="give a budget of at least") as e:
        activate_recompute(g, before // 10)
    assert str(g) == text
    reachable = int(str(e.value).split("at least ")[1].split(" bytes")[0])
    assert before // 10 < reachable < before
    assert peak_live_bytes(activate_recompute(g, reachable), {}) <= reachable


def test_optimize_graph_with_a_budget_then_compile():
    case = resnet_case(blocks=1)
    graph = capture_train_step(case.model, case.inputs, case.loss_fn, case.targets)
    plain = optimize_graph(_copy_graph(graph))
    budget = int(BUDGET * peak_live_bytes(plain, {}))
    optimized = optimize_graph(_copy_graph(graph), memory_budget=budget)
    assert peak_live_bytes(optimized, {}) <= budget
    engine = ds.compile(optimized, backend="cpu", opt_level=0)
    params = [p.detach() for p in case.params()]
    batch = case.fresh()
    got = engine(*params, *batch)
    assert_grads_close(got[1:], run_graph(graph, params + list(batch))[1:], 1e-5)


def test_tied_and_frozen_parameters():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).train()  # lm_head.weight is transformer.wte.weight
    model.transformer.h[0].ln_1.weight.requires_grad_(False)

    def loss_fn(out, labels):
        return F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())

    ids = torch.randint(0, 256, (2, 16))
    graph = capture_train_step(model, (ids,), loss_fn, (ids,))
    params = [p for p in model.parameters() if p.requires_grad]
    assert "transformer.h.0.ln_1.weight" not in graph.input_names
    assert not model.transformer.h[0].ln_1.weight.requires_grad  # capture leaves the model as is
    assert len(graph.outputs) == 1 + len(params)
    ids = torch.randint(0, 256, (2, 16))
    _, *grads = run_graph(graph, [p.detach() for p in params] + [ids, ids])
    ref = torch.autograd.grad(loss_fn(model(ids), ids), params)
    assert_grads_close(grads, ref, 5e-5)


@pytest.mark.parametrize("mask", [[True, True, False], [False, True, False], [True, False, False]])
def test_convolution_backward_flops_match_torchs_counter(mask):
    from torch.utils.flop_counter import FlopCounterMode

    from deepseek.ir.graph import Graph
    from deepseek.ir.interpreter import infer_specs
    from deepseek.ir.ops import Op
    from deepseek.ir.types import TensorSpec

    tensors = [torch.randn(2, 16, 8, 8), torch.randn(2, 8, 15, 15), torch.randn(16, 8, 3, 3)]
    attrs = {"bias_sizes": None, "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1],
             "transposed": False, "output_padding": [0, 0], "groups": 1, "output_mask": mask}
    g = Graph()
    ins = [g.add_input(n, TensorSpec.of(t)) for n, t in zip(("grad", "x", "w"), tensors)]
    node = g.add_node(Op.CONVOLUTION_BACKWARD, ins, attrs, [TensorSpec((1,), torch.float32)] * 3)
    for o, s in zip(node.outputs, infer_specs(node, {})):
        o.spec = s  # masked-off outputs are zero-size placeholders
    assert [o.spec.shape != (0,) for o in node.outputs] == mask
    with FlopCounterMode(display=False) as counter:
        node.opdef.reference(tensors, attrs)
    assert node_flops(node, {}) == counter.get_total_flops() > 0


def test_update_buffers_carries_batch_norm_statistics_from_step_to_step():
    """With ``update_buffers`` the running mean, variance and batch count are inputs and
    their new values outputs: three steps chained through them (interpreter and CPU
    engine) give eager training's statistics and gradients; without, the graph's
    contract is unchanged."""
    import copy

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 5)).train()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    graph = capture_train_step(copy.deepcopy(model), (x,), F.cross_entropy, (y,),
                               update_buffers=True)
    bn = model[1]
    names = ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert graph.input_names[-3:] == names
    params = [p.detach() for p in model.parameters()]
    assert len(graph.inputs) == len(params) + 2 + 3
    assert len(graph.outputs) == 1 + len(params) + 3
    engine = ds.compile(_copy_graph(graph), backend="cpu", opt_level=0)
    buffers = {"graph": [bn.running_mean.clone(), bn.running_var.clone(),
                         bn.num_batches_tracked.clone()]}
    buffers["engine"] = [b.clone() for b in buffers["graph"]]
    for _ in range(3):
        batch = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
        loss = F.cross_entropy(model(batch[0]), batch[1])  # eager: updates bn in place
        ref_grads = torch.autograd.grad(loss, list(model.parameters()))
        out = run_graph(graph, params + list(batch) + buffers["graph"])
        got = engine(*params, *batch, *buffers["engine"])
        for result, key in ((out, "graph"), (got, "engine")):
            assert torch.allclose(result[0], loss.detach(), rtol=1e-5)
            assert_grads_close(result[1:1 + len(params)], ref_grads, 5e-5)
            buffers[key] = list(result[-3:])
            for new, old in zip(buffers[key], (bn.running_mean, bn.running_var,
                                               bn.num_batches_tracked)):
                assert torch.allclose(new, old, rtol=1e-5, atol=1e-6)
    assert int(buffers["graph"][2]) == 3
    plain = capture_train_step(copy.deepcopy(model), (x,), F.cross_entropy, (y,))
    assert len(plain.inputs) == len(params) + 2 and len(plain.outputs) == 1 + len(params)
