"""The order of checks that docs/protocol.md section 5.9 states once for every op.

1. the op's Params (unknown, missing, mistyped, out-of-bounds fields) -> bad_request;
2. who the peer is -> forbidden;
3. checks that need the daemon's state (a model, a policy, a request) or parse values.

Each op is run the way the server runs it: ops.validate, then execute, by a non-root
peer, against a fake service that would fail step 3 if it were reached.
"""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from llm_residentd.core.models import Models
from llm_residentd.front import ops
from llm_residentd.wire.protocol import ProtocolError

PEER = 1000  # not root


class _Reached(Exception):
    """The op got to the daemon's state: a check that must come later was not made."""


class _Engine:
    classes: dict[str, Any] = {}  # no policy: a state check must fail if reached
    enabled: dict[str, Any] = {}
    disabled: dict[str, str] = {}

    def configure(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        raise _Reached

    def disable(self, name: str, why: str) -> None:
        raise _Reached


def _service() -> SimpleNamespace:
    async def set_limits(model: str, **changes: Any) -> dict[str, Any]:
        raise _Reached

    return SimpleNamespace(models=Models(), engine=_Engine(),
                           fleet=SimpleNamespace(set_limits=set_limits),
                           backend=SimpleNamespace(name="none"))


def _run(msg: dict[str, Any], uid: int = PEER) -> str:
    """The error code the op answers (as the server: validate, then execute)."""
    op = ops.lookup(msg["op"])
    ctx = ops.Context(service=_service(), uid=uid, gid=uid, pid=1,  # type: ignore[arg-type]
                      send=lambda m: None, track=lambda r: None)
    try:
        result = op.execute(ctx, ops.validate(op, msg))
        if inspect.isawaitable(result):
            asyncio.run(result)
    except ProtocolError as exc:
        return exc.code
    return "ok"


@pytest.mark.parametrize("msg", [
    {"op": "limits", "model": "nope", "cpu": 50},
    {"op": "limits", "model": "nope", "tasks_max": -1},
    {"op": "limits", "cpu": "50%"},
    {"op": "policy", "action": "set", "name": "nope", "settings": "x"},
    {"op": "policy", "action": "disable", "name": "n" * 201},
    {"op": "cancel", "request": 7},
    {"op": "add_model", "name": "x"},
    {"op": "add_model", "name": "x", "path": "/m.gguf", "options": ["n_ctx"]},
    {"op": "remove_model", "name": ""},
])
def test_params_are_checked_before_who_the_peer_is(msg):
    assert _run(msg) == "bad_request"


@pytest.mark.parametrize("msg", [
    {"op": "limits", "model": "nope", "cpu": "50%"},
    {"op": "limits", "model": "nope", "cpu": "banana"},
    {"op": "policy", "action": "set", "name": "nope", "settings": {}},
    {"op": "policy", "action": "disable", "name": "nope"},
    {"op": "add_model", "name": "bad name", "path": "relative.gguf", "options": {"n_ctx": 1}},
    {"op": "remove_model", "name": "nope"},
])
def test_who_the_peer_is_is_checked_before_the_daemons_state(msg):
    assert _run(msg) == "forbidden"


def test_root_gets_past_authorization_to_the_state_checks():
    assert _run({"op": "limits", "model": "nope", "cpu": "50%"}, uid=0) == "no_such_model"
    assert _run({"op": "policy", "action": "set", "name": "nope"}, uid=0) == "bad_request"


def test_reading_needs_no_root():
    assert _run({"op": "limits", "model": "nope"}) == "no_such_model"
    assert _run({"op": "policy", "action": "show", "name": "nope"}) == "bad_request"
