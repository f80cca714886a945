"""The lifecycle's choices on a fake host: which idle model goes for memory pressure, and
whose memory a load may take. The real proof is tests/integration/test_model_lifecycle.py
and tests/guest/test_model_lifecycle.py; this checks the choices a host test cannot make
happen (PSI triggers) or make exact (the order among several idle models)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from llm_residentd.catalog.config import Config, DaemonConfig, ModelConfig
from llm_residentd.core import memfit
from llm_residentd.core.lifecycle import Lifecycle
from llm_residentd.core.models import Models
from llm_residentd.core.requests import Request
from llm_residentd.wire.messages import RequestParams
from llm_residentd.wire.protocol import ProtocolError

MIB = 1 << 20


class Host:
    def __init__(self, names: list[str], budget: str = "max") -> None:
        self.config = Config(daemon=DaemonConfig(memory_budget=budget, pressure_unload_grace=5),
                             models={n: ModelConfig(name=n, path="/m.gguf") for n in names})
        self.models = Models()
        for model in self.config.models.values():
            self.models.add(model)
        self.fleet = SimpleNamespace(retire=self.retire)
        self.backend = SimpleNamespace(parent=None)
        self.recorded: list[tuple[str, str, str]] = []
        self.engine = SimpleNamespace(
            record=lambda who, what, result: self.recorded.append(
                (what.kind, what.target, what.reason)))

    async def retire(self, workers, grace, finish_requests=True) -> None:
        pass


def loaded(lc: Lifecycle, name: str, last_used: float, idle_since: float | None,
           keep_alive: float | None, size: int = 100 * MIB) -> None:
    life = lc.models[name].life
    life.state, life.last_used, life.idle_since, life.keep_alive = (
        "loaded", last_used, idle_since, keep_alive)
    life.need = memfit.Need(bytes=size, weights=size, kv=0, overhead=0, measured=False)


@pytest.fixture
def clock():
    return SimpleNamespace(now=100.0)


def lifecycle(host: Host, clock) -> Lifecycle:
    lc = Lifecycle(host, host.models, clock=lambda: clock.now)  # type: ignore[arg-type]
    lc._measured = lambda name: 0  # no processes here: the estimates are the charges
    return lc


def test_memory_pressure_unloads_the_least_recently_used_idle_model_past_its_grace(clock):
    async def go():
        host = Host(["a", "b", "c", "d"])
        lc = lifecycle(host, clock)
        loaded(lc, "a", last_used=10, idle_since=10, keep_alive=None)  # kept forever
        loaded(lc, "b", last_used=20, idle_since=20, keep_alive=300)
        loaded(lc, "c", last_used=30, idle_since=30, keep_alive=300)
        loaded(lc, "d", last_used=98, idle_since=98, keep_alive=300)  # idle 2 s < grace 5
        lc.pressure("system/cpu")  # not memory: nothing
        await asyncio.sleep(0)
        assert host.recorded == []
        lc.pressure("slice/memory")
        lc.pressure("system/memory")  # one at a time: b is still unloading
        await asyncio.sleep(0.01)
        assert [(k, t) for k, t, _ in host.recorded] == [("evict", "b")]
        assert "memory pressure (slice/memory PSI trigger)" in host.recorded[0][2]
        lc.pressure("system/memory")
        await asyncio.sleep(0.01)
        assert [t for _, t, _ in host.recorded] == ["b", "c"]
        lc.pressure("system/memory")
        await asyncio.sleep(0.01)
        assert [t for _, t, _ in host.recorded] == ["b", "c"]  # a forever, d within grace
        assert {n: lc.models[n].life.state for n in "abcd"} == {
            "a": "loaded", "b": "unloaded", "c": "unloaded", "d": "loaded"}
    asyncio.run(go())


class CacheWorker:
    """A worker whose prompt cache holds `held` bytes; set_prompt_cache answers at once."""

    def __init__(self, name: str, held: int) -> None:
        self.name, self.state, self.asked, self.running = name, "idle", [], {}
        self.cache = SimpleNamespace(now=SimpleNamespace(bytes=held))

    def set_prompt_cache(self, limit: int) -> None:
        self.asked.append(limit)
        self.cache.now.bytes = min(self.cache.now.bytes, limit)


def test_memory_pressure_shrinks_the_prompt_caches_before_any_model_goes(clock):
    """Issue 22: each memory trigger halves every prompt cache in memory (a small one is
    emptied); only a trigger that finds them all empty unloads an idle model. After
    CACHE_CALM_S without a trigger the caches get their size back."""
    from llm_residentd.core import lifecycle as lcmod

    async def go():
        host = Host(["a", "b"])
        lc = lifecycle(host, clock)
        loaded(lc, "a", last_used=10, idle_since=10, keep_alive=300)
        loaded(lc, "b", last_used=20, idle_since=20, keep_alive=300)
        lc.models["a"].life.cache_limit = 64 * MIB
        lc.models["b"].life.cache_limit = 8 * MIB
        big, small = CacheWorker("a-0", 64 * MIB), CacheWorker("b-0", 8 * MIB)
        lc.models["a"].workers.append(big)
        lc.models["b"].workers.append(small)
        lc.pressure("system/memory")
        await asyncio.sleep(0.01)
        assert (big.asked, small.asked, host.recorded) == ([32 * MIB], [0], [])
        for _ in range(2):  # 32 -> 16 -> 0 (16 MiB is the floor)
            lc.pressure("a-0/memory")
        await asyncio.sleep(0.01)
        assert big.asked == [32 * MIB, 16 * MIB, 0] and host.recorded == []
        lc.pressure("system/memory")  # nothing left in any cache: a model goes
        await asyncio.sleep(0.01)
        assert [(k, t) for k, t, _ in host.recorded] == [("evict", "a")]
        clock.now += lcmod.CACHE_CALM_S
        lc.check()
        assert small.asked == [0, 8 * MIB]  # b's size back
    asyncio.run(go())


def test_a_load_empties_the_other_prompt_caches_before_it_evicts_a_model(clock, monkeypatch):
    """Issue 22: an idle model's prompt cache is given back before the model itself."""
    from llm_residentd.core import lifecycle as lcmod

    monkeypatch.setattr(lcmod, "CACHE_GIVE_BACK_S", 0)

    async def go(cache: int, need: int) -> tuple[list, list]:
        host = Host(["new", "a"], budget=str(350 * MIB))
        lc = lifecycle(host, clock)
        loaded(lc, "a", last_used=10, idle_since=10, keep_alive=None)
        worker = CacheWorker("a-0", cache)
        worker.model = SimpleNamespace(name="a")
        lc.models["a"].workers.append(worker)
        new = lc.models["new"].life
        new.need = memfit.Need(bytes=need, weights=0, kv=0, overhead=0, measured=False)
        victims = await lc._make_room(new, explicit=True)
        return [v.name for v in victims], worker.asked

    # 350 MiB budget; a takes 100 MiB and its cache 100 more: emptying the cache makes
    # room for 240 MiB, and a stays.
    assert asyncio.run(go(100 * MIB, 240 * MIB)) == ([], [0])
    # A cache too small to make room is left alone: a goes.
    assert asyncio.run(go(10 * MIB, 260 * MIB)) == (["a"], [])


