"""The request path of Service driven with fakes (issue 20: it takes its collaborators):
real models, queues, slots and worker handles; a recording policy engine and lifecycle;
no process, no scope, no llama. Each request ends once, with done or a reason."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog.testing
from llm_residentd.catalog.config import Config, ModelConfig
from llm_residentd.core.models import Models
from llm_residentd.core.service import Service
from llm_residentd.core.slots import Slots
from llm_residentd.core.workers import Worker
from llm_residentd.placement.scopes import Backend
from llm_residentd.policies import Event
from llm_residentd.wire import messages
from llm_residentd.wire.events import as_map
from llm_residentd.wire.messages import RequestParams
from llm_residentd.wire.protocol import ProtocolError
from test_worker_slots import Writer, stats


class Engine:
    """The policy engine as the request path sees it: hears events, defers nothing."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None]] = []
        self.deferred: set[str] = set()
        self.kv_asked: dict[str, str] = {}

    def notify(self, event: Event) -> None:
        self.events.append((event.kind, event.request))

    def is_deferred(self, request_id: str) -> bool:
        return request_id in self.deferred

    def rank(self, request_id: str) -> float:
        return 0.0

    def forget(self, request_id: str) -> None:
        self.deferred.discard(request_id)


class Lifecycle:
    def __init__(self) -> None:
        self.accepted_keep_alive: list[str | None] = []

    def accepted(self, req: Any, keep_alive: str | None) -> None:
        self.accepted_keep_alive.append(keep_alive)

    def check(self) -> None:
        pass


def service_with(slots: int = 1, workers: int = 1) -> tuple[Service, list[Writer]]:
    """A Service over model "m", its workers loaded with `slots` slots each."""
    cfg = ModelConfig(name="m", path="/m.gguf", parallel=slots)
    models = Models()
    model = models.add(cfg)
    service = Service(Config(models={"m": cfg}), Path("/unused.sock"), Path("/unused"),
                      models=models, slots=Slots(models), engine=Engine(),  # type: ignore[arg-type]
                      fleet=SimpleNamespace(placement=SimpleNamespace(backend=Backend())),
                      watches=None, observer=None,  # type: ignore[arg-type]
                      lifecycle=Lifecycle())  # type: ignore[arg-type]
    writers = []
    for index in range(workers):
        worker = Worker(cfg, index, service, 30.0)
        worker.state, worker.slots, worker.pid = "idle", slots, 1000 + index
        worker._writer = writer = Writer()  # type: ignore[assignment]
        model.workers.append(worker)
        writers.append(writer)
    return service, writers


async def from_worker(service: Service, index: int, *msgs: messages.FromWorker) -> None:
    """What worker `index` sends, through its read loop (the stream stays open)."""
    reader = asyncio.StreamReader()
    reader.feed_data(b"".join(messages.frame(m) for m in msgs))
    reader.feed_eof()
    worker = service.models["m"].workers[index]
    worker._reap = lambda: asyncio.sleep(0)  # type: ignore[method-assign]
    await worker._read_loop(reader)


