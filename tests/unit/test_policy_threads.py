"""The threads policy with a fake clock and scripted CPU views: no daemon, no kernel."""

from __future__ import annotations

import itertools

import pytest
from llm_residentd.policies import CpuRead, LimitsSet, PolicyError, Snapshot
from llm_residentd.policies.base import CpuView, WorkerLoad, WorkerView
from llm_residentd.policies.threads import Threads

CPU = CpuRead()


def worker(name: str = "m-0", state: str = "busy", threads: int = 2, *, asked: int | None = None,
           pinned: bool = False, allowed: int = 2, quota: float | None = None) -> WorkerView:
    return WorkerView(name, "m", state, threads, None, None, None, threads_asked=asked,
                      threads_pinned=pinned, allowed_cpus=allowed, quota=quota)


def snap(now: float, *workers: WorkerView, others: float = 0.0, idle: float = 0.0,
         wait: float = 0.0, cpus: int = 2, trigger: str = "") -> Snapshot:
    loads = {w.name: WorkerLoad(w.threads, w.threads, 1.0, wait, 0.0) for w in workers}
    view = CpuView(seconds=1.0, samples=5, cpus=cpus, idle=idle, others_running=others,
                   others_cpu=others, stall=None, workers=loads, trigger=trigger)
    return Snapshot(now=now, workers=workers, cpu=view)


def only(actions) -> tuple[str, int, str]:
    assert len(actions) == 1, actions
    a = actions[0]
    assert a.kind == "set_threads"
    return a.target, a.values["threads"], a.reason


def test_a_quiet_machine_keeps_every_thread():
    p = Threads()
    for t in range(20):
        assert p.on_event(CPU, snap(t * 0.2, worker(), others=0.05, idle=0.02)) == []


def test_a_busy_neighbour_takes_a_thread_at_once_and_gives_it_back_after_a_calm():
    p = Threads(raise_after_s=3.0, interval_s=0.5)
    name, n, why = only(p.on_event(CPU, snap(10.0, worker(), others=1.0, wait=0.6)))
    assert (name, n) == ("m-0", 1) and why.startswith("contention")
    # the neighbour leaves: a CPU is idle, but the count comes back only after 3 s of it
    w1 = worker(threads=1)
    assert p.on_event(CPU, snap(11.0, w1, others=0.0, idle=0.95)) == []
    assert p.on_event(CPU, snap(13.9, w1, others=0.0, idle=0.95)) == []
    name, n, why = only(p.on_event(CPU, snap(14.0, w1, others=0.0, idle=0.95)))
    assert n == 2 and why.startswith("affinity: 2 CPUs")


def test_a_flickering_signal_changes_the_count_at_most_once_per_interval():
    p = Threads(interval_s=1.0, raise_after_s=2.0)
    changes, threads = [], 2
    for i in range(100):  # a neighbour that comes and goes every reading, for 20 s
        now, busy = i * 0.2, i % 2 == 0
        s = snap(now, worker(threads=threads), others=1.0 if busy else 0.0,
                 idle=0.0 if busy else 0.9, wait=0.5 if busy else 0.0)
        for a in p.on_event(CPU, s):
            changes.append(now)
            threads = a.values["threads"]
    assert changes == [0.0]  # dropped once; never free long enough to take it back
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(changes))


def test_a_busy_worker_whose_threads_do_not_wait_keeps_them():
    # others runnable on CPUs it does not use (affinity): its own threads never wait
    p = Threads(wait_min=0.1)
    assert p.on_event(CPU, snap(0, worker(), others=1.0, wait=0.01)) == []
    assert only(p.on_event(CPU, snap(1, worker(), others=1.0, wait=0.3)))[1] == 1


def test_a_trigger_on_the_workers_own_scope_confirms_that_it_waited():
    # the readings' own wait is diluted (the last timed reading was up to 1 s ago), but
    # the kernel fired the trigger on this worker's cpu.pressure
    p = Threads(wait_min=0.1)
    assert p.on_event(CPU, snap(0, worker(), others=2.0, wait=0.04)) == []
    assert p.on_event(CPU, snap(0.1, worker(), others=2.0, wait=0.04,
                                trigger="threads/other-0")) == []
    assert only(p.on_event(CPU, snap(0.2, worker(), others=2.0, wait=0.04,
                                     trigger="threads/m-0")))[1] == 1


def test_an_idle_worker_follows_others_without_waiting_itself():
    p = Threads()
    assert only(p.on_event(CPU, snap(0, worker(state="idle"), others=1.0)))[1] == 1


def test_a_quota_cuts_at_once_and_names_itself():
    p = Threads(interval_s=10.0, raise_after_s=10.0)
    four = {"allowed": 4}
    _, n, _ = only(p.on_event(CPU, snap(0, worker(threads=4, **four), cpus=4, others=1.0,
                                           wait=0.5)))
    assert n == 3  # a change just happened: the interval does not hold back a quota cut
    limited = worker(threads=3, quota=1.5, **four)
    _name, n, why = only(p.on_event(LimitsSet("m"), snap(0.1, limited, cpus=4)))
    assert n == 1 and why == "quota: 1.5 CPUs"


def test_a_pinned_worker_is_left_alone_and_its_threads_count_as_taken():
    p = Threads()
    pinned = worker("a-0", threads=1, pinned=True)
    free = worker("b-0", state="busy", threads=2)
    name, n, _ = only(p.on_event(CPU, snap(0, pinned, free, others=0.0, wait=0.4)))
    assert (name, n) == ("b-0", 1)


def test_generating_workers_share_the_free_cpus():
    p = Threads()
    a, b = worker("a-0", threads=2), worker("b-0", threads=2)
    actions = p.on_event(CPU, snap(0, a, b, others=0.0, wait=0.5, cpus=2))
    assert sorted((x.target, x.values["threads"]) for x in actions) == [("a-0", 1), ("b-0", 1)]
    assert "shared by 2 generating workers" in actions[0].reason


def test_a_count_already_asked_for_is_not_asked_again():
    p = Threads(interval_s=0.2)
    assert only(p.on_event(CPU, snap(0, worker(), others=1.0, wait=0.5)))[1] == 1
    # the worker has not confirmed yet (mid-decode): no second action
    assert p.on_event(CPU, snap(1, worker(asked=1), others=1.0, wait=0.5)) == []


def test_no_view_yet_means_only_the_cap_counts():
    p = Threads()
    s = Snapshot(now=0, workers=(worker(threads=2, allowed=2),))
    assert p.on_event(CPU, s) == []
    s = Snapshot(now=0, workers=(worker(threads=2, allowed=1),))
    assert only(p.on_event(CPU, s))[1:] == (1, "affinity: 1 CPUs")


@pytest.mark.parametrize(("settings", "key"), [
    ({"interval_s": 0}, "interval_s"),
    ({"interval_s": 0.1}, "interval_s"),
    ({"raise_after_s": 1.0, "interval_s": 2.0}, "raise_after_s"),
    ({"margin": 1.5}, "margin"),
    ({"idle_min": -0.1}, "idle_min"),
    ({"nope": 1}, "nope"),
])
def test_settings_that_would_oscillate_or_make_no_sense_are_refused_by_name(settings, key):
    with pytest.raises(PolicyError, match=key):
        Threads(**settings)
    p = Threads()
    before = dict(p.settings)
    with pytest.raises(PolicyError, match=key):
        p.configure(**settings)
    assert p.settings == before  # nothing changed
