"""Policies with a fake clock and scripted snapshots: no daemon, no kernel."""

from __future__ import annotations

import pytest
from llm_residentd.policies import PolicyError, PsiTrigger, Queued, Snapshot, Tick
from llm_residentd.policies.base import Pressure, RequestView, WorkerView
from llm_residentd.policies.psi_admission import PsiAdmission
from llm_residentd.policies.static import Static


def snap(now: float, cpu: float, queued: int = 2, waited: float = 0.0) -> Snapshot:
    reqs = tuple(RequestView(f"r{i}", "m", 0, 10, 16, waited) for i in range(queued))
    worker = WorkerView("m-0", "m", "idle", 2, None, None, None)
    return Snapshot(now=now, system={"cpu": Pressure(some_avg10=cpu)}, workers=(worker,),
                    queued=reqs)


def kinds(actions) -> list[str]:
    return [a.kind for a in actions]


def test_psi_admission_defers_on_a_trigger_and_readmits_after_calm():
    p = PsiAdmission(defer_above=40, admit_below=20, calm_s=2, keep_running=0)
    assert kinds(p.on_event(Tick(), snap(0, 90))) == ["admit", "admit"]  # no trigger yet
    assert kinds(p.on_event(PsiTrigger("system/cpu"), snap(1, 60))) == ["defer"] * 2
    assert kinds(p.on_event(Tick(), snap(2, 15))) == ["defer"] * 2  # calm starts
    assert kinds(p.on_event(Tick(), snap(3, 25))) == ["defer"] * 2  # not calm: reset
    assert kinds(p.on_event(Tick(), snap(4, 10))) == ["defer"] * 2
    assert kinds(p.on_event(Tick(), snap(5.9, 10))) == ["defer"] * 2
    assert kinds(p.on_event(Tick(), snap(6, 10))) == ["admit"] * 2  # 2 s calm


def test_psi_admission_ignores_low_pressure_triggers_and_other_resources():
    p = PsiAdmission(defer_above=40)
    assert kinds(p.on_event(PsiTrigger("system/cpu"), snap(0, 30))) == ["admit"] * 2
    assert kinds(p.on_event(PsiTrigger("system/memory"), snap(1, 90))) == ["admit"] * 2


def test_psi_admission_never_starves_a_request():
    p = PsiAdmission(defer_above=40, max_defer_s=5, keep_running=0)
    p.on_event(PsiTrigger("system/cpu"), snap(0, 80))
    actions = p.on_event(Tick(), snap(1, 80, queued=1, waited=5.0))
    assert kinds(actions) == ["admit"] and "anyway" in actions[0].reason


def test_scope_pressure_counts_only_when_asked():
    worker = WorkerView("m-0", "m", "busy", 1, 0.5, None, None, {"cpu": Pressure(some_avg10=70)})
    s = Snapshot(now=0, system={"cpu": Pressure(some_avg10=5)}, workers=(worker,),
                 queued=(RequestView("r1", "m", 0, 5, 8, 0.0),))
    p = PsiAdmission(defer_above=40, keep_running=0)
    assert kinds(p.on_event(PsiTrigger("m-0/cpu"), s)) == ["admit"]  # own throttling
    p = PsiAdmission(defer_above=40, keep_running=0, scope_pressure=True)
    assert kinds(p.on_event(PsiTrigger("m-0/cpu"), s)) == ["defer"]


def test_psi_admission_follows_pressure_outside_the_workers_not_the_system():
    queued = (RequestView("r1", "m", 0, 5, 8, 0.0),)
    own = Snapshot(now=0, system={"cpu": Pressure(some_avg10=50)}, queued=queued,
                   outside={"cpu": Pressure(some_avg10=2)})  # the workers' own throttling
    p = PsiAdmission(defer_above=40, keep_running=0)
    assert kinds(p.on_event(PsiTrigger("system/cpu"), own)) == ["admit"]
    hog = Snapshot(now=1, system={"cpu": Pressure(some_avg10=50)}, queued=queued,
                   outside={"cpu": Pressure(some_avg10=45)})  # a neighbour stalls
    assert kinds(p.on_event(PsiTrigger("system/cpu"), hog)) == ["defer"]
    assert p.events is not None and {"pressure", "tick", "queued"} <= p.events


