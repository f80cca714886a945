"""Worker supervision decisions, driven by a clock the test controls: restart waits that
forgive (issue 12 item 1), requeueing a request whose worker died before its first token
(item 2), and what a model that keeps failing to load says (item 7)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from llm_residentd.catalog.config import ModelConfig
from llm_residentd.core import supervision
from llm_residentd.core.requests import Request
from llm_residentd.core.supervision import Backoff, after_loss, load_trouble, model_state
from llm_residentd.core.workers import LoadFailed, Worker
from llm_residentd.wire.messages import RequestParams


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_in_a_row_and_caps():
    clock = Clock()
    b = Backoff(30.0, clock)
    assert [b.failed(served=False) for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert b.retry_in() == 30
    clock.now += 12
    assert b.retry_in() == 18


def test_backoff_restarts_after_a_life_that_served_or_lasted():
    clock = Clock()
    b = Backoff(30.0, clock)
    for _ in range(6):
        b.up()
        b.failed(served=False)  # six crashes right after loading: 0.5 ... 16
    b.up()
    clock.now += 5
    assert b.failed(served=True) == 0.5  # it completed a request: a new row
    b.up()
    clock.now += 1
    assert b.failed(served=False) == 1
    b.up()
    clock.now += supervision.STABLE_AFTER
    assert b.failed(served=False) == 0.5  # up 30 s without a request: a new row too
    clock.now += 100
    assert b.failed(served=False) == 1  # no load since: time alone is not a stable life


def test_backoff_survives_thousands_of_failures():
    b = Backoff(30.0, Clock())
    for _ in range(5000):
        delay = b.failed(served=False)
    assert delay == 30 and b.failures == 5000


@dataclass
class Life:
    """One scripted worker life: it loads (or not), stays up `up_s`, completes `served`."""

    loads: bool = True
    up_s: float = 0.0
    served: int = 0


@dataclass
class FakeListener:
    failed_loads: list[str] = field(default_factory=list)

    def worker_idle(self, worker: Worker) -> None:
        pass

    def worker_load_failed(self, worker: Worker) -> None:
        self.failed_loads.append(worker.load_error)


def _waits(lives: list[Life], backoff_max: float = 30.0) -> tuple[list[float], Worker]:
    """Run Worker.supervise through lives with a fake clock and sleep; the waits it took."""
    clock, waits = Clock(), []

    async def sleep(delay: float) -> None:
        waits.append(delay)
        clock.now += delay

    worker = Worker(ModelConfig(name="m", path="/m.gguf"), 0, FakeListener(), backoff_max,  # type: ignore[arg-type]
                    clock=clock, sleep=sleep)
    script = iter(lives)

    async def spawn_and_load() -> object:
        life = next(script, None)
        if life is None:
            worker._stopping = True
            raise LoadFailed("end of the script")
        worker._life = life  # type: ignore[attr-defined]
        if not life.loads:
            raise LoadFailed("cannot load /m.gguf: bad magic")
        return object()

    async def serve(reader: object) -> None:
        clock.now += worker._life.up_s  # type: ignore[attr-defined]
        worker.served += worker._life.served  # type: ignore[attr-defined]

    async def reap() -> str:
        return ""

    worker._spawn_and_load, worker._serve, worker._reap = spawn_and_load, serve, reap  # type: ignore[method-assign]
    asyncio.run(asyncio.wait_for(worker.supervise(), 5))
    return waits, worker


def test_supervise_forgives_a_crash_after_serving():
    """The issue's sequence: killed, restarted, serving requests for a while, killed again.
    Each crash after serving waits 0.5 s, not 0.5, 1, 2, 4 ... up to 30."""
    waits, worker = _waits([Life(up_s=10, served=3) for _ in range(8)])
    assert waits == [0.5] * 8
    assert worker.restarts == 8 and worker.backoff.failures == 1


def test_supervise_doubles_while_crashing_in_a_row_then_forgives():
    lives = [Life(up_s=1)] * 4 + [Life(up_s=40)] + [Life(up_s=1)] * 2 + [Life(up_s=5, served=1)]
    waits, _ = _waits(lives)
    assert waits == [0.5, 1, 2, 4, 0.5, 1, 2, 0.5]


def test_supervise_counts_failed_loads_and_says_when_it_tries_next():
    waits, worker = _waits([Life(loads=False)] * 7 + [Life(up_s=1, served=1)], backoff_max=10)
    assert waits == [0.5, 1, 2, 4, 8, 10, 10, 0.5]
    assert worker.load_failures == 1  # the end of the script is a failed load too


def test_failing_model_says_how_often_and_when():
    """Item 7: the models op's error while a model keeps failing to load."""
    clock = Clock()

    @dataclass
    class W:
        state: str = "failed"
        load_error: str = "cannot load /m.gguf: bad magic"
        load_failures: int = 3
        backoff: Backoff = field(default_factory=lambda: Backoff(30.0, clock))

    workers = [W(), W(load_failures=1)]
    workers[0].backoff.retry_at = clock.now + 4.0
    workers[1].backoff.retry_at = clock.now + 0.5
    assert model_state(workers) == "unavailable"
    assert load_trouble("m", workers) == ("model 'm' failed to load 3 times in a row; "
                                          "next try in 0.5 s: cannot load /m.gguf: bad magic")
    workers[0].backoff.retry_at = workers[1].backoff.retry_at = None
    assert "trying again now" in load_trouble("m", workers)
    workers[1] = W(state="idle", load_error="", load_failures=0)
    assert model_state(workers) == "ready"
    assert load_trouble("m", [W(state="idle", load_error="")]) == ""


