"""priority and kv-trim with a fake clock and scripted snapshots: no daemon, no kernel."""

from __future__ import annotations

import pytest
from llm_residentd.policies import PolicyError, Preempted, PsiTrigger, Queued, Snapshot, Tick
from llm_residentd.policies.base import Pressure, RequestView, WorkerView
from llm_residentd.policies.kv_trim import KvTrim
from llm_residentd.policies.priority import Priority


def worker(name: str = "m-0", state: str = "busy", n_ctx: int = 2048,
           memory: float = 0.0, slots: int = 1, busy: int | None = None,
           limit: int | None = None, cache: int = 0) -> WorkerView:
    """A worker with `slots` slots; busy ones: all of them when state is busy, by default."""
    busy = (slots if state == "busy" else 0) if busy is None else busy
    return WorkerView(name, "m", state, 2, None, None, None,
                      {"memory": Pressure(some_avg10=memory)}, n_ctx=n_ctx, n_ctx_max=2048,
                      slots=slots, slots_busy=busy, batch_limit=slots if limit is None else limit,
                      prompt_cache_bytes=cache)


def req(rid: str, priority: int, tokens: int = 0, on: str = "", **kw) -> RequestView:
    return RequestView(rid, "m", priority, 10, 64, 0.0, worker=on, tokens=tokens, **kw)


def test_priority_preempts_the_lowest_running_request_once():
    p = Priority(state_min_tokens=100)
    s = Snapshot(now=0, workers=(worker("m-0"), worker("m-1")),
                 queued=(req("hi", 5),),
                 running=(req("lo", 0, tokens=30, on="m-0"), req("mid", 2, on="m-1")))
    (a,) = p.on_event(Queued("hi", "m"), s)
    assert (a.kind, a.target, a.values) == ("preempt", "lo", {"state_min_tokens": 100})
    assert p.on_event(Tick(), s) == []  # already asked: not again


def test_priority_takes_the_least_advanced_among_equals_and_one_per_waiting_request():
    p = Priority()
    s = Snapshot(now=0, workers=(worker("m-0"), worker("m-1")),
                 queued=(req("h1", 3), req("h2", 3), req("h3", 3)),
                 running=(req("a", 0, tokens=90, on="m-0"), req("b", 0, tokens=10, on="m-1")))
    assert [a.target for a in p.on_event(Queued("h3", "m"), s)] == ["b", "a"]


@pytest.mark.parametrize("why", ["idle worker", "small gap", "deferred", "preempted enough"])
def test_priority_leaves_running_requests_alone(why):
    p = Priority(min_gap=2, max_preemptions=2)
    workers = (worker("m-0"), worker("m-1", state="idle" if why == "idle worker" else "busy"))
    waiting = req("hi", 1 if why == "small gap" else 5, deferred=why == "deferred")
    running = (req("lo", 0, on="m-0", preemptions=2 if why == "preempted enough" else 0),)
    assert p.on_event(Queued("hi", "m"), Snapshot(now=0, workers=workers, queued=(waiting,),
                                                 running=running)) == []


def test_priority_preempts_only_when_no_slot_is_free():
    """Issue 14: a busy worker with a free slot takes the waiting request without taking a
    slot from anybody; with every slot (within the batch limit) running, a sequence goes."""
    p = Priority()
    running = tuple(req(f"lo{i}", 0, tokens=10 * i, on="m-0") for i in range(3))
    waiting = (req("hi", 5),)

    def decide(w: WorkerView) -> list[str]:
        snap = Snapshot(now=0, workers=(w,), queued=waiting, running=running)
        return [a.target for a in Priority().on_event(Queued("hi", "m"), snap)]

    assert decide(worker(slots=4, busy=3)) == []  # one slot free
    two = Snapshot(now=0, workers=(worker(slots=4, busy=3),), running=running,
                   queued=(req("hi", 5), req("hi2", 5)))
    assert [a.target for a in Priority().on_event(Queued("hi2", "m"), two)] == ["lo0"]
    assert decide(worker(slots=3, busy=3)) == ["lo0"]  # full: the least advanced goes
    assert decide(worker(slots=4, busy=3, limit=3)) == ["lo0"]  # set_batch: 3 is full
    assert decide(worker(state="restarting", slots=4, busy=0)) == ["lo0"]  # not serving
    assert p.on_event(Tick(), Snapshot(now=0)) == []


def test_priority_asks_again_once_the_request_is_running_anew():
    p = Priority()
    busy = Snapshot(now=0, workers=(worker(),), queued=(req("hi", 1),),
                    running=(req("lo", 0, on="m-0"),))
    assert len(p.on_event(Queued("hi", "m"), busy)) == 1
    requeued = Snapshot(now=1, workers=(worker(),), queued=(req("lo", 0),),
                        running=(req("hi", 1, on="m-0"),))
    assert p.on_event(Preempted("lo", "m"), requeued) == []
    again = Snapshot(now=2, workers=(worker(),), queued=(req("hi2", 1),),
                     running=(req("lo", 0, on="m-0", preemptions=1),))
    assert [a.target for a in p.on_event(Queued("hi2", "m"), again)] == ["lo"]