def test_psi_admission_keeps_the_model_working_while_it_defers():
    p = PsiAdmission(defer_above=40, keep_running=1)
    assert kinds(p.on_event(PsiTrigger("system/cpu"), snap(0, 80, queued=3))) == [
        "admit", "defer", "defer"]  # nothing runs: the first in line may
    running = (RequestView("r0", "m", 0, 10, 16, 1.0, worker="m-0"),)
    queued = tuple(RequestView(f"r{i}", "m", 0, 10, 16, 1.0) for i in (1, 2))
    busy = Snapshot(now=1, system={"cpu": Pressure(some_avg10=80)}, queued=queued,
                    running=running)
    assert kinds(p.on_event(Tick(), busy)) == ["defer", "defer"]


def test_psi_admission_keep_running_counts_per_model():
    p = PsiAdmission(defer_above=40, keep_running=2)
    running = (RequestView("a0", "a", 0, 10, 16, 1.0, worker="a-0"),)
    queued = (RequestView("a1", "a", 0, 10, 16, 0.0), RequestView("a2", "a", 0, 10, 16, 0.0),
              RequestView("b1", "b", 0, 10, 16, 0.0), RequestView("b2", "b", 0, 10, 16, 0.0),
              RequestView("b3", "b", 0, 10, 16, 0.0))
    s = Snapshot(now=0, system={"cpu": Pressure(some_avg10=90)}, queued=queued, running=running)
    actions = p.on_event(PsiTrigger("system/cpu"), s)
    assert [(a.target, a.kind) for a in actions] == [
        ("a1", "admit"), ("a2", "defer"), ("b1", "admit"), ("b2", "admit"), ("b3", "defer")]


def test_static_sets_limits_once_per_configuration():
    p = Static(cpu="50%")
    first = p.on_event(Tick(), snap(0, 0))
    assert [(a.kind, a.target, a.values["cpu"]) for a in first] == [("set_limits", "m", "50%")]
    assert p.on_event(Tick(), snap(1, 0)) == []
    p.configure(cpu="75%")
    assert p.on_event(Tick(), snap(2, 0))[0].values["cpu"] == "75%"


@pytest.mark.parametrize("settings, words", [
    ({"nope": 1}, "no parameter 'nope'"),
    ({"defer_above": 140}, "above the maximum"),
    ({"defer_above": "lots"}, "is not a float"),
    ({"calm_s": float("nan")}, "finite"),
])
def test_bad_parameters_are_refused_and_change_nothing(settings, words):
    p = PsiAdmission()
    before = dict(p.settings)
    with pytest.raises(PolicyError, match=words):
        p.configure(**settings)
    assert p.settings == before


@pytest.mark.parametrize("settings, words", [
    ({"cpu": "banana"}, "cpu 'banana': use a percentage"),
    ({"cpu": "50%", "memory_high": "lots"}, "memory_high 'lots': use a size"),
    ({"memory_high": "1K"}, "must be at least"),
])
def test_static_values_are_checked_by_their_syntax_before_anything_changes(settings, words):
    p = Static(cpu="75%")
    with pytest.raises(PolicyError, match=words):
        p.configure(**settings)
    assert p.settings == {"cpu": "75%", "memory_high": "max"}
    with pytest.raises(PolicyError, match=words):
        Static(**settings)


def test_text_values_from_the_cli_are_converted():
    p = PsiAdmission()
    p.configure(defer_above="55.5", calm_s="3")
    assert p.settings["defer_above"] == 55.5 and p.settings["calm_s"] == 3.0


def test_builtins_load_through_the_entry_point_group():
    from llm_residentd.policies import available
    found, errors = available()
    assert {"static", "psi-admission"} <= set(found) and not errors
    assert found["psi-admission"] is PsiAdmission
    for cls in found.values():
        assert cls.__module__ and __import__(cls.__module__, fromlist=["x"]).__doc__


def test_docs_policies_md_is_generated_from_the_policies():
    from pathlib import Path

    from llm_residentd.policies import docs
    path = Path(__file__).parents[2] / "docs" / "policies.md"
    assert path.read_text() == docs.render(), (
        "docs/policies.md is stale: python -m llm_residentd.policies.docs > docs/policies.md")


def _worker(name="m-0", model="m", cpu=None, high=None, current=None, mem_total=0):
    return WorkerView(name, model, "busy", 1, cpu, high, current,
                      {"memory": Pressure(some_total=mem_total)})


