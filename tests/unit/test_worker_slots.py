"""A worker with slots (issue 14), driven by typed messages from a scripted worker process:
dispatch fills free slots within the batch limits, replies are routed by request, a dead
process loses every running request and none of the queued ones, Batch reports are
tallied. No process, no llama: the daemon side of daemon/wire/messages.py only."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import structlog.testing
from llm_residentd.catalog.config import ModelConfig
from llm_residentd.control.policyengine import PolicyEngine
from llm_residentd.core import workers
from llm_residentd.core.actuator import Actuator
from llm_residentd.core.models import Models
from llm_residentd.core.requests import ModelQueue, Request
from llm_residentd.core.slots import Slots
from llm_residentd.core.workers import Worker
from llm_residentd.policies import (
    ACTIONS,
    Action,
    Admit,
    Event,
    Policy,
    SetBatch,
    Snapshot,
    Tick,
    TrimKv,
)
from llm_residentd.wire import events, messages
from llm_residentd.wire.messages import RequestParams


class Writer:
    """What the worker process would read: the decoded messages the daemon sent."""

    def __init__(self) -> None:
        self.sent: list[messages.ToWorker] = []

    def write(self, data: bytes) -> None:
        while data:
            size = int.from_bytes(data[:4], "big")
            self.sent.append(messages.to_worker(data[4:4 + size]))
            data = data[4 + size:]

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def kinds(self) -> list[tuple[str, str]]:
        return [(type(m).__name__, getattr(m, "req", "")) for m in self.sent]


class Listener:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def worker_idle(self, worker: Worker) -> None:
        self.calls.append(("idle", worker.name))

    def worker_done(self, worker: Worker, req: Request, msg: messages.Done) -> None:
        self.calls.append(("done", req.id, msg.stats.completion_tokens if msg.stats else None))

    def worker_error(self, worker: Worker, req: Request, code: str, message: str,
                     param: str | None = None) -> None:
        self.calls.append(("error", req.id, code))

    def worker_lost(self, worker: Worker, req: Request, code: str, message: str) -> None:
        self.calls.append(("lost", req.id, code, message))

    def worker_preempted(self, worker: Worker, req: Request, resume: messages.Resume) -> None:
        self.calls.append(("preempted", req.id, resume.generated))

    def worker_kv(self, worker: Worker, report: messages.Kv) -> None:
        self.calls.append(("kv", report.req, report.result))

    def oom_killed(self, worker: Worker) -> bool:
        return False


def serving_worker(index: int = 0, slots: int = 4,
                   listener: Listener | None = None) -> tuple[Worker, Writer]:
    """A worker as after Ready with `slots`: idle, with a pipe the test reads."""
    worker = Worker(ModelConfig(name="m", path="/m.gguf", parallel=slots), index,
                    listener or Listener(), 30.0)  # type: ignore[arg-type]
    worker.state, worker.slots, worker.pid = "idle", slots, 1000 + index
    worker._writer = writer = Writer()  # type: ignore[assignment]
    return worker, writer


def slots_of(*workers: Worker) -> Slots:
    """Slots over model "m" served by workers."""
    models = Models()
    models.add(ModelConfig(name="m", path="/m.gguf")).workers.extend(workers)
    return Slots(models)


def queue_of(n: int) -> ModelQueue:
    queue = ModelQueue("m", 64)
    for i in range(n):
        queue.push(Request(id=f"r{i}", model="m",
                           params=RequestParams(max_tokens=8, prompt=f"p{i}", temperature=0.0)))
    return queue


def fill(slots: Slots, queue: ModelQueue, workers: list[Worker]) -> list[str]:
    started, failed = slots.fill(queue, workers, lambda _id: False, lambda _id: 0.0)
    assert not failed
    return [r.id for r in started]


def feed(worker: Worker, *msgs: messages.FromWorker) -> None:
    """Run the worker's read loop over msgs, then the end of its stream."""
    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"".join(messages.frame(m) for m in msgs))
        reader.feed_eof()
        await worker._read_loop(reader)
    asyncio.run(run())


def stats(tokens: int) -> messages.Stats:
    return messages.Stats(prompt_tokens=3, completion_tokens=tokens, finish_reason="stop",
                          prefill_s=0.01, tokens_per_s=50.0)


