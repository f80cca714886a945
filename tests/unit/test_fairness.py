"""Per-uid limits: the connection decision and the per-uid bound of a model's queue."""

from __future__ import annotations

import pytest
from llm_residentd.core.requests import ModelQueue, Request
from llm_residentd.front.fairness import ROOT_RESERVE, ConnectionSlots
from llm_residentd.wire.messages import RequestParams
from llm_residentd.wire.protocol import ProtocolError


def _open(slots: ConnectionSlots, uid: int, n: int) -> None:
    for _ in range(n):
        assert slots.refusal(uid, 10, 4) is None
        slots.opened(uid)


def test_a_uid_is_held_to_its_own_limit_and_others_are_not():
    slots = ConnectionSlots()
    _open(slots, 1000, 4)
    assert slots.refusal(1000, 10, 4) == \
        "uid 1000 already has 4 connections open (max_connections_per_uid 4)"
    assert slots.refusal(1001, 10, 4) is None
    slots.closed(1000)
    assert slots.refusal(1000, 10, 4) is None and len(slots) == 3


def test_the_global_limit_holds_for_all_but_root_who_has_a_reserve():
    slots = ConnectionSlots()
    for uid in range(1000, 1010):
        _open(slots, uid, 1)
    assert "max_connections" in slots.refusal(2000, 10, 4)
    _open(slots, 0, ROOT_RESERVE)  # root is not held to the per-uid limit either
    assert "for root" in slots.refusal(0, 10, 4)
    for _ in range(ROOT_RESERVE):
        slots.closed(0)
    assert slots.by_uid.get(0) is None and len(slots) == 10


def _req(n: int, uid: int) -> Request:
    return Request(id=f"r{n}", model="m", params=RequestParams(max_tokens=1), uid=uid)


def test_a_uid_may_queue_max_queue_per_uid_and_others_still_get_in():
    queue = ModelQueue("m", limit=5, per_uid=2)
    queue.push(_req(1, 1000))
    queue.push(_req(2, 1000))
    with pytest.raises(ProtocolError) as err:
        queue.push(_req(3, 1000))
    assert err.value.code == "too_many_requests" and "max_queue_per_uid 2" in err.value.message
    assert len(queue) == 2
    queue.push(_req(4, 1001))
    preempted = queue.pop()
    queue.push(_req(5, 1000))  # one of 1000's left the queue: room again
    queue.push(preempted, requeue=True)  # a preempted request goes back over the limit
    assert [r.id for r in queue] == ["r1", "r2", "r4", "r5"]


def test_a_full_queue_is_queue_full_whoever_asks():
    queue = ModelQueue("m", limit=3, per_uid=3)
    for n in range(3):
        queue.push(_req(n, 1000))
    for uid in (1000, 1001):
        with pytest.raises(ProtocolError) as err:
            queue.push(_req(9, uid))
        assert err.value.code == "queue_full"
