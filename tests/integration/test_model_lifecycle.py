"""Models come and go (issue 15): load on demand, keep-alive, unload, ps, eviction to make
room and insufficient_memory, with the tiny model served under two names."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from harness import tiny_config, wait_for
from llmctl import LlmctlError

LONG = {"max_tokens": 3000, "ignore_eos": True}  # keeps a slot busy for a while


def two_models(model: Path, daemon: str = "", second: str = "", n_ctx: int = 256) -> str:
    """tiny (first: loads at start) and tiny2 (the same file; on demand by default)."""
    return tiny_config(model, daemon=daemon) + (
        f'\n[models.tiny2]\npath = "{model}"\nn_ctx = {n_ctx}\nmax_tokens = 8\nthreads = 1\n'
        f"parallel = 1\n{second}\n")


def run(d, model: str, **params) -> dict:
    with d.client() as c:
        events = list(c.submit("hello", model=model, max_tokens=4, **params).events())
    assert events[-1]["event"] == "done", events
    return events[-1]["stats"]


def workers_of(d, model: str) -> list[dict]:
    return [w for w in d.status()["workers"] if w["model"] == model]


def ps(d) -> dict[str, dict]:
    with d.client() as c:
        return {m["name"]: m for m in c.call("ps")["models"]}


def lifecycle_events(d) -> list[dict]:
    with d.client() as c:
        return [e for e in c.call("events", limit=500)["events"] if e["policy"] == "lifecycle"]


def test_a_model_on_demand_loads_at_its_first_request_and_says_it_was_cold(
        start_daemon, tiny_model_path: Path) -> None:
    d = start_daemon(two_models(tiny_model_path))
    models = d.status()["models"]
    assert models["tiny"]["loaded"] == "loaded" and models["tiny"]["keep_alive"] == "forever"
    assert models["tiny2"]["state"] == "unloaded" and models["tiny2"]["keep_alive"] == "5m"
    assert workers_of(d, "tiny2") == [] and "tiny2" not in ps(d)

    cold = run(d, "tiny2")
    assert cold["cold"] is True and cold["load_s"] > 0
    warm = run(d, "tiny2")
    assert warm["cold"] is False and warm["load_s"] is None
    assert run(d, "tiny")["cold"] is False  # loaded at start
    entry = ps(d)["tiny2"]
    assert entry["state"] == "ready" and entry["keep_alive"] == "5m"
    assert 0 < entry["unload_in_s"] <= 300 and entry["memory_bytes"] > 0
    assert entry["estimate_bytes"] > 0 and len(entry["pids"]) == 1
    loads = [e for e in lifecycle_events(d) if e["action"] == "load"]
    assert [e["target"] for e in loads] == ["tiny", "tiny2"]
    assert "a request is waiting" in loads[1]["reason"]


def test_keep_alive_zero_unloads_after_the_request_and_the_next_one_loads_it_again(
        start_daemon, tiny_model_path: Path) -> None:
    d = start_daemon(two_models(tiny_model_path))
    run(d, "tiny2", keep_alive="0")
    wait_for(lambda: workers_of(d, "tiny2") == [], timeout=30, what="tiny2 to unload")
    assert d.status()["models"]["tiny2"]["state"] == "unloaded"
    unloads = [e for e in lifecycle_events(d) if e["action"] == "unload"]
    assert unloads and unloads[-1]["target"] == "tiny2" and "keep_alive 0s" in unloads[-1]["reason"]
    # Its keep_alive lasted until it unloaded: the next load takes the configured 5m again.
    assert run(d, "tiny2")["cold"] is True
    assert ps(d)["tiny2"]["keep_alive"] == "5m"


def test_a_configured_keep_alive_unloads_an_idle_model_and_status_counts_down(
        start_daemon, tiny_model_path: Path) -> None:
    d = start_daemon(two_models(tiny_model_path, second='keep_alive = "3s"'))
    run(d, "tiny2")
    left = d.status()["models"]["tiny2"]["unload_in_s"]
    assert 0 < left <= 3
    wait_for(lambda: d.status()["models"]["tiny2"]["state"] == "unloaded", timeout=30,
             what="tiny2 to unload after its 3 s keep_alive")
    assert workers_of(d, "tiny2") == []
    assert d.status()["models"]["tiny"]["state"] == "ready"  # kept forever


def test_llmctl_load_ps_and_unload(start_daemon, tiny_model_path: Path) -> None:
    d = start_daemon(two_models(tiny_model_path))
    r = d.llmctl("load", "tiny2", "--keep-alive", "-1")
    assert r.returncode == 0, r.stderr
    table = d.llmctl("ps")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "STATE"]
    row = next(line for line in lines if line.startswith("tiny2 "))
    assert "forever" in row
    entries = {m["name"]: m for m in json.loads(d.llmctl("ps", "--json").stdout)["models"]}
    assert entries["tiny2"]["keep_alive"] == "forever" and entries["tiny2"]["unload_in_s"] is None

    r = d.llmctl("unload", "tiny2")
    assert r.returncode == 0, r.stderr
    assert workers_of(d, "tiny2") == [] and "tiny2" not in ps(d)
    # Unloading what is not loaded is an error that changes nothing.
    again = d.llmctl("unload", "tiny2")
    assert again.returncode != 0 and "not_loaded" in again.stderr
    unknown = d.llmctl("load", "nope")
    assert unknown.returncode != 0 and "no_such_model" in unknown.stderr
    assert d.status()["models"]["tiny"]["state"] == "ready"


def test_unload_lets_a_running_request_finish_and_force_cancels_it(
        start_daemon, tiny_model_path: Path) -> None:
    d = start_daemon(two_models(tiny_model_path, n_ctx=4096))
    with d.client() as c:
        stream = c.submit("a long one", model="tiny2", **LONG)
        wait_for(lambda: any(w["slots_busy"] for w in workers_of(d, "tiny2")), timeout=60,
                 what="tiny2's request to run")
        with d.client() as admin:
            admin.call("unload", model="tiny2")
        events = list(stream.events())
    assert events[-1]["event"] == "done" and events[-1]["stats"]["completion_tokens"] == 3000
    assert workers_of(d, "tiny2") == []

    with d.client() as c:
        stream = c.submit("a long one", model="tiny2", **LONG)
        wait_for(lambda: any(w["slots_busy"] for w in workers_of(d, "tiny2")), timeout=60,
                 what="tiny2's request to run again")
        with d.client() as admin:
            admin.call("unload", model="tiny2", force=True)
        events = list(stream.events())
    assert events[-1]["event"] == "error" and events[-1]["error"]["code"] == "model_unloaded"
    assert workers_of(d, "tiny2") == []
    d.assert_serving()


def test_a_model_that_cannot_fit_fails_with_insufficient_memory_and_nothing_else_changes(
        start_daemon, tiny_model_path: Path) -> None:
    d = start_daemon(two_models(tiny_model_path, daemon='memory_budget = "16M"',
                                second='load = "on_demand"').replace(
        "[models.tiny]", '[models.tiny]\nload = "on_demand"'))
    with d.client() as c:
        end = list(c.submit("hello", model="tiny2", max_tokens=4).events())[-1]
    assert end["event"] == "error" and end["error"]["code"] == "insufficient_memory", end
    assert "needs about" in end["error"]["message"]
    assert "daemon.memory_budget" in end["error"]["message"]
    r = d.llmctl("load", "tiny")
    assert r.returncode != 0 and "insufficient_memory" in r.stderr
    assert d.status()["models"]["tiny2"]["state"] == "unloaded"
    assert d.status()["workers"] == []


def test_a_load_that_does_not_fit_evicts_the_least_recently_used_idle_model(
        start_daemon, tiny_model_path: Path) -> None:
    third = (f'\n[models.tiny3]\npath = "{tiny_model_path}"\nn_ctx = 256\nmax_tokens = 8\n'
             "threads = 1\nparallel = 1\n")
    d = start_daemon(two_models(tiny_model_path) + third)
    run(d, "tiny2")
    run(d, "tiny3")
    run(d, "tiny2")  # tiny3 is now the least recently used of the on-demand ones
    # What the daemon counts for a loaded model: its estimate or its measure, the larger.
    sizes = {name: max(m["memory_bytes"], m["estimate_bytes"]) for name, m in ps(d).items()}
    assert set(sizes) == {"tiny", "tiny2", "tiny3"} and all(sizes.values())
    # A budget for two of the three: the next load must evict one.
    budget = sorted(sizes.values())[-1] * 2 + sorted(sizes.values())[-2] // 2
    config = d.config.read_text().replace("[daemon]\n", f'[daemon]\nmemory_budget = "{budget}"\n')
    d.config.write_text(config)
    with d.client() as c:
        c.call("unload", model="tiny3")
    d.proc.send_signal(1)  # SIGHUP: memory_budget applies live
    wait_for(lambda: (d.status()["daemon"]["reload"] or {}).get("result") == "ok", timeout=30,
             what="the reload")
    time.sleep(0.5)
    run(d, "tiny3")  # tiny (at start, idle longest) or tiny2: the LRU idle one goes
    evictions = [e for e in lifecycle_events(d) if e["action"] == "evict"]
    assert len(evictions) == 1 and evictions[0]["target"] == "tiny", evictions
    assert "to make room for tiny3" in evictions[0]["reason"]
    assert set(ps(d)) == {"tiny2", "tiny3"}
    run(d, "tiny")  # and back: tiny2 is now the least recently used
    assert set(ps(d)) == {"tiny", "tiny3"}


def test_bad_keep_alive_is_refused_and_nothing_changes(start_daemon, tiny_model_path: Path) -> None:
    d = start_daemon(two_models(tiny_model_path))
    for bad in ("soon", "5 minutes", "10y", "400d", ""):
        with d.client() as c, pytest.raises(LlmctlError) as err:
            c.call("submit", prompt="x", model="tiny2", keep_alive=bad)
        assert err.value.code == "bad_request", bad
    r = d.llmctl("load", "tiny2", "--keep-alive", "forever")
    assert r.returncode != 0 and "keep_alive" in r.stderr
    models = d.status()["models"]
    assert models["tiny2"]["state"] == "unloaded" and models["tiny2"]["queue_depth"] == 0
    assert models["tiny2"]["keep_alive"] == "5m" and workers_of(d, "tiny2") == []


def test_the_http_api_takes_keep_alive_as_ollama_does(start_daemon, tiny_model_path: Path) -> None:
    from http_helpers import unix_http

    d = start_daemon(two_models(tiny_model_path))
    r = unix_http(d, "POST", "/v1/completions",
                  {"model": "tiny2", "prompt": "x", "max_tokens": 2, "keep_alive": 0})
    assert r.status_code == 200, r.text
    wait_for(lambda: workers_of(d, "tiny2") == [], timeout=30, what="tiny2 to unload")
    r = unix_http(d, "POST", "/v1/completions",
                  {"model": "tiny2", "prompt": "x", "max_tokens": 2, "keep_alive": "2h"})
    assert r.status_code == 200 and ps(d)["tiny2"]["keep_alive"] == "2h"
    metrics = unix_http(d, "GET", "/metrics").text
    assert 'llm_residentd_model_state{model="tiny2",state="ready"} 1.0' in metrics
    assert 'llm_residentd_model_memory_bytes{model="tiny2"}' in metrics
    assert 'llm_residentd_model_unload_in_seconds{model="tiny2"}' in metrics
    assert 'llm_residentd_policy_actions_total{kind="unload",policy="lifecycle"} 1.0' in metrics
    r = unix_http(d, "POST", "/v1/completions",
                  {"model": "tiny2", "prompt": "x", "max_tokens": 2, "keep_alive": "later"})
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "keep_alive"
    assert ps(d)["tiny2"]["keep_alive"] == "2h"


def test_a_model_on_demand_whose_file_fails_fails_its_request_then_unloads(
        start_daemon, tiny_model_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\3\0\0\0" + b"\0" * 100)  # a GGUF header and nothing after
    d = start_daemon(tiny_config(tiny_model_path) + f'\n[models.bad]\npath = "{bad}"\n')
    assert d.status()["models"]["bad"]["state"] == "unloaded"
    with d.client() as c:
        end = list(c.submit("hello", model="bad", max_tokens=4).events())[-1]
    assert end["event"] == "error" and end["error"]["code"] == "model_unavailable", end
    assert "cannot load" in end["error"]["message"]
    # Nobody waits: its workers stop instead of retrying, and the next request tries again.
    wait_for(lambda: workers_of(d, "bad") == [], timeout=30, what="bad's workers to stop")
    (unload,) = [e for e in lifecycle_events(d) if e["action"] == "unload"]
    assert unload["target"] == "bad" and "it failed to load: " in unload["reason"]
    with d.client() as c:
        end = list(c.submit("hello", model="bad", max_tokens=4).events())[-1]
    assert end["error"]["code"] == "model_unavailable"
    # llmctl load says so too, at once, rather than retrying until its timeout.
    started = time.monotonic()
    r = d.llmctl("load", "bad", "--timeout", "60", timeout=90)
    assert r.returncode == 1 and "cannot load" in r.stderr and "(model_unavailable)" in r.stderr
    assert time.monotonic() - started < 30
    d.assert_serving()