def test_dispatch_fills_the_free_slots_and_no_more():
    worker, writer = serving_worker(slots=4)
    slots, queue = slots_of(worker), queue_of(6)
    assert fill(slots, queue, [worker]) == ["r0", "r1", "r2", "r3"]
    assert list(worker.running) == ["r0", "r1", "r2", "r3"] and worker.state == "busy"
    assert [r.id for r in queue] == ["r4", "r5"]  # they wait for a slot
    gen = writer.sent[0]
    assert isinstance(gen, messages.Generate)
    p = gen.params
    assert (gen.req, p.prompt, p.max_tokens, p.temperature) == ("r0", "p0", 8, 0.0)
    assert fill(slots, queue, [worker]) == []  # full


def test_replies_are_routed_per_request_and_a_freed_slot_is_filled():
    listener = Listener()
    worker, _ = serving_worker(slots=2, listener=listener)
    slots, queue = slots_of(worker), queue_of(3)
    fill(slots, queue, [worker])
    sink: list[events.Event] = []
    worker.running["r1"].sink = sink.append
    feed(worker, messages.Token(req="r1", text="Hi", tokens=2),
         messages.Done(req="r0", stats=stats(5)),
         messages.Token(req="r1", text=" there", tokens=1))
    assert sink == [events.Token(text="Hi", tokens=2), events.Token(text=" there", tokens=1)]
    assert listener.calls == [("done", "r0", 5), ("idle", "m-0")]
    assert list(worker.running) == ["r1"] and worker.served == 1 and worker.state == "busy"
    assert fill(slots, queue, [worker]) == ["r2"]
    feed(worker, messages.Error(req="r1", code="too_long", message="no room"),
         messages.Preempted(req="r2", resume=messages.Resume(
             context=[1, 2], prompt_tokens=1, generated=1, output=[2])))
    assert listener.calls[2:] == [("error", "r1", "too_long"), ("idle", "m-0"),
                                  ("preempted", "r2", 1), ("idle", "m-0")]
    assert worker.running == {} and worker.state == "idle" and worker.served == 2


def test_a_message_for_a_request_it_does_not_run_is_stray():
    listener = Listener()
    worker, _ = serving_worker(listener=listener)
    with structlog.testing.capture_logs() as logs:
        feed(worker, messages.Done(req="r9", stats=stats(1)), messages.Pong())
    assert listener.calls == []
    assert [(e["event"], e.get("req")) for e in logs] == [("worker_stray_message", "r9")]


def test_a_message_that_breaks_its_declaration_is_a_broken_stream():
    listener = Listener()
    worker, _ = serving_worker(listener=listener)
    bad = messages.HEADER.pack(11) + b"\x81\xa4type\xa4done"  # done without its req
    good = messages.frame(messages.Pong())

    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(bad + good)
        reader.feed_eof()
        await worker._read_loop(reader)
    with structlog.testing.capture_logs() as logs:
        asyncio.run(run())
    assert [e["event"] for e in logs] == ["worker_stream_broken"]
    assert "req" in logs[0]["error"]


class FakeProc:
    pid, returncode = 4242, -signal.SIGKILL

    async def wait(self) -> int:
        return self.returncode


def test_a_dead_process_loses_every_running_request_and_none_queued():
    listener = Listener()
    worker, _ = serving_worker(slots=3, listener=listener)
    slots, queue = slots_of(worker), queue_of(5)
    fill(slots, queue, [worker])
    feed(worker, messages.Batch(steps=4, tokens=10, sequences=10, cells={"r0": 40, "r1": 9}))
    worker._proc = FakeProc()  # type: ignore[assignment]
    with structlog.testing.capture_logs():
        asyncio.run(worker._reap())
    lost = [c for c in listener.calls if c[0] == "lost"]
    assert [(c[1], c[2]) for c in lost] == [("r0", "worker_died"), ("r1", "worker_died"),
                                            ("r2", "worker_died")]
    assert lost[0][3] == "worker m-0 (pid 4242) killed by signal 9"
    assert worker.running == {} and worker.batch.cells == {}
    assert [r.id for r in queue] == ["r3", "r4"]  # the queue is untouched


