"""The batching policy as a pure function: no threads, no clock, no server."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek.serving.policy import (
    BatchConfig,
    LatencyModel,
    Pending,
    bucket_key,
    bucket_length,
    next_batch,
    urgency,
)

MS = 1e-3


def linear(base_ms: float = 1.0, per_row_ms: float = 1.0):
    """A latency model of ``base + per_row * size`` milliseconds."""
    return lambda size, bucket=(): (base_ms + per_row_ms * size) * MS


def req(i, arrival=0.0, deadline_ms=None, priority=0, rows=1, bucket=()):
    return Pending(str(i), arrival, rows, None if deadline_ms is None else deadline_ms * MS,
                   priority, bucket)


def cfg(**kw):
    return BatchConfig(**{"max_batch_size": 8, "max_queue_delay": 5 * MS, "safety": 1.0,
                          "margin": 0.0, **kw})


def ids(reqs):
    return [r.id for r in reqs]


def test_empty_queue_waits_for_arrivals():
    d = next_batch([], 0.0, cfg(), linear())
    assert d.take == () and d.refuse == () and d.wait_until is None


def test_lone_request_waits_up_to_the_max_queue_delay_then_runs():
    q = [req(0, arrival=0.0)]
    d = next_batch(q, 1 * MS, cfg(), linear())
    assert d.take == () and d.wait_until == pytest.approx(5 * MS)
    d = next_batch(q, 5 * MS, cfg(), linear())
    assert ids(d.take) == ["0"]


def test_full_batch_runs_at_once_and_leaves_the_rest():
    q = [req(i, arrival=i * 1e-6) for i in range(11)]
    d = next_batch(q, 0.0, cfg(max_batch_size=8), linear())
    assert ids(d.take) == [str(i) for i in range(8)]  # FIFO without deadlines


def test_rows_count_toward_the_max_batch_size():
    q = [req(0, rows=5), req(1, rows=4, arrival=1e-6), req(2, rows=3, arrival=2e-6)]
    d = next_batch(q, 0.0, cfg(max_batch_size=8), linear())
    assert ids(d.take) == ["0", "2"]  # 5 + 4 > 8: request 1 is skipped, 5 + 3 fills it


def test_earliest_deadline_first():
    # arrival order is the reverse of deadline order
    q = [req(i, arrival=i * 1e-6, deadline_ms=100 - 10 * i) for i in range(5)]
    d = next_batch(q, 0.0, cfg(max_batch_size=2), linear())
    assert ids(d.take) == ["4", "3"]


def test_priority_level_beats_deadline():
    q = [req("urgent-deadline", deadline_ms=20), req("prio2", priority=2, deadline_ms=90),
         req("prio1", priority=1, deadline_ms=100), req("default")]
    assert ids(sorted(q, key=urgency)) == ["prio1", "prio2", "urgent-deadline", "default"]
    d = next_batch(q, 0.0, cfg(max_batch_size=1), linear())
    assert ids(d.take) == ["prio1"]


def test_largest_batch_that_meets_the_deadlines():
    # cost(n) = 1 + n ms; head's deadline 5 ms away: at most 4 rows fit
    q = [req(i, arrival=i * 1e-6, deadline_ms=5 if i == 0 else 1000) for i in range(10)]
    d = next_batch(q, 0.0, cfg(max_batch_size=8), linear())
    assert ids(d.take) == ["0", "1", "2", "3"]


def test_requests_left_behind_keep_their_deadline():
    # bucket B's request must start by 10 - 2 = 8 ms: bucket A's batch may take at most 8 ms
    q = [req(f"a{i}", bucket="A", priority=1, arrival=i * 1e-6) for i in range(8)]
    q.append(req("b", bucket="B", deadline_ms=10))
    d = next_batch(q, 0.0, cfg(max_batch_size=8), linear())
    assert all(r.bucket == "A" for r in d.take)
    assert len(d.take) == 7  # cost(7) = 8 ms; cost(8) = 9 ms would make "b" late
    # waiting is bounded by the same constraint, so "b" is served in time
    d2 = next_batch([r for r in q if r not in d.take], 8 * MS, cfg(), linear())
    assert d2.take or d2.wait_until <= 8 * MS


def test_waiting_stops_early_enough_for_the_deadline():
    q = [req(0, deadline_ms=10)]
    d = next_batch(q, 0.0, cfg(max_queue_delay=100 * MS), linear())
    # a batch of two rows takes 3 ms: start by 7 ms at the latest
    assert d.take == () and d.wait_until == pytest.approx(7 * MS)
    assert ids(next_batch(q, 7 * MS, cfg(max_queue_delay=100 * MS), linear()).take) == ["0"]
    # a margin for wake-up and the answer's trip moves the start earlier; waking up late
    # by less than the margin still serves the request instead of refusing it
    c = cfg(max_queue_delay=100 * MS, margin=1 * MS)
    assert next_batch(q, 0.0, c, linear()).wait_until == pytest.approx(6 * MS)
    assert ids(next_batch(q, 6.9 * MS, c, linear()).take) == ["0"]


def test_early_refusal_of_an_unmeetable_deadline():
    q = [req("hopeless", deadline_ms=1.5), req("fine", deadline_ms=50)]
    d = next_batch(q, 0.0, cfg(), linear())  # one row costs 2 ms
    assert ids(d.refuse) == ["hopeless"]
    assert "fine" not in ids(d.take) + ids(d.refuse)
    # an expired request is refused, not run
    d = next_batch([req("expired", deadline_ms=5)], 10 * MS, cfg(), linear())
    assert ids(d.refuse) == ["expired"] and d.take == ()


def test_refusal_trusts_the_best_speed_seen_not_a_passing_slowdown():
    """An average inflated by a slow spell must not refuse requests that the device can
    still serve at the speed it has shown (else nothing runs and nothing is re-measured)."""
    slow, fast = linear(100.0, 0.0), linear(1.0, 0.0)
    q = [req("r", deadline_ms=10)]
    assert ids(next_batch(q, 0.0, cfg(), slow).refuse) == ["r"]
    d = next_batch(q, 0.0, cfg(), slow, best=fast)
    assert d.refuse == () and ids(d.take) == ["r"]  # no time to wait: run it now


def test_fixed_delay_baseline_ignores_deadlines_until_dequeue():
    """The Triton-like baseline waits out the queue delay even when that makes a deadline
    impossible, and refuses only once the deadline has passed; the deadline-aware policy
    starts in time."""
    c = cfg(max_queue_delay=20 * MS, deadline_aware=False)
    q = [req("a", deadline_ms=10), req("b", arrival=1e-6, deadline_ms=30)]
    d = next_batch(q, 0.0, c, linear())
    assert d.take == () and d.wait_until == pytest.approx(20 * MS)
    d = next_batch(q, 21 * MS, c, linear())
    assert ids(d.refuse) == ["a"] and ids(d.take) == ["b"]
    aware = next_batch(q, 0.0, cfg(max_queue_delay=20 * MS), linear())
    assert aware.wait_until < 10 * MS


def test_buckets_never_mix():
    q = [req("a0", bucket=(8,)), req("b0", bucket=(16,), arrival=1e-6),
         req("a1", bucket=(8,), arrival=2e-6), req("b1", bucket=(16,), arrival=3e-6)]
    d = next_batch(q, 1.0, cfg(), linear())  # long after the queue delay
    assert ids(d.take) == ["a0", "a1"]
    d = next_batch(q[1::2], 1.0, cfg(), linear())
    assert ids(d.take) == ["b0", "b1"]


def test_preferred_batch_size_runs_at_once():
    c = cfg(max_batch_size=16, preferred_batch_sizes=(4, 8), max_queue_delay=1.0)
    three = [req(i, arrival=i * 1e-6) for i in range(3)]
    assert next_batch(three, 0.0, c, linear()).take == ()          # wait for more
    assert len(next_batch(three + [req(3)], 0.0, c, linear()).take) == 4
    ten = [req(i, arrival=i * 1e-6) for i in range(10)]
    assert ids(next_batch(ten, 0.0, c, linear()).take) == [str(i) for i in range(8)]


def test_batch_buckets_price_the_padded_size():
    c = cfg(max_batch_size=16, batch_buckets=(4, 16))
    assert c.executed_size(3) == 4 and c.executed_size(5) == 16 and c.executed_size(17) == 17
    # 5 rows execute as 16 (cost 17 ms) and would miss a 10 ms deadline: take 4 (cost 5 ms)
    q = [req(i, arrival=i * 1e-6, deadline_ms=10) for i in range(6)]
    assert len(next_batch(q, 0.0, c, linear()).take) == 4


def test_drain_runs_without_waiting():
    q = [req(0)]
    assert next_batch(q, 0.0, cfg(max_queue_delay=10.0), linear()).take == ()
    assert ids(next_batch(q, 0.0, cfg(max_queue_delay=10.0), linear(), drain=True).take) == ["0"]


def test_latency_model_learns_and_extrapolates():
    lat = LatencyModel(alpha=0.5, default=0.007)
    assert lat.estimate_latency(4) == 0.007
    lat.observe(8, 0.008)
    assert lat.estimate_latency(8) == 0.008
    assert lat.estimate_latency(16) == pytest.approx(0.016)  # proportional from one point
    lat.observe(8, 0.004)                                    # moving average
    assert lat.estimate_latency(8) == pytest.approx(0.006)
    lat.observe(1, 0.001)
    lat.observe(32, 0.018)
    e = [lat.estimate_latency(n) for n in (1, 2, 16, 64)]
    assert e == sorted(e) and e[0] == 0.001 and e[-1] > 0.018
    assert lat.best_latency(8) == 0.004 and lat.best_latency(64) >= lat.best_latency(32)
    lat.observe(4, 0.5, bucket=(64,))                        # another bucket is kept apart
    assert lat.estimate_latency(4, (64,)) == 0.5 and lat.estimate_latency(4) < 0.01


def test_bucket_lengths_and_keys():
    assert [bucket_length(n) for n in (1, 8, 9, 33)] == [8, 8, 16, 64]
    assert [bucket_length(n, (10, 20)) for n in (3, 10, 11, 25)] == [10, 10, 20, 32]
    syms = [["seq", None], ["seq"]]
    k1 = bucket_key([[5, 4], [5]], syms, {"seq": ()})
    k2 = bucket_key([[7, 4], [7]], syms, {"seq": ()})
    k3 = bucket_key([[9, 4], [9]], syms, {"seq": ()})
    assert k1 == k2 == ((8, 4), (8,)) and k3 == ((16, 4), (16,))
    # a symbolic dim without a mask is not padded: only equal sizes batch together
    assert bucket_key([[5]], [["seq"]], {}) != bucket_key([[7]], [["seq"]], {})


@st.composite
def queues(draw):
    n = draw(st.integers(0, 12))
    return [Pending(str(i), draw(st.floats(0, 0.01)), draw(st.integers(1, 4)),
                    draw(st.one_of(st.none(), st.floats(0, 0.05))), draw(st.integers(0, 2)),
                    draw(st.sampled_from(["A", "B"]))) for i in range(n)]


@settings(max_examples=200, deadline=None)
@given(queues(), st.floats(0, 0.02), st.sampled_from([(), (2, 4)]), st.booleans())
def test_decision_invariants(queue, now, preferred, drain):
    c = BatchConfig(max_batch_size=6, max_queue_delay=0.004, preferred_batch_sizes=preferred)
    est = linear(0.5, 0.5)
    d = next_batch(queue, now, c, est, drain=drain)

    def cost(n):
        return est(c.executed_size(n)) * c.safety

    refused = {id(r) for r in d.refuse}
    assert refused == {id(r) for r in queue if r.deadline is not None
                       and now + est(c.executed_size(r.rows)) > r.deadline}
    assert not refused & {id(r) for r in d.take}
    live = sorted((r for r in queue if id(r) not in refused), key=urgency)
    if d.take:
        assert d.take[0] is live[0]                        # the most urgent goes first
        assert len({r.bucket for r in d.take}) == 1
        rows = sum(r.rows for r in d.take)
        assert rows <= c.max_batch_size
        if len(d.take) > 1:                                # a grown batch meets every deadline
            assert now + cost(rows) <= min(r.deadline or math.inf for r in d.take) - c.margin \
                + 1e-12
    elif live:
        assert not drain and d.wait_until is not None and d.wait_until > now
        assert d.wait_until <= min(r.arrival for r in live if r.bucket == live[0].bucket) + \
            c.max_queue_delay + 1e-12
    else:
        assert d.wait_until is None
