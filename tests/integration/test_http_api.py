"""The OpenAI-compatible HTTP API with the real openai package and curl (docs/http.md)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import openai
import pytest
from harness import tiny_config, wait_for
from http_helpers import (
    http_socket,
    post_bytes,
    raw_unix,
    tcp_client,
    unix_client,
    unix_http,
)

HTTP = '[http]\nlisten = "127.0.0.1:0"\n'


@pytest.fixture(scope="module")
def http_daemon(tmp_path_factory, tiny_model_path, tiny_chat_model_path):
    """Two models: "tiny", and "chat", the tiny model with a ChatML template."""
    from harness import Daemon
    chat = (f'[models.chat]\npath = "{tiny_chat_model_path}"\nn_ctx = 512\nmax_tokens = 16\n'
            "threads = 1\n")
    d = Daemon(tmp_path_factory.mktemp("httpd"),
               tiny_config(tiny_model_path, n_ctx=4096, daemon="max_connections = 2048")
               + chat + HTTP)
    d.start()
    yield d
    d.stop()


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_completions_with_the_openai_package(http_daemon, over):
    client = tcp_client(http_daemon) if over == "tcp" else unix_client(http_daemon)
    reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, seed=3,
                                      temperature=0)
    assert reply.id.startswith("cmpl-r") and reply.object == "text_completion"
    assert reply.model == "tiny" and isinstance(reply.choices[0].text, str)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 5 and reply.usage.prompt_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    again = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, seed=3,
                                      temperature=0)
    assert again.choices[0].text == reply.choices[0].text  # seed and temperature pass through


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_streamed_completions_with_usage(http_daemon, over):
    client = tcp_client(http_daemon) if over == "tcp" else unix_client(http_daemon)
    chunks = list(client.completions.create(model="tiny", prompt="Hi", max_tokens=6,
                                            stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) >= 2 and chunks[0].id.startswith("cmpl-r")
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("stop", "length") and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and 1 <= chunks[-1].usage.completion_tokens <= 6


def test_models_list_and_one_model(http_daemon):
    client = unix_client(http_daemon)
    models = client.models.list()
    assert models.data[0].id == "tiny" and models.data[0].object == "model"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_curl_streams_sse_over_the_unix_socket(http_daemon):
    out = subprocess.run(
        ["curl", "-sS", "-N", "-D", "-", "--unix-socket", str(http_socket(http_daemon)),
         "http://localhost/v1/completions", "-H", "Content-Type: application/json",
         "-H", "X-Priority: 5",
         "-d", json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 4, "stream": True})],
        capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "text/event-stream" in head
    request_id = next(line.split(": ")[1] for line in head.splitlines()
                  if line.lower().startswith("x-request-id"))
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["id"] == f"cmpl-{request_id}"
    logs = http_daemon.logs()
    accepted = [e for e in logs if e.get("event") == "request_accepted"
                and e.get("request") == request_id]
    assert accepted and accepted[0]["priority"] == 5  # X-Priority went to the queue


def test_health_is_200_when_a_model_is_ready(http_daemon):
    r = unix_http(http_daemon, "GET", "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["models"]["tiny"] == "ready"


def test_health_503_and_model_unavailable(start_daemon, tiny_model_path, tmp_path):
    cfg = tiny_config(tmp_path / "missing.gguf") + HTTP
    d = start_daemon(cfg, wait=False)
    wait_for(lambda: http_socket(d).exists() and unix_http(d, "GET", "/health").json()[
        "models"]["tiny"] == "unavailable", timeout=60, what="model unavailable")
    r = unix_http(d, "GET", "/health")
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
    with pytest.raises(openai.APIStatusError) as err:
        unix_client(d).completions.create(model="tiny", prompt="x", max_tokens=2)
    assert err.value.status_code == 503 and err.value.code == "model_unavailable"


@pytest.mark.parametrize("body, status, code, param", [
    ({"model": "nope", "prompt": "x"}, 404, "no_such_model", None),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "bad_request", "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "bad_request", "temperature"),
    ({"model": "tiny", "prompt": "x " * 5000}, 400, "too_long", "prompt"),
    ({"model": "tiny", "prompt": ""}, 400, "bad_request", "prompt"),
    ({"model": "tiny"}, 400, "bad_request", "prompt"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "bad_request", "n"),
    ({"model": "tiny", "prompt": "x", "priority": 5000}, 400, "bad_request", "priority"),
    ({"model": "tiny", "prompt": ["a", "b"]}, 400, "bad_request", "prompt"),
    ([1, 2], 400, "bad_request", None),
])
def test_errors_in_openai_shape(http_daemon, body, status, code, param):
    r = unix_http(http_daemon, "POST", "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == param and err["message"]
    assert err["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored(http_daemon):
    r = unix_http(http_daemon, "POST", "/v1/completions",
                  {"model": "tiny", "prompt": "x", "max_tokens": 2, "user": "u1",
                   "colour": "red", "n": 1, "logprobs": None})
    assert r.status_code == 200, r.text
    assert r.headers["X-Request-Id"] == r.json()["id"].removeprefix("cmpl-")


def test_malformed_json_wrong_method_and_unknown_path(http_daemon):
    r = unix_http(http_daemon, "POST", "/v1/completions", b'{"prompt": ')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert unix_http(http_daemon, "GET", "/v1/completions").status_code == 405
    r = unix_http(http_daemon, "GET", "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def _busy(d, max_tokens=3000):
    """A long request on the control socket that keeps the one worker busy."""
    c = d.client()
    stream = c.submit("go", max_tokens=max_tokens, ignore_eos=True)
    events = stream.events()
    assert next(events)["event"] == "token"
    return c, stream


def test_queue_full_is_429_with_retry_after(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096, max_queue=1) + HTTP)
    c, stream = _busy(d)
    waiting = d.client()
    waiting.submit("queued", max_tokens=2)
    r = unix_http(d, "POST", "/v1/completions", {"model": "tiny", "prompt": "x"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    assert r.json()["error"]["type"] == "rate_limit_error"
    c.cancel(stream.request)


def test_timeout_is_504_and_shutdown_is_503(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096) + HTTP)
    r = unix_http(d, "POST", "/v1/completions",
                  {"model": "tiny", "prompt": "x", "max_tokens": 3000, "timeout": 0.3})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    got = {}

    def long_request():
        got["r"] = unix_http(d, "POST", "/v1/completions",
                             {"model": "tiny", "prompt": "x", "max_tokens": 3000})

    # The timed-out request keeps its slot until the worker has stopped it: wait for that,
    # then for the long request itself to run (not for "busy", which the first one was).
    wait_for(lambda: d.status()["workers"][0]["state"] == "idle", what="worker idle")
    t = threading.Thread(target=long_request)
    t.start()
    wait_for(lambda: d.status()["workers"][0]["state"] == "busy", what="worker busy")
    d.stop(signal.SIGTERM)
    t.join(30)
    assert got["r"].status_code == 503 and got["r"].json()["error"]["code"] == "shutting_down"


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_the_worker(start_daemon, tiny_model_path, stream):
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096) + HTTP)
    sock = raw_unix(d)
    sock.sendall(post_bytes("/v1/completions", json.dumps(
        {"model": "tiny", "prompt": "go", "max_tokens": 3000, "stream": stream}).encode()))
    if stream:
        got = b""
        while b"data: " not in got:  # tokens are flowing
            got += sock.recv(65536)
    else:
        wait_for(lambda: d.status()["workers"][0]["state"] == "busy", what="worker busy")
    sock.close()
    st = wait_for(lambda: (s := d.status())["workers"][0]["state"] == "idle" and s,
                  timeout=10, what="worker idle after the disconnect")
    assert st["models"]["tiny"]["outcomes"]["cancelled"] == 1
    done = [e for e in d.logs() if e.get("event") == "request_finished"]
    assert done[-1]["completion_tokens"] < 3000 if "completion_tokens" in done[-1] else True
    d.assert_serving()


# -- chat: the submit op's messages, stop and json_schema ---------------------------------

@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_chat_with_the_openai_package(http_daemon, over):
    client = tcp_client(http_daemon) if over == "tcp" else unix_client(http_daemon)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "And again?"}]
    reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=5)
    assert reply.id.startswith("chatcmpl-r") and reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert 1 <= reply.usage.completion_tokens <= 5
    chunks = list(client.chat.completions.create(
        model="chat", messages=messages, max_completion_tokens=5, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens >= 1


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "n"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}}}
GREEDY = {"temperature": 0.0, "seed": 1}


def test_chat_json_schema_and_json_object(http_daemon):
    client = unix_client(http_daemon)
    reply = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "a user"}], max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "u", "schema": SCHEMA}},
        **GREEDY)
    assert reply.choices[0].finish_reason == "stop", reply
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"name", "n"} and isinstance(value["n"], int)
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    reply = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "json"}], max_tokens=200,
        response_format={"type": "json_object"}, **GREEDY)
    assert reply.choices[0].finish_reason == "stop"
    json.loads(reply.choices[0].message.content)
    r = unix_http(http_daemon, "POST", "/v1/chat/completions", {
        "model": "chat", "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}})
    assert r.status_code == 400 and "json_schema" in r.json()["error"]["message"], r.text
    # the worker's refusal names json_schema: the body's name for it is response_format
    assert r.json()["error"]["param"] == "response_format"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences(http_daemon, stream):
    client = unix_client(http_daemon)
    common = {"model": "tiny", "prompt": "the quick brown fox", **GREEDY}
    reference = client.completions.create(max_tokens=40, extra_body={"ignore_eos": True},
                                          **common).choices[0].text
    assert len(reference) > 30
    stop = reference[12:19]
    if stream:
        chunks = list(client.completions.create(max_tokens=40, stop=["never there", stop],
                                                stream=True, **common))
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        reply = client.completions.create(max_tokens=40, stop=stop, **common)
        text, finish = reply.choices[0].text, reply.choices[0].finish_reason
    assert text == reference[:reference.index(stop)] and finish == "stop"


@pytest.mark.parametrize("messages, words", [
    ([], "messages"),
    ([{"role": "wizard", "content": "x"}], "role"),
    ([{"role": "user", "content": 5}], "content"),
])
def test_chat_bad_messages(http_daemon, messages, words):
    r = unix_http(http_daemon, "POST", "/v1/chat/completions",
                  {"model": "chat", "messages": messages})
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_chat_bad_shapes_are_refused_before_the_op(http_daemon):
    """What the HTTP layer itself refuses (the OpenAI shapes), on any branch."""
    for body, words in [
        ({"model": "tiny", "messages": "hi"}, "messages must be an array"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "only text parts"),
        ({"model": "tiny", "messages": [], "response_format": {"type": "yaml"}},
         "response_format.type"),
        ({"model": "tiny", "messages": [], "tools": [{"type": "function"}]}, "tools"),
    ]:
        r = unix_http(http_daemon, "POST", "/v1/chat/completions", body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert time.monotonic()  # the daemon is still there:
    http_daemon.assert_serving()


def test_an_error_after_the_stream_started_is_an_sse_event(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096) + HTTP)
    r = unix_http(d, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True,
                                                 "max_tokens": 3000, "timeout": 1.5})
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
    events = [e for e in r.text.split("\n\n") if e]
    assert json.loads(events[0][6:])["choices"][0]["text"] is not None  # tokens came first
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "timeout" and "data: [DONE]" not in events


def test_metrics_endpoint_counts_a_completion(http_daemon):
    from prometheus_client.parser import text_string_to_metric_families

    def completed() -> tuple[float, float]:
        r = unix_http(http_daemon, "GET", "/metrics")
        assert r.status_code == 200 and r.headers["Content-Type"].startswith(
            "text/plain; version=0.0.4"), r.headers
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(r.text) for s in family.samples}
        return (samples.get(("llm_residentd_requests_total",
                             (("model", "tiny"), ("outcome", "completed"))), 0.0),
                samples[("llm_residentd_completion_tokens_total", (("model", "tiny"),))])

    before = completed()
    r = unix_http(http_daemon, "POST", "/v1/completions",
                  {"model": "tiny", "prompt": "x", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert completed() == (before[0] + 1, before[1] + 3)