def test_a_hung_process_names_every_request_it_ran(monkeypatch):
    from llm_residentd.catalog.config import Config, DaemonConfig

    listener = Listener()
    listener.config = Config(daemon=DaemonConfig(liveness_timeout=4.0))  # type: ignore[attr-defined]
    now = [100.0]

    async def sleep(delay: float) -> None:
        now[0] += delay

    worker = Worker(ModelConfig(name="m", path="/m.gguf"), 0, listener, 30.0,  # type: ignore[arg-type]
                    clock=lambda: now[0], sleep=sleep)
    worker.state, worker.slots, worker._heard_at = "idle", 4, now[0]
    worker._writer = Writer()  # type: ignore[assignment]
    worker._proc = FakeProc()  # type: ignore[assignment]
    fill(slots_of(worker), queue_of(2), [worker])
    monkeypatch.setattr(workers, "kill", lambda proc: None)
    with structlog.testing.capture_logs():
        asyncio.run(worker._watch())
        assert worker._hung == ("killed: no heartbeat for 5.0 s while running r0, r1 "
                                "(daemon.liveness_timeout 4 s)")
        asyncio.run(worker._reap())
    assert [(c[1], c[2]) for c in listener.calls if c[0] == "lost"] == [
        ("r0", "worker_hung"), ("r1", "worker_hung")]


def test_batch_reports_are_tallied_and_cells_shown_per_request():
    worker, _ = serving_worker(slots=4)
    fill(slots_of(worker), queue_of(2), [worker])
    feed(worker, messages.Batch(steps=10, tokens=30, sequences=20, cells={"r0": 50, "r1": 12}),
         messages.Batch(steps=5, tokens=15, sequences=15, cells={"r0": 58, "r1": 20}),
         messages.Batch(steps=0, tokens=0, sequences=0, cells={"r0": 58, "r1": 20}))
    d = worker.describe()
    assert d["batch"] == {"steps": 15, "tokens": 45, "sequences": 35, "size": 3.0}
    assert (d["slots"], d["slots_busy"]) == (4, 2)
    assert d["requests"] == [{"id": "r0", "tokens": 0, "kv_cells": 58},
                             {"id": "r1", "tokens": 0, "kv_cells": 20}]
    feed(worker, messages.Done(req="r0", stats=stats(3)))
    assert worker.describe()["requests"] == [{"id": "r1", "tokens": 0, "kv_cells": 20}]


def test_commands_name_their_request_and_go_only_to_running_ones():
    worker, writer = serving_worker(slots=2)
    fill(slots_of(worker), queue_of(2), [worker])
    other = Request(id="x", model="m", params=RequestParams(max_tokens=1))
    for req in (worker.running["r1"], other):
        worker.cancel(req)
        worker.preempt(req, 128)
    worker.kv_op("trim_kv", {"keep": 4, "tail": 8, "min_prune": 2, "req": "r0"})
    worker.kv_op("shrink_kv", {"n_ctx": 128})
    assert writer.sent[2:] == [messages.Cancel(req="r1"),
                               messages.Preempt(req="r1", state_min_tokens=128),
                               messages.TrimKv(keep=4, tail=8, min_prune=2, req="r0"),
                               messages.ShrinkKv(n_ctx=128)]


def test_a_resumed_request_sends_its_resume_once():
    worker, writer = serving_worker(slots=1)
    queue = queue_of(1)
    resume = messages.Resume(context=[1, 2, 3], prompt_tokens=2, generated=1, output=[3],
                             state=b"kv")
    next(iter(queue)).resume = resume
    fill(slots_of(worker), queue, [worker])
    gen = writer.sent[0]
    assert isinstance(gen, messages.Generate) and gen.resume == resume
    assert worker.running["r0"].resume is None


def test_dispatch_spreads_over_workers_and_keeps_the_batch_limits():
    a, _ = serving_worker(0, slots=4)
    b, _ = serving_worker(1, slots=4)
    slots = slots_of(a, b)
    assert fill(slots, queue_of(3), [a, b]) == ["r0", "r1", "r2"]
    assert (list(a.running), list(b.running)) == (["r0", "r2"], ["r1"])  # emptiest first
    assert slots.set_batch("m", 2) == "done"
    assert slots.set_batch("m", 2) == "unchanged"
    assert (slots.limit(a), slots.free(a), slots.free(b)) == (2, 0, 1)
    queue = queue_of(0)
    for i in range(3, 6):
        queue.push(Request(id=f"r{i}", model="m", params=RequestParams(max_tokens=4)))
    assert fill(slots, queue, [a, b]) == ["r3"]  # b's second slot; then both are at 2
    assert slots.set_batch("m-1", 1) == "done"
    assert (slots.limit(a), slots.limit(b)) == (2, 1)  # the least of worker's and model's
    assert slots.set_batch("m", 64) == "done"  # lifts the model's limit
    assert (slots.limit(a), slots.limit(b)) == (4, 1)
    assert fill(slots, queue, [a, b]) == ["r4", "r5"] and len(a.running) == 4
    assert slots.set_batch("nope", 2) == "no such worker or model"


