from __future__ import annotations

import pytest
from llm_residentd.core.requests import ModelQueue, Request
from llm_residentd.wire import events
from llm_residentd.wire.messages import RequestParams
from llm_residentd.wire.protocol import ProtocolError


def _req(n: int, priority: int = 0) -> Request:
    return Request(id=f"r{n}", model="m", params=RequestParams(max_tokens=1, prompt="p"),
                   priority=priority)


def test_higher_priority_first_then_fifo():
    q = ModelQueue("m", 10)
    for n, prio in [(1, 0), (2, 5), (3, 0), (4, 5), (5, -1)]:
        q.push(_req(n, prio))
    assert [r.id for r in q] == ["r2", "r4", "r1", "r3", "r5"]
    assert [q.pop().id for _ in range(5)] == ["r2", "r4", "r1", "r3", "r5"]
    assert q.pop() is None


def test_position_counts_who_runs_first():
    q = ModelQueue("m", 10)
    assert q.push(_req(1)) == 0
    assert q.push(_req(2)) == 1
    assert q.push(_req(3, priority=9)) == 0
    assert q.push(_req(4, priority=9)) == 1


def test_full_queue_refuses():
    q = ModelQueue("m", 2)
    q.push(_req(1))
    q.push(_req(2))
    with pytest.raises(ProtocolError) as err:
        q.push(_req(3))
    assert err.value.code == "queue_full"
    q.pop()
    q.push(_req(3))


def test_remove_skips_the_entry():
    q = ModelQueue("m", 5)
    for n in range(3):
        q.push(_req(n))
    assert q.remove("r1").id == "r1" and q.remove("r1") is None
    assert len(q) == 2 and [q.pop().id, q.pop().id] == ["r0", "r2"]


def test_request_finishes_once():
    sent = []
    r = _req(1)
    r.sink = sent.append
    r.token("a")
    r.done({"x": 1})
    r.fail("cancelled", "late")
    r.token("late")
    assert [type(e) for e in sent] == [events.Token, events.Done]
    assert r.first_token_at is not None and r.tokens_sent == 1


def test_pop_passes_over_held_requests():
    q = ModelQueue("m", 10)
    for n, prio in [(1, 5), (2, 0), (3, 0)]:
        q.push(_req(n, prio))
    assert q.pop(held=lambda rid: rid in {"r1", "r2"}).id == "r3"
    assert q.pop(held=lambda rid: True) is None
    assert [q.pop().id, q.pop().id] == ["r1", "r2"] and len(q) == 0


def test_rank_orders_within_a_priority_only():
    q = ModelQueue("m", 10)
    for n, prio in [(1, 0), (2, 0), (3, 5), (4, 0)]:
        q.push(_req(n, prio))
    ranks = {"r1": 30.0, "r2": 10.0, "r3": 99.0, "r4": 20.0}
    assert [r.id for r in q.ordered(ranks.get)] == ["r3", "r2", "r4", "r1"]
    assert [q.pop(rank=ranks.get).id for _ in range(4)] == ["r3", "r2", "r4", "r1"]