def test_a_load_evicts_idle_models_oldest_first_only_as_many_as_it_needs(clock):
    host = Host(["new", "a", "b", "c"], budget=str(350 * MIB))
    lc = lifecycle(host, clock)
    for name, used in (("a", 30), ("b", 10), ("c", 20)):
        loaded(lc, name, last_used=used, idle_since=used, keep_alive=None)
    new = lc.models["new"].life
    new.need = memfit.Need(bytes=150 * MIB, weights=0, kv=0, overhead=0, measured=False)
    fits, victims, room, possible = lc._plan(new)
    # 300 MiB loaded under 350: 50 free; b (least recently used) frees 100 more, enough.
    assert fits and [v.name for v in victims] == ["b"] and room.bytes == 150 * MIB
    # c is busy: not evictable, but it could end
    host.models["c"].queue.push(Request(id="busy", model="c", params=RequestParams(max_tokens=1)))
    new.need = memfit.Need(bytes=300 * MIB, weights=0, kv=0, overhead=0, measured=False)
    fits, victims, room, possible = lc._plan(new)
    assert not fits and victims == [] and possible  # wait for c
    new.need = memfit.Need(bytes=400 * MIB, weights=0, kv=0, overhead=0, measured=False)
    assert lc._plan(new)[3] is False  # never: more than the whole budget


def test_a_model_that_can_never_fit_fails_its_load_with_insufficient_memory(clock):
    async def go():
        host = Host(["a"], budget=str(64 * MIB))
        lc = lifecycle(host, clock)
        lc.models["a"].life.need = memfit.Need(bytes=100 * MIB, weights=0, kv=0, overhead=0,
                                         measured=False)
        with pytest.raises(ProtocolError) as err:
            await lc._make_room(lc.models["a"].life, explicit=True)
        assert err.value.code == "insufficient_memory"
        assert "needs about" in err.value.message and "daemon.memory_budget" in err.value.message
    asyncio.run(go())


def test_a_model_that_loads_at_start_reads_loading_before_the_backend_is_up(clock):
    """The sockets answer while Service.start still sets up the backend; `llmctl wait`
    takes "unloaded" for a model loaded on demand, so an at-start model must not say it."""
    host = Host(["first", "later"])  # load = "auto": the first loads at start
    lc = lifecycle(host, clock)
    first, later = lc.models["first"], lc.models["later"]
    assert (first.state(), later.state()) == ("loading", "unloaded")
    assert first.life.waiting == "the daemon is starting"