def test_a_retiring_or_loading_worker_takes_nothing():
    worker, _ = serving_worker(slots=4)
    worker.state = "starting"
    assert fill(slots_of(worker), queue_of(1), [worker]) == []
    worker.state, worker._stopping = "idle", True
    assert fill(slots_of(worker), queue_of(1), [worker]) == []


def test_preempt_and_kv_ops_find_the_worker_running_the_request():
    a, wa = serving_worker(0, slots=2)
    b, wb = serving_worker(1, slots=2)
    slots = slots_of(a, b)
    fill(slots, queue_of(3), [a, b])  # r0, r2 on a; r1 on b
    assert slots.preempt("r2", 64) == "asked" and wa.sent[-1] == messages.Preempt(
        req="r2", state_min_tokens=64)
    assert slots.preempt("r9", 64) == "not running"
    assert slots.kv_op("m-1", "trim_kv", {"req": "r1"}) == "asked"
    assert wb.sent[-1] == messages.TrimKv(req="r1")
    assert slots.kv_op("m-1", "trim_kv", {"req": "r0"}) == "refused: r0 is not running on m-1"
    assert slots.kv_op("m-0", "shrink_kv", {"n_ctx": 4096}) == \
        "refused: n_ctx above the configured 2048"
    assert slots.kv_op("m-7", "trim_kv", {}) == "no such worker"


class Batcher(Policy):
    """Returns the actions `make` builds, on every event."""

    name = "batcher"

    def __init__(self, make: Callable[[], list[Action]]) -> None:
        super().__init__()
        self.make = make

    def on_event(self, event: Event, snap: Snapshot) -> list[Action]:
        return self.make()


def _engine(make: Callable[[], list[Action]]) -> tuple[PolicyEngine, Worker]:
    worker, _ = serving_worker(slots=4)
    slots = slots_of(worker)
    actuator = Actuator(slots.models, slots, None, None, None, None)  # type: ignore[arg-type]
    actuator.snapshot = lambda: Snapshot(now=0)  # type: ignore[method-assign]
    with structlog.testing.capture_logs():
        engine = PolicyEngine([], actuator)
    engine.enabled = {"batcher": Batcher(make)}
    return engine, worker


def test_set_batch_is_applied_and_recorded_when_it_changes():
    engine, worker = _engine(lambda: [SetBatch("m", 2, reason="r")])
    with structlog.testing.capture_logs():
        engine.notify(Tick())
        engine.notify(Tick())  # the same limit again: not recorded again
    assert engine.actuator.slots.limit(worker) == 2
    assert [(a["action"], a["target"], a["result"]) for a in engine.actions] == [
        ("set_batch", "m", "done")]


@pytest.mark.parametrize(("values", "why"), [
    ({"sequences": 0}, "set_batch sequences=0: expected `int` >= 1"),
    ({"sequences": 65}, "set_batch sequences=65: expected `int` <= 64"),
    ({"sequences": "2"}, "set_batch sequences='2': expected `int`, got `str`"),
    ({}, "sequences"), ({"sequences": 2, "extra": 1}, "extra")])
def test_set_batch_with_bad_values_disables_its_policy(values, why):
    engine, worker = _engine(lambda: [SetBatch("m", **values)])
    with structlog.testing.capture_logs():
        engine.notify(Tick())
    assert "batcher" in engine.disabled and engine.actuator.slots.limit(worker) == 4
    assert why in engine.disabled["batcher"]


def test_trim_kv_may_name_its_sequence_but_nothing_else_as_text():
    engine, worker = _engine(lambda: [TrimKv("m-0", keep=4, req="r0")])
    worker.running["r0"] = Request(id="r0", model="m", params=RequestParams(max_tokens=1))
    with structlog.testing.capture_logs():
        engine.notify(Tick())
    assert engine.kv_asked == {"m-0": "batcher"} and "batcher" in engine.enabled
    engine, _ = _engine(lambda: [TrimKv("m-0", keep="4")])
    with structlog.testing.capture_logs():
        engine.notify(Tick())
    assert "batcher" in engine.disabled


