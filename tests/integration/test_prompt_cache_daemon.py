"""The prompt cache through the daemon, asked with the openai package: a conversation's
next turn reports the prompt tokens a cache held (usage.prompt_tokens_details.cached_tokens,
as OpenAI reports them); status, `llmctl ps` and /metrics show the cache; the conversation
stays warm after `llmctl unload` and after a daemon restart (the files under state_dir);
bad sizes in the config are errors naming the key.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, submit_raw, tiny_config, wait_for
from http_helpers import unix_client, unix_http
from test_hostile_http import idle

HTTP = '[http]\nlisten = ""\n'
SYSTEM = "You are a careful assistant. " * 12


def chat(client: Any, history: list[dict[str, str]], text: str) -> tuple[str, dict[str, Any]]:
    """One turn: the whole history and a new user message; the answer joins the history."""
    history.append({"role": "user", "content": text})
    r = client.chat.completions.create(model="tiny", messages=history, max_tokens=12,
                                       temperature=0, extra_body={"ignore_eos": True})
    answer = r.choices[0].message.content
    history.append({"role": "assistant", "content": answer})
    return answer, r.usage.model_dump()


def cache_of(d: Daemon) -> dict[str, Any]:
    return d.status()["models"]["tiny"]["prompt_cache"]


@pytest.fixture
def daemon(tmp_path: Path, tiny_chat_model_path: Path):
    d = Daemon(tmp_path, tiny_config(tiny_chat_model_path, n_ctx=1024, parallel=1) + HTTP)
    d.start()
    yield d
    d.stop()


def test_the_next_turn_reports_cached_tokens_and_survives_unload_and_restart(
        daemon: Daemon, tmp_path: Path) -> None:
    d = daemon
    client = unix_client(d)
    a = [{"role": "system", "content": SYSTEM}]
    b = [{"role": "system", "content": "Another prompt entirely, for another user. " * 8}]
    _, u1 = chat(client, a, "Tell me about the sea.")
    chat(client, b, "Tell me about mountains.")  # takes the only slot: A goes to the cache
    _, u2 = chat(client, a, "And about rivers?")
    assert u1["prompt_tokens_details"]["cached_tokens"] <= 1  # nothing but a BOS before
    assert u2["prompt_tokens_details"]["cached_tokens"] >= u1["prompt_tokens"], (u1, u2)
    # The worker reports its cache as it goes idle, beside the answer: wait for it.
    c = wait_for(lambda: (c := cache_of(d))["hits"] >= 1 and c, what="the cache's report")
    assert c["hits"] >= 1 and c["tokens_reused"] >= u1["prompt_tokens"] and c["bytes"] > 0, c
    assert c["limit"] > 0 and c["disk_limit"] == 1 << 30 and c["disk_error"] is None, c

    ps = json.loads(d.llmctl("ps", "--json").stdout)["models"][0]
    assert ps["prompt_cache"]["hits"] == c["hits"]
    assert "hits" in d.llmctl("ps").stdout
    metrics = unix_http(d, "GET", "/metrics").text
    hits = re.findall(r'^llm_residentd_worker_prompt_cache_lookups_total\{[^}]*'
                      r'result="hit_memory"[^}]*\} (\S+)$', metrics, re.M)
    assert hits and float(hits[0]) >= 1, [x for x in metrics.splitlines() if "prompt_cache" in x]

    # Unloaded: the stopping worker writes its slot; the next turn restores from disk.
    assert d.llmctl("unload", "tiny").returncode == 0
    wait_for(lambda: d.status()["models"]["tiny"]["state"] == "unloaded", timeout=30,
             what="tiny unloaded")
    files = list((tmp_path / "state" / "prompt-cache" / "tiny" / "worker-0").glob("*.kvc"))
    assert files, "no prompt cache file after the unload"
    _, u3 = chat(client, a, "And lakes?")
    assert u3["prompt_tokens_details"]["cached_tokens"] >= u2["prompt_tokens"], (u2, u3)
    wait_for(lambda: cache_of(d)["disk_hits"] >= 1, what="a disk hit in status")

    # A daemon restart: the same.
    assert d.stop() == 0
    d.start()
    client = unix_client(d)
    _, u4 = chat(client, a, "And the weather?")
    assert u4["prompt_tokens_details"]["cached_tokens"] >= u3["prompt_tokens"], (u3, u4)
    wait_for(lambda: cache_of(d)["disk_hits"] >= 1, what="a disk hit in status")


def test_a_client_that_leaves_during_a_restore_frees_the_slot(daemon: Daemon) -> None:
    """A cached conversation's next turn, its client gone as soon as it is accepted: the
    worker restores (or is about to), takes the cancel at its next step, and the slot is
    free for the next request, which runs."""
    d = daemon
    a = words_prompt("alpha")
    for prompt in (a, words_prompt("beta")):  # beta pushes alpha into the prompt cache
        list(d.client().submit(prompt, model="tiny", max_tokens=4, raw=True).events())
    for i in range(5):
        sock = d.raw()
        submit_raw(sock, f"gone{i}", a + f" turn {i}", model="tiny", max_tokens=200,
                   ignore_eos=True, raw=True)
        sock.close()
    idle(d)
    outcomes = d.status()["models"]["tiny"]["outcomes"]
    assert outcomes.get("cancelled", 0) + outcomes.get("completed", 0) >= 5, outcomes
    events = list(d.client().submit(a + " last", model="tiny", max_tokens=4, raw=True).events())
    assert events[-1]["event"] == "done"


def words_prompt(tag: str) -> str:
    return " ".join(f"{tag}{i % 5} word{i}" for i in range(120))


@pytest.mark.parametrize(("key", "value"), [("prompt_cache", "max"), ("prompt_cache", "1k"),
                                            ("prompt_cache_disk", "auto")])
def test_a_bad_cache_size_is_a_config_error_naming_the_key(
        tmp_path: Path, tiny_model_path: Path, key: str, value: str) -> None:
    d = Daemon(tmp_path, tiny_config(tiny_model_path, model_extra=f'{key} = "{value}"'))
    check = subprocess.run([sys.executable, "-m", "llm_residentd", "--config", str(d.config),
                            "--check-config"], capture_output=True, text=True, timeout=60)
    assert check.returncode != 0
    assert f"models.tiny.{key} {value!r}" in check.stderr + check.stdout, check