def test_neighbour_guard_cuts_multiplicatively_and_gives_back_additively():
    from llm_residentd.policies.neighbour_guard import NeighbourGuard
    p = NeighbourGuard(high=30, low=10, decrease=0.5, step=0.25, min_cpu=0.25, max_cpu=2,
                       interval_s=2)

    quota = [None]  # what the daemon reports: it applies every action

    def cpu_at(now, pressure, applied=True):
        s = Snapshot(now=now, system={"cpu": Pressure(some_avg10=pressure)},
                     workers=(_worker(cpu=quota[0]),))
        values = [a.values["cpu"] for a in p.on_event(Tick(), s)]
        if values and applied:
            quota[0] = float(values[0].rstrip("%")) / 100
        return values

    assert cpu_at(0, 50) == ["100%"]  # no quota counts as max_cpu 2: cut in half
    assert cpu_at(1, 50) == []  # within interval_s: no decision
    assert cpu_at(2, 50, applied=False) == ["50%"]
    assert cpu_at(4, 50) == ["50%"]  # the last change failed: the same step again
    assert cpu_at(6, 50) == ["25%"]
    assert cpu_at(8, 50) == []  # at the floor: nothing changes
    assert cpu_at(10, 20) == []  # between low and high: hold
    assert cpu_at(12, 5) == ["50%"]  # calm: +0.25 CPU
    assert cpu_at(14, 5) == ["75%"]
    assert p.on_event(PsiTrigger("system/cpu"), Snapshot(now=16)) == []


def test_neighbour_guard_sets_the_ceiling_on_an_unlimited_model_when_calm():
    from llm_residentd.policies.neighbour_guard import NeighbourGuard
    p = NeighbourGuard(max_cpu=1.5)
    s = Snapshot(now=0, system={"cpu": Pressure(some_avg10=0)}, workers=(_worker(),))
    assert [a.values["cpu"] for a in p.on_event(Tick(), s)] == ["150%"]


def test_neighbour_guard_narrows_the_batch_with_the_quota():
    """Issue 14: the slots a worker fills follow the quota, ceil(parallel x quota /
    max_cpu), at least one; at max_cpu the limit is lifted (set_batch 64)."""
    from llm_residentd.policies.neighbour_guard import NeighbourGuard
    p = NeighbourGuard(high=30, low=10, decrease=0.5, step=0.5, min_cpu=0.25, max_cpu=2,
                       interval_s=1)
    state = {"cpu": None, "limit": 8}  # what the daemon reports: it applies every action

    def tick(now: float, pressure: float) -> dict[str, object]:
        workers = tuple(WorkerView(f"m-{i}", "m", "busy", 1, state["cpu"], None, None,
                                   slots=8, slots_busy=min(8, state["limit"]),
                                   batch_limit=state["limit"]) for i in range(2))
        s = Snapshot(now=now, outside={"cpu": Pressure(some_avg10=pressure)}, workers=workers)
        out = {}
        for a in p.on_event(Tick(), s):
            assert a.target == "m"
            if a.kind == "set_limits":
                out["cpu"] = state["cpu"] = float(a.values["cpu"].rstrip("%")) / 100
            else:
                assert a.kind == "set_batch"
                out["sequences"] = a.values["sequences"]
                state["limit"] = min(8, a.values["sequences"])
        return out

    assert tick(0, 50) == {"cpu": 1.0, "sequences": 4}  # half the quota: half the slots
    assert tick(1, 50) == {"cpu": 0.5, "sequences": 2}
    assert tick(2, 50) == {"cpu": 0.25, "sequences": 1}
    assert tick(3, 50) == {}  # at the floor: nothing changes
    assert tick(4, 5) == {"cpu": 0.75, "sequences": 3}  # ceil(8 x 0.75 / 2)
    assert tick(5, 5) == {"cpu": 1.25, "sequences": 5}
    assert tick(6, 5) == {"cpu": 1.75, "sequences": 7}
    assert tick(7, 5) == {"cpu": 2.0, "sequences": 64}  # back at max_cpu: no limit
    assert tick(8, 5) == {}
    off = NeighbourGuard(scale_batch=False)
    w = WorkerView("m-0", "m", "busy", 1, None, None, None, slots=8, slots_busy=8, batch_limit=8)
    assert kinds(off.on_event(Tick(), Snapshot(
        now=0, outside={"cpu": Pressure(some_avg10=50)}, workers=(w,)))) == ["set_limits"]


