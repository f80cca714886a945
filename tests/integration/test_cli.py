"""llmctl against a real daemon serving the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_submit_streams_text_and_exits_zero(tiny_daemon):
    r = tiny_daemon.llmctl("submit", "hello world", "--max-tokens", "8", "--ignore-eos", "-v")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "no text streamed"
    assert "accepted for tiny" in r.stderr
    assert "8 tokens" in r.stderr  # the stats line: ignore_eos makes the count exact


def test_submit_json_events(tiny_daemon):
    r = tiny_daemon.llmctl("submit", "--json", "the answer is", "-n", "6", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[0]["event"] == "accepted" and events[0]["model"] == "tiny"
    assert {e["event"] for e in events[1:-1]} == {"token"}
    done = events[-1]
    assert done["event"] == "done"
    stats = done["stats"]
    assert stats["completion_tokens"] == 6 and stats["finish_reason"] == "length"
    assert stats["prompt_tokens"] > 0
    assert 0 < stats["ttft_s"] <= stats["total_s"]
    assert stats["tokens_per_s"] > 0


def test_submit_reads_prompt_from_stdin(tiny_daemon):
    r = tiny_daemon.llmctl("submit", "-", "-n", "3", "--json", input="tell me about the sky")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["event"] == "done"


def test_status_and_models(tiny_daemon):
    tiny_daemon.llmctl("submit", "hello", "-n", "4")
    r = tiny_daemon.llmctl("status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    (worker,) = st["workers"]
    assert worker["model"] == "tiny" and worker["state"] == "idle"
    assert worker["pid"] > 0 and worker["threads"] == 1 and worker["rss_bytes"] > 1 << 20
    m = st["models"]["tiny"]
    assert m["state"] == "ready" and m["queue_depth"] == 0
    assert m["outcomes"]["completed"] >= 1
    for key in ("ttft_s", "latency_s", "tokens_per_s"):
        assert set(m[key]) == {"p50", "p95", "p99"} and m[key]["p50"] is not None
    text = tiny_daemon.llmctl("status").stdout
    assert "tiny-0" in text and "TTFT ms p50/95/99" in text
    r = tiny_daemon.llmctl("models", "--json")
    (model,) = json.loads(r.stdout)
    assert model["name"] == "tiny" and model["state"] == "ready" and model["n_ctx"] == 256


def test_errors_have_messages_and_exit_codes(tiny_daemon, tmp_path):
    r = tiny_daemon.llmctl("submit", "-m", "nope", "hi")
    assert r.returncode == 1 and "no_such_model" in r.stderr and "tiny" in r.stderr
    r = tiny_daemon.llmctl("cancel", "r999999")
    assert r.returncode == 1 and "no_such_request" in r.stderr
    r = subprocess.run([sys.executable, "-m", "llmctl", "--socket", str(tmp_path / "x.sock"),
                        "status"], capture_output=True, text=True)
    assert r.returncode == 3 and "is llm-residentd running" in r.stderr
    r = tiny_daemon.llmctl("submit")
    assert r.returncode == 2 and "PROMPT" in r.stderr
    r = tiny_daemon.llmctl("submit", "a long story", "-n", "200", "--ignore-eos",
                           "--timeout", "0.001")
    assert r.returncode == 4 and "(timeout)" in r.stderr


@pytest.mark.parametrize("cmd", [[], ["submit"], ["status"], ["models"], ["cancel"], ["wait"]])
def test_help(cmd):
    r = subprocess.run([sys.executable, "-m", "llmctl", *cmd, "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "usage: llmctl" in r.stdout


def test_daemon_help_and_check_config(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llm_residentd", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "--config" in r.stdout and "LLM_RESIDENTD_SOCKET" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.x]\npath = "/m.gguf"\nn_ctx = "big"\n')
    r = subprocess.run([sys.executable, "-m", "llm_residentd", "--config", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "models.x.n_ctx: expected int, got str" in r.stderr


def test_a_request_seed_does_not_leak_into_later_requests(tiny_daemon):
    def run(**kw):
        with tiny_daemon.client() as c:
            return "".join(c.submit("the sky", max_tokens=16, temperature=2.0, ignore_eos=True,
                                    **kw).text())
    assert run(seed=42) == run(seed=42)  # a request's seed makes it reproducible
    assert run() != run()  # and later unseeded requests draw fresh seeds


def test_raw_client_written_from_the_protocol_doc(tiny_daemon):
    from pathlib import Path
    client = Path(__file__).parents[2] / "docs" / "examples" / "raw_client.py"
    r = subprocess.run([sys.executable, str(client), "--socket", str(tiny_daemon.socket),
                        "--max-tokens", "5", "hello world"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "completion_tokens" in r.stdout + r.stderr
    r = subprocess.run([sys.executable, str(client), "--socket", str(tiny_daemon.socket),
                        "--model", "nope", "hi"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no_such_model" in r.stdout + r.stderr


def _json_line(r) -> dict:
    """The one JSON object a --json command printed; nothing on stderr."""
    (line,) = r.stdout.splitlines()
    assert r.stderr == "", r.stderr
    return json.loads(line)


def test_every_command_with_json_prints_its_errors_as_one_json_object(tiny_daemon, tmp_path):
    refused = {
        ("submit", "-m", "nope", "hi"): (1, "no_such_model"),
        ("cancel", "r999999"): (1, "no_such_request"),
        ("limits", "nope"): (1, "no_such_model"),
        ("policy", "show", "nope"): (1, "bad_request"),
        ("policy", "set", "static", "cpu=banana"): (1, "bad_request"),
        ("policy", "disable", "static"): (1, "bad_request"),  # not enabled
        ("wait", "nope"): (1, "no_such_model"),
        ("submit", "-n", "100000", "hi"): (1, "bad_request"),
        ("policy", "show"): (2, "usage"),
        ("submit", "hi", "--top-p", "7"): (2, "usage"),
    }
    for args, (code, error) in refused.items():
        r = tiny_daemon.llmctl(*args, "--json")
        assert r.returncode == code, (args, r.stdout, r.stderr)
        reply = _json_line(r)
        assert reply["ok"] is False and reply["error"]["code"] == error, (args, reply)
        assert reply["error"]["message"]
        assert reply.get("event") == ("error" if args[0] == "submit" and code == 1 else None)
    gone = str(tmp_path / "nothing.sock")
    for args in (["submit", "hi"], ["status"], ["models"], ["cancel", "r1"], ["limits", "tiny"],
                 ["policy", "list"], ["events"], ["wait", "--timeout", "0.5"]):
        r = subprocess.run([sys.executable, "-m", "llmctl", "--socket", gone, *args, "--json"],
                           capture_output=True, text=True, timeout=60)
        expected = 4 if args[0] == "wait" else 3  # wait keeps trying until its timeout
        assert r.returncode == expected, (args, r.stdout, r.stderr)
        reply = _json_line(r)
        assert reply["ok"] is False
        assert reply["error"]["code"] == ("client_timeout" if args[0] == "wait" else "not_running")


def test_json_success_of_wait_and_failure_of_a_running_request(tiny_daemon):
    r = tiny_daemon.llmctl("wait", "--json")
    assert r.returncode == 0 and _json_line(r) == {"ok": True, "models": {"tiny": "ready"}}
    r = tiny_daemon.llmctl("submit", "--json", "a long story", "-n", "200", "--ignore-eos",
                           "--timeout", "0.001")
    assert r.returncode == 4 and r.stderr == ""
    last = json.loads(r.stdout.splitlines()[-1])
    assert last["event"] == "error" and last["ok"] is False
    assert last["error"]["code"] == "timeout"


def _model_row(text: str) -> dict[str, str]:
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("MODEL")).split()
    row = next(line for line in lines if line.startswith("tiny ")).split()
    return dict(zip(header[:8], row[:8], strict=True))


def test_status_counts_cancelled_and_timed_out_apart_from_failed(start_daemon, tiny_model_path):
    from harness import tiny_config, wait_for
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096))
    with d.client() as c:
        blocker = c.submit("keep busy", max_tokens=3000, ignore_eos=True)
        wait_for(lambda: d.status()["workers"][0]["state"] == "busy", what="the worker busy")
        r = d.llmctl("submit", "queued", "-t", "0.3")  # times out in the queue
        assert r.returncode == 4, r.stderr
        c.cancel(blocker.request)
        assert list(blocker.events())[-1]["error"]["code"] == "cancelled"
    assert d.llmctl("submit", "hello", "-n", "3").returncode == 0
    row = _model_row(d.llmctl("status").stdout)
    assert (row["DONE"], row["CANCELLED"], row["TIMEOUT"], row["FAILED"]) == ("1", "1", "1", "0")
    outcomes = json.loads(d.llmctl("status", "--json").stdout)["models"]["tiny"]["outcomes"]
    assert outcomes == {"completed": 1, "cancelled": 1, "timeout": 1}
