"""Priority preemption and KV changes in a real daemon with a generated model.

A preempted request must resume without losing output: with greedy decoding its whole
text equals that of the same request run through without interruption.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tinymodel
from llmctl import Client

LOW = {"model": "mid", "max_tokens": 600, "temperature": 0.0, "top_k": 1, "raw": True,
       "ignore_eos": True, "seed": 3}
PROMPT = "once upon a time there was a scheduler that "


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wider than the tiny model, so a request takes long enough to be preempted."""
    return tinymodel.write_tiny_model(tmp_path_factory.mktemp("mid") / "mid.gguf",
                                      n_layer=4, n_embd=256, n_ff=512)


def config(model: Path, policies: str, parallel: int = 1) -> str:
    """parallel 1: one slot, so that a waiting request finds none free (test_slots.py
    preempts one sequence of several)."""
    return f"""
[models.mid]
path = "{model}"
n_ctx = 1024
max_tokens = 1000
threads = 1
stream_interval = 0.0
parallel = {parallel}
{policies}"""


def run(stream: Any) -> tuple[str, list[dict[str, Any]]]:
    text, events = "", []
    for event in stream.events():
        events.append(event)
        text += event.get("text", "")
    return text, events


@pytest.mark.parametrize("state_min_tokens", [0, 100_000], ids=["restore", "recompute"])
def test_a_high_priority_request_preempts_and_the_low_one_resumes_intact(
        start_daemon, mid_model, state_min_tokens):
    d = start_daemon(config(mid_model, f"""
[[policies]]
name = "priority"
state_min_tokens = {state_min_tokens}
"""))
    with Client(d.socket) as c:
        reference, _ = run(c.submit(PROMPT, **LOW))
    with Client(d.socket) as lo_client, Client(d.socket) as hi_client:
        low = lo_client.submit(PROMPT, **LOW)
        events = low.events()
        first = [next(events) for _ in range(20)]  # the low request is decoding
        high = hi_client.submit("urgent", model="mid", max_tokens=8, priority=5)
        _, high_events = run(high)
        rest = list(events)
    low_events = first + rest
    text = "".join(e.get("text", "") for e in low_events)
    (preempted,) = [e for e in low_events if e["event"] == "preempted"]
    assert preempted["resume"] == ("restore" if state_min_tokens == 0 else "recompute")
    done = low_events[-1]
    assert done["event"] == "done" and done["stats"]["preemptions"] == 1
    assert done["stats"]["completion_tokens"] == LOW["max_tokens"]
    assert text == reference
    # The high one ran while the low one was out: it finished first.
    assert high_events[-1]["event"] == "done"
    assert low_events.index(preempted) < len(first) + len(rest) - 1
    actions = json.loads(d.llmctl("events", "--json").stdout)
    assert [(a["action"], a["target"], a["result"]) for a in actions
            if a["action"] == "preempt"] == [("preempt", low.request, "asked")]
    logs = [e for e in d.logs() if e.get("event") == "request_preempted"]
    assert logs and logs[0]["resume"] == preempted["resume"]
    if state_min_tokens == 0:
        assert logs[0]["state_bytes"] > 0


def test_a_preempted_request_can_be_cancelled_while_it_waits(start_daemon, mid_model):
    d = start_daemon(config(mid_model, '[[policies]]\nname = "priority"\n')
                     .replace("max_tokens = 1000", "max_tokens = 1000\nworkers = 1"))
    with Client(d.socket) as a, Client(d.socket) as b, Client(d.socket) as ctl:
        low = a.submit(PROMPT, **LOW)
        events = low.events()
        for _ in range(5):
            next(events)
        high = b.submit(PROMPT, **{**LOW, "priority": 9, "max_tokens": 400})
        for event in events:
            if event["event"] == "preempted":
                break
        ctl.cancel(low.request)
        rest = list(events)
        assert rest[-1]["event"] == "error" and rest[-1]["error"]["code"] == "cancelled"
        assert run(high)[1][-1]["event"] == "done"
    d.assert_serving()