def test_kv_trim_trims_a_busy_worker_on_its_memory_trigger_with_cooldown():
    p = KvTrim(keep=64, tail=256, min_prune=64, cooldown_s=5)
    running = (req("a", 0, on="m-0"), req("b", 0, on="m-1"))
    s = Snapshot(now=0, workers=(worker("m-0"), worker("m-1")), running=running)
    (a,) = p.on_event(PsiTrigger("m-1/memory"), s)
    assert (a.kind, a.target, a.values) == ("trim_kv", "m-1",
                                            {"keep": 64, "tail": 256, "min_prune": 64, "req": "b"})
    assert p.on_event(PsiTrigger("m-1/memory"), Snapshot(now=4, workers=s.workers,
                                                                    running=running)) == []
    assert p.on_event(PsiTrigger("m-1/cpu"), Snapshot(now=9, workers=s.workers,
                                                                 running=running)) == []
    assert len(p.on_event(PsiTrigger("m-1/memory"),
                          Snapshot(now=9, workers=s.workers, running=running))) == 1
    assert p.on_event(PsiTrigger("m-0/memory"),  # nothing runs there: no trim
                      Snapshot(now=20, workers=s.workers, running=running[1:])) == []


@pytest.mark.parametrize("mode", ["trim", "shrink"])
def test_kv_trim_waits_while_the_prompt_cache_holds_memory(mode):
    """Issue 22: the daemon gives the prompt cache back first; the running sequences' KV
    is cut only once the cache is empty."""
    p = KvTrim(mode=mode, cooldown_s=0)
    running = (req("a", 0, on="m-0"),)
    held = Snapshot(now=0, workers=(worker("m-0", memory=50, cache=1 << 20),), running=running)
    assert p.on_event(PsiTrigger("m-0/memory"), held) == []
    assert p.on_event(Tick(), held) == []
    empty = Snapshot(now=1, workers=(worker("m-0", memory=50),), running=running)
    (a,) = p.on_event(PsiTrigger("m-0/memory"), empty)
    assert a.kind == ("trim_kv" if mode == "trim" else "shrink_kv")


def test_kv_trim_trims_the_sequence_holding_the_most_cells_on_the_pressed_worker():
    """Issue 14: of the pressed worker's sequences, the one with the most KV cells (the
    worker's Batch report), not another worker's longer one."""
    p = KvTrim()
    running = (req("short", 0, on="m-0", tokens=300, kv_cells=120),
               req("long", 0, on="m-0", tokens=10, kv_cells=900),
               req("mid", 0, on="m-0", kv_cells=400),
               req("elsewhere", 0, on="m-1", kv_cells=5000))
    snap = Snapshot(now=0, workers=(worker("m-0", slots=4, busy=3), worker("m-1")),
                    running=running)
    (a,) = p.on_event(PsiTrigger("m-0/memory"), snap)
    assert (a.kind, a.target, a.values["req"]) == ("trim_kv", "m-0", "long")
    assert "long holds 900 KV cells" in a.reason


def test_kv_trim_shrinks_on_a_tick_above_the_threshold_and_restores_when_calm():
    p = KvTrim(mode="shrink", factor=0.5, min_ctx=512, some_above=10, cooldown_s=1,
               restore_after_s=10)
    (a,) = p.on_event(Tick(), Snapshot(now=0, workers=(worker(memory=30),)))
    assert (a.kind, a.values["n_ctx"]) == ("shrink_kv", 1024)
    (a,) = p.on_event(Tick(), Snapshot(now=2, workers=(worker(n_ctx=1024, memory=30),)))
    assert a.values["n_ctx"] == 512
    assert p.on_event(Tick(), Snapshot(now=4, workers=(worker(n_ctx=512, memory=30),))) \
        == []  # at min_ctx
    calm = (worker(n_ctx=512, state="idle", memory=1),)
    assert p.on_event(Tick(), Snapshot(now=5, workers=calm)) == []
    assert p.on_event(Tick(), Snapshot(now=14, workers=calm)) == []
    (a,) = p.on_event(Tick(), Snapshot(now=15, workers=calm))
    assert (a.kind, a.values) == ("shrink_kv", {"n_ctx": 2048})
    busy = (worker(n_ctx=512, state="busy", memory=1),)
    assert p.on_event(Tick(), Snapshot(now=30, workers=busy)) == []  # only when idle


def test_kv_trim_refuses_an_unknown_mode():
    with pytest.raises(PolicyError, match="mode must be trim or shrink"):
        KvTrim(mode="evict")