def test_psi_admission_keep_running_counts_sequences_not_workers():
    """Issue 14: four sequences in one worker's batch are four running requests."""
    p = PsiAdmission(defer_above=40, keep_running=3)
    running = tuple(RequestView(f"r{i}", "m", 0, 10, 16, 1.0, worker="m-0") for i in range(2))
    queued = tuple(RequestView(f"q{i}", "m", 0, 10, 16, 0.0) for i in range(3))
    w = WorkerView("m-0", "m", "busy", 1, None, None, None, slots=4, slots_busy=2, batch_limit=4)
    s = Snapshot(now=0, outside={"cpu": Pressure(some_avg10=90)}, workers=(w,), queued=queued,
                 running=running)
    actions = p.on_event(PsiTrigger("system/cpu"), s)
    assert [(a.target, a.kind) for a in actions] == [("q0", "admit"), ("q1", "defer"),
                                                     ("q2", "defer")]


def test_memory_tuner_probes_down_when_calm_and_backs_off_under_stall():
    from llm_residentd.policies.memory_tuner import MemoryTuner
    mb = 1 << 20
    p = MemoryTuner(target_us=10_000, probe=0.01, backoff=0.2, min_bytes=64 * mb,
                    max_bytes=1024 * mb, interval_s=6)

    def decide(now, high, total):
        s = Snapshot(now=now, workers=(_worker(high=high, current=300 * mb, mem_total=total),))
        return [int(a.values["memory_high"]) for a in p.on_event(Tick(), s)]

    assert decide(0, None, 1000) == []  # baseline only
    assert decide(6, None, 2000) == [int(300 * mb * 0.99) // 4096 * 4096]  # from memory.current
    assert decide(12, 400 * mb, 5000) == [int(400 * mb * 0.99) // 4096 * 4096]
    assert decide(18, 400 * mb, 50_000) == [480 * mb]  # 45 ms of stall: back off by 20 %
    assert decide(20, 480 * mb, 90_000) == []  # within interval_s
    assert decide(24, 1000 * mb, 500_000) == [1024 * mb]  # capped at max_bytes
    assert decide(30, 65 * mb, 900_000) == [int(65 * mb * 1.2) // 4096 * 4096]
    assert decide(36, 64 * mb, 900_001) == [64 * mb]  # calm again: probing stops at min_bytes


def test_sjf_ranks_by_predicted_size_with_aging():
    from llm_residentd.policies.sjf import ShortestJobFirst
    p = ShortestJobFirst(aging=10, chars_per_token=4)
    reqs = (RequestView("long", "m", 0, 400, 200, 0.0),  # 100 + 200 = 300
            RequestView("short", "m", 0, 40, 10, 0.0),  # 10 + 10 = 20
            RequestView("old", "m", 0, 400, 200, 30.0))  # 300 - 10 * 30 = 0
    actions = p.on_event(Queued("short", "m"), Snapshot(now=0, queued=reqs))
    ranks = {a.target: a.values["rank"] for a in actions}
    assert ranks == {"long": 300.0, "short": 20.0, "old": 0.0}
    assert {a.kind for a in actions} == {"rank"}


def test_neighbour_guard_gives_back_when_only_its_own_throttling_remains():
    from llm_residentd.policies.neighbour_guard import NeighbourGuard
    p = NeighbourGuard(high=30, low=10, step=0.25, min_cpu=0.25, max_cpu=2, interval_s=1)
    s = Snapshot(now=0, system={"cpu": Pressure(some_avg10=60)},
                 outside={"cpu": Pressure(some_avg10=3)}, workers=(_worker(cpu=0.25),))
    assert [a.values["cpu"] for a in p.on_event(Tick(), s)] == ["50%"]
    s = Snapshot(now=1, system={"cpu": Pressure(some_avg10=60)},
                 outside={"cpu": Pressure(some_avg10=40)}, workers=(_worker(cpu=0.5),))
    assert [a.values["cpu"] for a in p.on_event(Tick(), s)] == ["25%"]


def test_an_action_declares_its_values_and_their_ranges():
    from llm_residentd.policies import Rank, SetLimits, SetThreads, ShrinkKv
    assert ShrinkKv("m-0", 512).values == {"n_ctx": 512}  # not given: the worker's default
    assert SetLimits("m", cpu="50%").values == {"cpu": "50%"}
    assert Rank("r0", 3).checked() == Rank("r0", 3.0)
    with pytest.raises(PolicyError, match=r"set_threads threads=0: expected `int` >= 1$"):
        SetThreads("m-0", 0, reason="r").checked()
    with pytest.raises(PolicyError, match=r"shrink_kv keep=-5: expected `int` >= 0$"):
        ShrinkKv("m-0", 512, keep=-5).checked()
