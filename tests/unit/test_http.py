"""The HTTP front's pure parts: OpenAI shapes to submit fields, errors, keys, activation."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
from llm_residentd.catalog import config
from llm_residentd.front.http import auth, openai
from llm_residentd.front.http.app import STATUS, error_body, error_response
from llm_residentd.wire import listen
from llm_residentd.wire.events import Failure
from llm_residentd.wire.protocol import ERROR_CODES, ProtocolError


def test_chat_body_becomes_the_contract_submit_message():
    body = {"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text",
                                                                      "text": "there"}]},
        {"role": "assistant", "content": "Hello"}],
        "max_tokens": 9, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9,
        "seed": 4, "stop": "END", "stream": True, "stream_options": {"include_usage": True},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object"}}}, "user": "ignored", "presence_penalty": 0, "priority": 3,
        "timeout": 9.5}
    assert openai.chat_submit(body, "7") == {
        "op": "submit", "model": "m", "temperature": 0.5, "top_p": 0.9, "seed": 4,
        "priority": 3, "timeout": 9.5, "max_tokens": 7, "stop": ["END"],
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello"}],
        "json_schema": {"type": "object"}}


def test_chat_extensions_and_formats():
    base = {"messages": [{"role": "user", "content": "x"}]}
    assert openai.chat_submit(base, "-5")["priority"] == -5  # X-Priority
    assert openai.chat_submit({**base, "response_format": {"type": "json_object"}})[
        "json_schema"] == {}
    assert "json_schema" not in openai.chat_submit({**base, "response_format": {"type": "text"}})
    assert openai.chat_submit({**base, "stop": ["a", "b"], "max_tokens": None}) == {
        "op": "submit", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b"]}


@pytest.mark.parametrize("body, words", [
    ({"messages": "x"}, "messages must be an array"),
    ({"messages": [1]}, "messages[0] must be an object"),
    ({"messages": [], "n": 3}, "n=3"),
    ({"messages": [], "logprobs": True}, "logprobs"),
    ({"messages": [], "tools": [{}]}, "tools"),
    ({"messages": [], "response_format": {"type": "json_schema"}}, "json_schema"),
    ({"messages": [], "stream": "yes"}, "stream must be a boolean"),
    ({"messages": []}, None),
])
def test_chat_shapes_refused_by_the_http_layer(body, words):
    if words is None:
        openai.chat_submit(body)  # an empty list is the op's to refuse
        return
    with pytest.raises(ProtocolError) as err:
        openai.chat_submit(body, None)
    assert err.value.code == "bad_request" and words in err.value.message


def test_x_priority_must_be_an_integer():
    with pytest.raises(ProtocolError, match="X-Priority"):
        openai.completion_submit({"prompt": "x"}, "high")


def test_completion_body_is_raw():
    assert openai.completion_submit({"prompt": ["p"], "model": "m", "max_tokens": 3}) == {
        "op": "submit", "model": "m", "max_tokens": 3, "prompt": "p", "raw": True}


def test_every_error_code_has_an_http_status():
    assert set(ERROR_CODES) - set(STATUS) == {"bad_frame", "frame_too_large",
                                              "handshake_required", "unsupported_protocol",
                                              "unknown_op"}  # msgpack framing only
    assert error_response("forbidden", "no").status == 403
    assert error_response("queue_full", "x").headers["Retry-After"] == "1"
    assert error_response("too_many_requests", "x").status == 429
    assert error_response("shutting_down", "x").status == 503
    assert error_response("model_unavailable", "x").status == 503
    assert error_body("bad_request", "the length of prompt must be at least 1", "prompt") == {
        "error": {"message": "the length of prompt must be at least 1",
                  "type": "invalid_request_error", "param": "prompt", "code": "bad_request"}}
    too_long = Failure("too_long", "the prompt is 900 tokens")
    assert openai.Shape(False, "r1", "m").param(too_long) == "prompt"
    assert openai.Shape(True, "r1", "m").param(too_long) == "messages"
    assert error_body("bad_request", "x", "json_schema")["error"]["param"] == "response_format"
    assert error_body("queue_full", "x", "model")["error"]["param"] is None  # 400s only


@pytest.mark.parametrize(("msg", "param"), [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "stop": ["a", ""]}, "stop"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
])
def test_a_refused_field_is_named_by_the_error_not_found_in_its_text(msg, param):
    from llm_residentd.front import ops

    with pytest.raises(ProtocolError) as err:
        ops.validate(ops.OPS["submit"], msg)
    assert err.value.param == param


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
    ([1, 2], None),
])
def test_the_openai_mapping_names_the_field_it_refuses(body, param):
    with pytest.raises(ProtocolError) as err:
        openai.completion_submit(body)
    assert err.value.param == param


def test_keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\n\nalice aaaaaaaaaaaaaaaa\nbob   bbbbbbbbbbbbbbbbbbbb\n")
    keys = listen.load_keys(path)
    assert keys == {"alice": "a" * 16, "bob": "b" * 20}
    assert auth.key_name(keys, "Bearer " + "b" * 20) == "bob"
    assert auth.key_name(keys, "Bearer " + "b" * 19) is None
    assert auth.key_name(keys, "b" * 20) is None and auth.key_name(keys, None) is None
    # exactly the key after the one space: a no-break space, a second space or a tab is
    # not stripped into a match (HTTP itself drops the spaces around a header's value)
    for near in ("Bearer " + "b" * 20 + "\xa0", "Bearer  " + "b" * 20, "Bearer \t" + "b" * 20,
                 "Bearer " + "b" * 20 + "\udcff", "Bearer \u2003" + "b" * 20):
        assert auth.key_name(keys, near) is None, repr(near)
    for text, words in [("alice short\n", "shorter"), ("a b c\n", "NAME KEY"),
                        ("a " + "x" * 16 + "\nb " + "x" * 16 + "\n", "twice"), ("", "no keys")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=words):
            listen.load_keys(path)


@pytest.mark.parametrize("listen, loopback", [
    ("127.0.0.1:80", True), ("[::1]:80", True), ("localhost:1", True), ("127.9.9.9:0", True),
    ("0.0.0.0:80", False), ("192.168.1.2:80", False), ("[::]:80", False),
    ("example.org:80", False)])
def test_only_loopback_listens_without_keys(listen, loopback, tmp_path):
    data = {"http": {"listen": listen}, "models": {"m": {"path": "/x.gguf"}}}
    if loopback:
        assert config.parse(data, "t").http.listen == listen
    else:
        with pytest.raises(config.ConfigError, match=r"http\.listen.*api_keys_file"):
            config.parse(data, "t")
        keys = tmp_path / "k"
        keys.write_text("n " + "k" * 16 + "\n")
        data["http"]["api_keys_file"] = str(keys)
        assert config.parse(data, "t").http.api_keys_file == str(keys)


@pytest.mark.parametrize("listen", ["11435", "127.0.0.1:99999", ":80", "127.0.0.1:x"])
def test_bad_listen(listen):
    with pytest.raises(config.ConfigError, match=r"http\.listen"):
        config.parse({"http": {"listen": listen}, "models": {"m": {"path": "/x"}}}, "t")


ACTIVATED = textwrap.dedent("""
    import os, socket, sys
    from llm_residentd.front.server import activated_sockets

    def listener(path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen()
        return s.detach()

    a, b = listener(sys.argv[1]), listener(sys.argv[2])
    a2, b2 = os.dup(a), os.dup(b)  # out of the way of 3 and 4
    for fd in (a, b):
        os.close(fd)
    os.dup2(a2, 3)
    os.dup2(b2, 4)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES=sys.argv[3])
    found = activated_sockets()
    print(" ".join(f"{k}={os.path.basename(v.getsockname())}" for k, v in sorted(found.items())))
""")


@pytest.mark.parametrize("names, want", [
    ("http:control", "control=b.sock http=a.sock"),
    ("control:http", "control=a.sock http=b.sock"),
    ("", "control=a.sock"),  # no names: the first is the control socket, as before
])
def test_activated_sockets_by_name(tmp_path, names, want):
    import llm_residentd
    root = os.path.dirname(os.path.dirname(llm_residentd.__file__))
    out = subprocess.run([sys.executable, "-c", ACTIVATED, str(tmp_path / "a.sock"),
                          str(tmp_path / "b.sock"), names], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want


def test_unix_peer_is_read_from_so_peercred():  # a socketpair's peer is ourselves
    a, _b = socket.socketpair()
    peer = auth.unix_peer(a)
    assert (peer.uid, peer.pid) == (os.geteuid(), os.getpid()) and peer.name == f"uid {os.geteuid()}"
