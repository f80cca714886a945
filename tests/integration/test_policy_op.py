"""The policy op's checks, on the wire and through llmctl: a bad value changes nothing, a
bad shape is bad_request (never internal), and the order is shapes, then authorization,
then the values only the daemon can judge."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from harness import request_as, tiny_config
from llm_residentd.wire.protocol import recv_frame, send_frame
from llmctl import LlmctlError


def _call(d, **msg):
    """One raw frame on its own connection; the reply as sent."""
    sock = d.raw()
    send_frame(sock, {"id": 1, "op": "policy", **msg})
    reply = recv_frame(sock)
    sock.close()
    return reply


def _state(d, name):
    with d.client() as c:
        listing = c.call("policy", action="list")
    return listing["enabled"].get(name), name in listing["disabled"]


def test_a_bad_value_is_refused_before_anything_changes(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path))
    reply = _call(d, action="set", name="static", settings={"cpu": "banana"})
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
    assert "cpu" in reply["error"]["message"] and "banana" in reply["error"]["message"]
    assert _state(d, "static") == (None, False)  # still off, as it was
    reply = _call(d, action="set", name="static", settings={"memory_high": "lots"})
    assert reply["error"]["code"] == "bad_request" and "memory_high" in reply["error"]["message"]
    assert _state(d, "static") == (None, False)

    assert _call(d, action="set", name="static", settings={"cpu": "max"})["ok"] is True
    for bad in ({"cpu": "banana"}, {"cpu": "max", "memory_high": "-1"}, {"cpu": 5},
                {"cpu": None}, {"cpu": ["50%"]}, {"cpu": b"50%"}, {"nope": "1"}):
        reply = _call(d, action="set", name="static", settings=bad)
        assert reply["error"]["code"] == "bad_request", (bad, reply)
    assert _state(d, "static") == ({"cpu": "max", "memory_high": "max"}, False)  # as it was
    with d.client() as c:  # the bad values never reached the policy: no failed action
        assert not [e for e in c.call("events")["events"] if e["policy"] == "static"
                    and e["action"] == "set_limits" and "banana" in json.dumps(e)]
    d.assert_serving()


def test_keys_that_are_not_strings_are_bad_request_not_internal(tiny_daemon):
    for settings in ({b"cpu": "1"}, {b"cpu": "1", "memory_high": "max"}):
        reply = _call(tiny_daemon, action="set", name="static", settings=settings)
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
        assert "keys of settings must be strings" in reply["error"]["message"]
    assert _state(tiny_daemon, "static") == (None, False)
    tiny_daemon.assert_serving()


def test_enabled_false_disables_and_enabled_true_enables(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path))
    r = d.llmctl("policy", "set", "psi-admission", "defer_above=55")
    assert r.returncode == 0, r.stderr
    r = d.llmctl("policy", "set", "psi-admission", "enabled=false")
    assert r.returncode == 0 and "disabled by uid 0" in r.stdout, r.stdout + r.stderr
    assert _state(d, "psi-admission") == (None, True)
    r = d.llmctl("policy", "set", "psi-admission", "enabled=true", "defer_above=60")
    assert r.returncode == 0 and "defer_above=60.0" in r.stdout, r.stderr
    assert _state(d, "psi-admission")[0]["defer_above"] == 60.0
    r = d.llmctl("policy", "set", "psi-admission", "enabled=false", "defer_above=70")
    assert r.returncode == 1 and "takes no other settings" in r.stderr  # refused whole
    assert _state(d, "psi-admission")[0]["defer_above"] == 60.0
    r = d.llmctl("policy", "set", "psi-admission", "enabled=maybe")
    assert r.returncode == 1 and "bad_request" in r.stderr
    r = d.llmctl("policy", "disable", "psi-admission")
    assert r.returncode == 0 and _state(d, "psi-admission") == (None, True)
    r = d.llmctl("policy", "enable", "psi-admission")
    assert r.returncode == 0 and _state(d, "psi-admission")[0] is not None
    with d.client() as c, pytest.raises(LlmctlError) as err:
        c.call("policy", action="set", name="static", settings={"cpu": "banana"})
    assert err.value.code == "bad_request"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_order_of_checks_shape_then_authorization_then_values(start_daemon, tiny_model_path):
    sockdir = Path(tempfile.mkdtemp(prefix="llm-test-"))
    sockdir.chmod(0o755)  # pytest's tmp dirs are 0700: another uid could not reach the socket
    d = start_daemon(tiny_config(tiny_model_path, daemon='socket_mode = "0666"'),
                     socket=sockdir / "llm.sock")
    as_nobody = lambda **m: request_as(65534, d.socket, {"id": 1, "op": "policy", **m})  # noqa: E731
    # shapes first: a non-root peer learns its request is malformed
    assert as_nobody(action="set", name="static", settings={b"cpu": "1"})["error"]["code"] \
        == "bad_request"
    assert as_nobody(action="set", name="static", settings="cpu=1")["error"]["code"] \
        == "bad_request"
    assert as_nobody(action="frobnicate", name="static")["error"]["code"] == "bad_request"
    # then authorization, before anything that needs the daemon's policies
    for msg in ({"action": "set", "name": "static", "settings": {"cpu": "banana"}},
                {"action": "set", "name": "nope", "settings": {}},
                {"action": "disable", "name": "nope"}):
        reply = as_nobody(**msg)
        assert reply["error"]["code"] == "forbidden" and "needs root" in reply["error"]["message"]
    assert as_nobody(action="show", name="static")["ok"] is True  # reading is for everyone
    assert _state(d, "static") == (None, False)
    # the limits op keeps the same order: root before the model's existence and the values
    reply = request_as(65534, d.socket, {"id": 2, "op": "limits", "model": "nope", "cpu": "banana"})
    assert reply["error"]["code"] == "forbidden", reply
    reply = request_as(65534, d.socket, {"id": 3, "op": "limits", "model": "tiny", "cpu": 5})
    assert reply["error"]["code"] == "bad_request", reply  # a shape: before authorization

