"""priority and kv-trim with a fake clock and scripted snapshots: no daemon, no kernel."""

from __future__ import annotations

import pytest
from llm_residentd.policies import Event, PolicyError, Snapshot
from llm_residentd.policies.base import Pressure, RequestView, WorkerView
from llm_residentd.policies.kv_trim import KvTrim
from llm_residentd.policies.priority import Priority


def worker(name: str = "m-0", state: str = "busy", n_ctx: int = 2048,
           memory: float = 0.0) -> WorkerView:
    return WorkerView(name, "m", state, 2, None, None, None,
                      {"memory": Pressure(some_avg10=memory)}, n_ctx=n_ctx, n_ctx_max=2048)


def req(rid: str, priority: int, tokens: int = 0, on: str = "", **kw) -> RequestView:
    return RequestView(rid, "m", priority, 10, 64, 0.0, worker=on, tokens=tokens, **kw)


def test_priority_preempts_the_lowest_running_request_once():
    p = Priority(state_min_tokens=100)
    s = Snapshot(now=0, workers=(worker("m-0"), worker("m-1")),
                 queued=(req("hi", 5),),
                 running=(req("lo", 0, tokens=30, on="m-0"), req("mid", 2, on="m-1")))
    (a,) = p.on_event(Event("queued", request="hi"), s)
    assert (a.kind, a.target, a.values) == ("preempt", "lo", {"state_min_tokens": 100})
    assert p.on_event(Event("tick"), s) == []  # already asked: not again


def test_priority_takes_the_least_advanced_among_equals_and_one_per_waiting_request():
    p = Priority()
    s = Snapshot(now=0, workers=(worker("m-0"), worker("m-1")),
                 queued=(req("h1", 3), req("h2", 3), req("h3", 3)),
                 running=(req("a", 0, tokens=90, on="m-0"), req("b", 0, tokens=10, on="m-1")))
    assert [a.target for a in p.on_event(Event("queued"), s)] == ["b", "a"]


@pytest.mark.parametrize("why", ["idle worker", "small gap", "deferred", "preempted enough"])
def test_priority_leaves_running_requests_alone(why):
    p = Priority(min_gap=2, max_preemptions=2)
    workers = (worker("m-0"), worker("m-1", state="idle" if why == "idle worker" else "busy"))
    waiting = req("hi", 1 if why == "small gap" else 5, deferred=why == "deferred")
    running = (req("lo", 0, on="m-0", preemptions=2 if why == "preempted enough" else 0),)
    assert p.on_event(Event("queued"), Snapshot(now=0, workers=workers, queued=(waiting,),
                                                 running=running)) == []


def test_priority_asks_again_once_the_request_is_running_anew():
    p = Priority()
    busy = Snapshot(now=0, workers=(worker(),), queued=(req("hi", 1),),
                    running=(req("lo", 0, on="m-0"),))
    assert len(p.on_event(Event("queued"), busy)) == 1
    requeued = Snapshot(now=1, workers=(worker(),), queued=(req("lo", 0),),
                        running=(req("hi", 1, on="m-0"),))
    assert p.on_event(Event("preempted"), requeued) == []
    again = Snapshot(now=2, workers=(worker(),), queued=(req("hi2", 1),),
                     running=(req("lo", 0, on="m-0", preemptions=1),))
    assert [a.target for a in p.on_event(Event("queued"), again)] == ["lo"]


def test_kv_trim_trims_a_busy_worker_on_its_memory_trigger_with_cooldown():
    p = KvTrim(keep=64, tail=256, min_prune=64, cooldown_s=5)
    s = Snapshot(now=0, workers=(worker("m-0"), worker("m-1")))
    (a,) = p.on_event(Event("pressure", key="m-1/memory"), s)
    assert (a.kind, a.target, a.values) == ("trim_kv", "m-1",
                                            {"keep": 64, "tail": 256, "min_prune": 64})
    assert p.on_event(Event("pressure", key="m-1/memory"), Snapshot(now=4, workers=s.workers)) == []
    assert p.on_event(Event("pressure", key="m-1/cpu"), Snapshot(now=9, workers=s.workers)) == []
    assert len(p.on_event(Event("pressure", key="m-1/memory"),
                          Snapshot(now=9, workers=s.workers))) == 1


def test_kv_trim_shrinks_on_a_tick_above_the_threshold_and_restores_when_calm():
    p = KvTrim(mode="shrink", factor=0.5, min_ctx=512, some_above=10, cooldown_s=1,
               restore_after_s=10)
    (a,) = p.on_event(Event("tick"), Snapshot(now=0, workers=(worker(memory=30),)))
    assert (a.kind, a.values["n_ctx"]) == ("shrink_kv", 1024)
    (a,) = p.on_event(Event("tick"), Snapshot(now=2, workers=(worker(n_ctx=1024, memory=30),)))
    assert a.values["n_ctx"] == 512
    assert p.on_event(Event("tick"), Snapshot(now=4, workers=(worker(n_ctx=512, memory=30),))) \
        == []  # at min_ctx
    calm = (worker(n_ctx=512, state="idle", memory=1),)
    assert p.on_event(Event("tick"), Snapshot(now=5, workers=calm)) == []
    assert p.on_event(Event("tick"), Snapshot(now=14, workers=calm)) == []
    (a,) = p.on_event(Event("tick"), Snapshot(now=15, workers=calm))
    assert (a.kind, a.values) == ("shrink_kv", {"n_ctx": 2048})
    busy = (worker(n_ctx=512, state="busy", memory=1),)
    assert p.on_event(Event("tick"), Snapshot(now=30, workers=busy)) == []  # only when idle


def test_kv_trim_refuses_an_unknown_mode():
    with pytest.raises(PolicyError, match="mode must be trim or shrink"):
        KvTrim(mode="evict")