def submit(service: Service, prompt: str, priority: int = 0, uid: int = 1000,
           timeout: float | None = None) -> tuple[str, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    req, _ = service.submit("m", RequestParams(max_tokens=8, prompt=prompt), priority,
                            timeout, uid, sink=lambda event: events.append(as_map(event)))
    return req.id, events


def test_the_higher_priority_runs_first_and_each_request_ends_once():
    async def go() -> None:
        service, (writer,) = service_with(slots=1)
        low, low_events = submit(service, "low")
        high, high_events = submit(service, "high", priority=5)
        await asyncio.sleep(0)  # the queued events, then dispatch: both wait by then
        assert [(type(m).__name__, m.req) for m in writer.sent] == [("Generate", high)]
        await from_worker(service, 0, messages.Token(req=high, text="a", tokens=1),
                          messages.Done(req=high, stats=stats(1)))
        assert [e["event"] for e in high_events] == ["token", "done"]
        assert high_events[1]["stats"]["completion_tokens"] == 1
        assert [(type(m).__name__, m.req) for m in writer.sent][-1] == ("Generate", low)
        await from_worker(service, 0, messages.Done(req=low, stats=stats(2)))
        assert [e["event"] for e in low_events] == ["done"]
        assert service.requests == {}
        assert service.models["m"].metrics.snapshot()["completion_tokens"] == 3
        assert [e for e in service.engine.events if e[0] != "queued"] == [  # type: ignore[attr-defined]
            ("started", high), ("finished", high), ("started", low), ("finished", low)]

    with structlog.testing.capture_logs():
        asyncio.run(go())


def test_queued_requests_come_out_by_priority():
    async def go() -> None:
        service, (writer,) = service_with(slots=1)
        first, _ = submit(service, "busy")
        await asyncio.sleep(0)
        order = [submit(service, f"p{p}", priority=p)[0] for p in (1, 7, 3)]
        await from_worker(service, 0, messages.Done(req=first, stats=stats(1)))
        assert [m.req for m in writer.sent if isinstance(m, messages.Generate)] == [
            first, order[1]]
        assert [r.id for r in service.models["m"].queue] == [order[2], order[0]]

    with structlog.testing.capture_logs():
        asyncio.run(go())


def test_cancel_is_the_owners_or_roots_and_a_running_request_is_told_to_stop():
    async def go() -> None:
        service, (writer,) = service_with(slots=1)
        running, running_events = submit(service, "a", uid=1000)
        queued, queued_events = submit(service, "b", uid=1000)
        await asyncio.sleep(0)
        with pytest.raises(ProtocolError) as err:
            service.cancel(queued, uid=1001)
        assert err.value.code == "forbidden"
        service.cancel(queued, uid=1000)
        assert queued_events[-1]["error"]["code"] == "cancelled"
        service.cancel(running, uid=0)
        assert writer.sent[-1] == messages.Cancel(req=running)
        assert running_events[-1]["error"]["code"] == "cancelled"
        with pytest.raises(ProtocolError) as err:
            service.cancel(running, uid=0)
        assert err.value.code == "no_such_request"

    with structlog.testing.capture_logs():
        asyncio.run(go())


def test_a_timeout_fails_a_request_and_a_held_one_says_a_policy_held_it():
    async def go() -> None:
        service, _ = service_with(slots=1)
        submit(service, "busy")
        await asyncio.sleep(0)
        waiting, events = submit(service, "waits", timeout=0.01)
        held, held_events = submit(service, "held", timeout=0.01)
        service.engine.deferred.add(held)  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        assert events[-1]["error"]["code"] == "timeout"
        assert held_events[-1]["error"]["code"] == "deferred_timeout"
        assert waiting not in service.requests and held not in service.requests

    with structlog.testing.capture_logs():
        asyncio.run(go())


def test_a_request_whose_worker_died_before_a_token_waits_for_another():
    async def go() -> None:
        service, _ = service_with(slots=1, workers=2)
        a, a_events = submit(service, "a")
        b, b_events = submit(service, "b")
        await asyncio.sleep(0)
        worker0, worker1 = service.models["m"].workers
        assert list(worker0.running) == [a] and list(worker1.running) == [b]
        await from_worker(service, 1, messages.Token(req=b, text="x", tokens=1))
        # both die; a had no token yet: it is queued again for the next worker; b had one
        worker0.state = worker1.state = "restarting"
        service.worker_lost(worker0, worker0.running.pop(a), "worker_died", "killed")
        service.worker_lost(worker1, worker1.running.pop(b), "worker_died", "killed")
        assert [r.id for r in service.models["m"].queue] == [a] and a_events == []
        assert b_events[-1]["event"] == "error" and b_events[-1]["error"]["code"] == "worker_died"

    with structlog.testing.capture_logs():
        asyncio.run(go())


def test_a_stopping_service_takes_nothing_and_fails_what_it_has():
    async def go() -> None:
        service, _ = service_with(slots=1)
        _, events = submit(service, "a")
        service.fail_all()
        assert events[-1]["error"]["code"] == "shutting_down"
        with pytest.raises(ProtocolError) as err:
            submit(service, "b")
        assert err.value.code == "shutting_down"

    with structlog.testing.capture_logs():
        asyncio.run(go())


class FailingWriter(Writer):
    """A connection whose next write fails (what the hand-over does with any error)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def write(self, data: bytes) -> None:
        if self.fail:
            self.fail = False
            raise RuntimeError("injected")
        super().write(data)


@pytest.mark.parametrize("how", ["unencodable", "write fails"])
def test_a_failed_hand_over_fails_the_request_at_once_and_frees_its_slot(how):
    """Whatever breaks the hand-over to a worker (text msgpack cannot carry, which the
    submit op's checks refuse before it gets here; a failing write), the request ends
    with handover_failed, its slot stays free, and the next request runs on that worker."""
    async def go() -> None:
        service, (writer,) = service_with(slots=1)
        worker = service.models["m"].workers[0]
        if how == "write fails":
            worker._writer = writer = FailingWriter()  # type: ignore[assignment]
        bad, bad_events = submit(service, "hi \ud800" if how == "unencodable" else "hi")
        good, good_events = submit(service, "fine")
        await asyncio.sleep(0)
        assert bad_events[-1]["event"] == "error"
        assert bad_events[-1]["error"]["code"] == "handover_failed"
        assert bad not in service.requests and bad not in worker.running
        assert list(worker.running) == [good]
        assert writer.kinds() == [("Generate", good)]
        await from_worker(service, 0, messages.Done(req=good, stats=stats(1)))
        assert [e["event"] for e in good_events] == ["done"]
        assert worker.running == {} and service.requests == {}

    with structlog.testing.capture_logs() as logs:
        asyncio.run(go())
    errors = [(e["event"], e.get("code")) for e in logs if e["log_level"] == "error"]
    assert errors == [("handover_failed", None), ("request_finished", "handover_failed")]