def test_every_declared_action_has_its_handler_and_anything_else_disables_the_policy():
    engine, _ = _engine(lambda: [Admit("r0"), "defer r1"])
    assert set(engine._handlers) == set(ACTIONS)
    with structlog.testing.capture_logs():
        engine.notify(Tick())
    assert "'defer r1', not an action (Admit, Defer, " in engine.disabled["batcher"]
    assert not engine.actions[-1]["values"] and engine.actions[-1]["action"] == "disable"


def test_an_action_is_recorded_with_its_kind_target_values_and_reason():
    engine, worker = _engine(lambda: [TrimKv("m-0", keep=4, req="r0", reason="why"),
                                      SetBatch("m-0", 3)])
    worker.running["r0"] = Request(id="r0", model="m", params=RequestParams(max_tokens=1))
    with structlog.testing.capture_logs():
        engine.notify(Tick())
    assert [{k: e[k] for k in ("policy", "action", "target", "values", "reason", "result")}
            for e in engine.actions] == [
        {"policy": "batcher", "action": "trim_kv", "target": "m-0",
         "values": {"keep": 4, "req": "r0"}, "reason": "why", "result": "asked"},
        {"policy": "batcher", "action": "set_batch", "target": "m-0",
         "values": {"sequences": 3}, "reason": "", "result": "done"}]
    assert engine.action_counts == {("batcher", "trim_kv"): 1, ("batcher", "set_batch"): 1}

def test_the_policies_see_one_running_request_per_sequence_with_its_cells():
    """Snapshot: WorkerView slots, busy slots and batch limit; RequestView kv_cells. So
    psi-admission's keep_running and priority count sequences, not workers."""
    a, _ = serving_worker(0, slots=4)
    b, _ = serving_worker(1, slots=4)
    slots = slots_of(a, b)
    queue = slots.models["m"].queue
    for req in queue_of(7):
        queue.push(req)
    fill(slots, queue, [a, b])
    slots.set_batch("m-1", 3)
    feed(a, messages.Batch(steps=2, tokens=8, sequences=8, cells={"r0": 31, "r2": 7}))
    observer = SimpleNamespace(kernel=lambda now: ({}, {}, {}))
    cpu = SimpleNamespace(caps={}, view=lambda: None)
    snap = Actuator(slots.models, slots, None, observer, cpu,  # type: ignore[arg-type]
                    lambda _id: False).snapshot()
    assert [(w.name, w.slots, w.slots_busy, w.batch_limit, w.free_slots)
            for w in snap.workers] == [("m-0", 4, 4, 4, 0), ("m-1", 4, 3, 3, 0)]
    assert [(r.id, r.worker, r.kv_cells) for r in snap.running] == [
        ("r0", "m-0", 31), ("r2", "m-0", 7), ("r4", "m-0", 0), ("r6", "m-0", 0),
        ("r1", "m-1", 0), ("r3", "m-1", 0), ("r5", "m-1", 0)]
    assert snap.queued == ()


def test_a_worker_process_that_cannot_start_is_a_failed_load_that_says_why(monkeypatch):
    """Issue 15 review: an exec error (a workers' user that may not run this Python) left
    the model loading forever with nothing in the log."""
    listener = Listener()

    async def model_path(model: str) -> str:
        return "/m.gguf"

    listener.model_path = model_path  # type: ignore[attr-defined]
    worker = Worker(ModelConfig(name="m", path="/m.gguf"), 0, listener, 30.0)  # type: ignore[arg-type]
    monkeypatch.setattr(workers.sys, "executable", "/nonexistent/python3")
    with pytest.raises(workers.LoadFailed) as err:
        asyncio.run(worker._spawn_and_load())
    assert str(err.value).startswith("cannot start a worker process (/nonexistent/python3): ")
    assert "No such file" in str(err.value) and worker._proc is None


def test_a_stderr_line_longer_than_the_readers_limit_does_not_stop_the_relay():
    """readline() raises on a line over the reader's limit; the relay must read on, or a
    worker that keeps writing to stderr blocks on a full pipe."""
    worker, _ = serving_worker()

    async def run() -> None:
        reader = asyncio.StreamReader(limit=1024)
        reader.feed_data(b"first\n" + b"x" * 5000 + b"\nafter the long one\nlast, no newline")
        reader.feed_eof()
        await asyncio.wait_for(worker._drain_stderr(reader), 5)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(run())
    lines = [e["line"] for e in logs if e["event"] == "worker_stderr"]
    assert lines[0] == "first" and lines[-2:] == ["after the long one", "last, no newline"]
    assert "".join(lines[1:-2]) == "x" * 5000