def _request(tokens: int = 0) -> Request:
    return Request(id="r1", model="m", params=RequestParams(max_tokens=1, prompt="hi"),
                   tokens_sent=tokens)


def test_a_request_without_tokens_is_requeued_twice_then_fails():
    req = _request()
    assert after_loss(req, "worker_died", "worker m-0 (pid 1) killed by signal 9") is None
    assert after_loss(req, "worker_hung", "worker m-0 (pid 2) killed: no heartbeat") is None
    code, message = after_loss(req, "worker_died", "worker m-0 (pid 3) killed by signal 9")
    assert code == "worker_died"
    assert message == ("worker m-0 (pid 3) killed by signal 9; 3 workers died under this "
                       "request before its first token, so it is not queued again")


@pytest.mark.parametrize("code", ["worker_died", "worker_hung"])
def test_a_request_that_streamed_tokens_fails(code):
    assert after_loss(_request(tokens=5), code, "worker m-0 died") == (code, "worker m-0 died")


class LiveListener:
    """Just the config the liveness check reads."""

    def __init__(self, liveness_timeout: float) -> None:
        from llm_residentd.catalog.config import Config, DaemonConfig
        self.config = Config(daemon=DaemonConfig(liveness_timeout=liveness_timeout))


def _watch(monkeypatch: pytest.MonkeyPatch, answers: list[bool],
           stalls: frozenset[int] = frozenset()) -> tuple[Worker, list[float], list[str]]:
    """Run Worker._watch with liveness_timeout 8 (a ping every 2 s): answers[i] says whether
    the worker answers ping i; a sleep in `stalls` overruns by 20 s (the daemon's own loop
    held up). Returns the worker, the times it was pinged and the kills."""
    from llm_residentd.core import workers

    clock, pings, kills = Clock(), [], []

    async def sleep(delay: float) -> None:
        i = len(pings) - 1
        clock.now += delay + (20 if i in stalls else 0)
        if i < len(answers) and answers[i]:
            worker._heard_at = clock.now - 0.1  # the pong came just before the sleep ended
        if i >= 20:
            worker._stopping = True

    worker = Worker(ModelConfig(name="m", path="/m.gguf"), 0, LiveListener(8.0), 30.0,  # type: ignore[arg-type]
                    clock=clock, sleep=sleep)
    worker._heard_at = clock.now
    worker._proc = object()  # type: ignore[assignment]
    worker._send = lambda msg: pings.append(clock.now)  # type: ignore[method-assign]
    monkeypatch.setattr(workers, "kill", lambda proc: kills.append(worker._hung))
    asyncio.run(worker._watch())
    return worker, pings, kills


def test_a_worker_that_answers_pings_lives(monkeypatch):
    _, pings, kills = _watch(monkeypatch, [True] * 30)
    assert kills == [] and len(pings) == 21 and pings[1] - pings[0] == 2.0


def test_a_silent_worker_is_killed_after_the_deadline(monkeypatch):
    _, pings, kills = _watch(monkeypatch, [True, True] + [False] * 30)
    # Heard last at 1003.9; unanswered pings at 1004 ... 1010; silent 8.1 s at 1012.
    assert kills == ["killed: no heartbeat for 8.1 s while idle (daemon.liveness_timeout 8 s)"]
    assert len(pings) == 6


def test_a_stalled_daemon_loop_is_not_taken_for_a_silent_worker(monkeypatch):
    """After the daemon's loop was held up 20 s, the worker's pongs wait unread in the
    socket: the check lets the reader take them in before it judges."""
    _, _, kills = _watch(monkeypatch, [True, False, True] + [True] * 30, stalls=frozenset({1}))
    assert kills == []
