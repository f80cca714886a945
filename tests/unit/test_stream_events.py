"""The events a submit streams (daemon/wire/events.py) are the maps docs/protocol.md shows,
key for key and in the same order, so their frames are the bytes clients have read."""

from __future__ import annotations

import pytest
from llm_residentd.wire import events
from llm_residentd.wire.protocol import encode

STATS = {"model": "m", "prompt_tokens": 3, "completion_tokens": 2, "ttft_s": None}


@pytest.mark.parametrize(("event", "wire"), [
    (events.Token(text="Hi", tokens=2), {"event": "token", "text": "Hi", "tokens": 2}),
    (events.Preempted(tokens=40, resume="restore"),
     {"event": "preempted", "tokens": 40, "resume": "restore"}),
    (events.Loading(model="m"), {"event": "loading", "model": "m"}),
    (events.Done(stats=STATS), {"event": "done", "stats": STATS}),
    (events.Error(error=events.Failure(code="cancelled", message="request r7 was cancelled")),
     {"event": "error", "error": {"code": "cancelled", "message": "request r7 was cancelled"}}),
])
def test_an_event_is_framed_as_the_map_of_the_protocol(event, wire):
    got = events.as_map(event)
    assert got == wire and list(got) == list(wire)
    assert (encode({"id": 2, "request": "r7", **got})
            == encode({"id": 2, "request": "r7", **wire}))


def test_an_error_event_takes_only_a_known_code():
    with pytest.raises(AssertionError):
        events.Failure(code="oops", message="x")
