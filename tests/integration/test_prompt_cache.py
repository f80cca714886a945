"""The prompt cache in a real worker (tiny model, one slot): a conversation pushed out of
its slot by another is restored from the cache, in memory and from disk after the worker
is gone; greedy output with a restored cache equals the output without one; files that
do not belong (another context, truncated, corrupt, an unwritable directory) are
refused with a warning and the request is recomputed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tinymodel
from llm_residentd.wire.protocol import recv_frame, send_frame

GREEDY = {"temperature": 0.0, "top_k": 1, "raw": True, "ignore_eos": True, "seed": 1}
MIB = 1 << 20


def words(tag: str, n: int) -> str:
    """n words of text of its own (distinct tags share no prefix after the first word)."""
    return " ".join(f"{tag}{i % 7} word{i}" for i in range(n))


class Worker:
    """A worker over its socketpair; collects what it says besides tokens."""

    def __init__(self, model: Path, *, cache: int = 64 * MIB, disk: int = 0,
                 cache_dir: Path | None = None, n_ctx: int = 1024, parallel: int = 1,
                 chat: bool = False, adapters: dict[str, str] | None = None) -> None:
        self.sock, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_residentd.worker", "--fd", str(child.fileno())],
            pass_fds=[child.fileno()], stderr=subprocess.PIPE, text=True)
        child.close()
        send_frame(self.sock, {
            "type": "load", "path": str(model), "n_ctx": n_ctx, "n_batch": 64, "threads": 1,
            "chat_template": chat, "seed": 1, "stream_interval": 0.0, "parallel": parallel,
            "adapters": adapters or {},
            "prompt_cache": cache, "prompt_cache_disk": disk,
            "prompt_cache_dir": str(cache_dir or "")})
        self.cache: dict[str, Any] = {}
        ready = self.recv()
        assert ready["type"] == "ready", ready
        self.stderr = ""

    def recv(self) -> dict[str, Any]:
        """The next message but batch and prompt cache reports (the latest is kept)."""
        self.sock.settimeout(60)
        while True:
            msg = recv_frame(self.sock, 64 << 20)
            assert msg is not None, "worker closed its socket"
            if msg["type"] == "prompt_cache":
                self.cache = msg["stats"]
                if msg["asked"]:
                    return msg
            elif msg["type"] != "batch":
                return msg

    def run(self, req: str, prompt: str, max_tokens: int = 16,
            **extra: Any) -> tuple[str, dict[str, Any]]:
        """A raw prompt, or with messages= a chat; extra: more request fields."""
        params = {"prompt": prompt, "max_tokens": max_tokens, **GREEDY, **extra}
        if "messages" in extra:
            params.update(prompt="", raw=False)
        send_frame(self.sock, {"type": "generate", "req": req, "params": params})
        text = ""
        while (msg := self.recv())["type"] == "token":
            text += msg["text"]
        assert msg["type"] == "done", msg
        return text, msg["stats"]

    def stats(self) -> dict[str, Any]:
        """The cache's report (set_prompt_cache to the current limit asks for one)."""
        send_frame(self.sock, {"type": "set_prompt_cache", "limit": self.cache.get("limit", 64 * MIB)})
        return self.recv()["stats"]

    def close(self) -> str:
        """Stop it (a stopping worker writes its slots to disk); returns its stderr."""
        send_frame(self.sock, {"type": "shutdown"})
        self.stderr = self.proc.communicate(timeout=60)[1]
        self.sock.close()
        return self.stderr


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    made: list[Worker] = []
    yield made
    for w in made:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def test_a_conversation_pushed_out_of_its_slot_comes_back_from_the_cache(
        tiny_model_path: Path, workers: list[Worker]) -> None:
    """One slot, two conversations taking turns: without the cache each turn evaluates its
    whole history again; with it, the next turn restores the earlier one's KV, and the
    greedy text is the same as a worker without a cache writes."""
    a1, b1 = words("alpha", 60), words("beta", 60)
    with_cache = Worker(tiny_model_path)
    without = Worker(tiny_model_path, cache=0)
    workers += [with_cache, without]
    texts = {}
    for name, w in (("cache", with_cache), ("none", without)):
        t_a1, s_a1 = w.run("a1", a1)
        w.run("b1", b1)  # takes the slot: A's KV goes to the cache (or is lost)
        a2 = a1 + t_a1 + " then the user asks again about it"
        t_a2, s_a2 = w.run("a2", a2)
        texts[name] = (t_a1, t_a2, s_a1, s_a2)
    t_a1, t_a2, s_a1, s_a2 = texts["cache"]
    assert (t_a1, t_a2) == texts["none"][:2]  # restored KV, same greedy text
    assert s_a1["cached_tokens"] == 0
    # A2 restored A1's prompt and answer (all but what re-tokenising the joint changes).
    assert s_a2["cached_tokens"] >= s_a1["prompt_tokens"], s_a2
    assert texts["none"][3]["cached_tokens"] <= 1  # without the cache: all but the BOS again
    st = with_cache.stats()
    assert st["hits"] == 1 and st["tokens_reused"] == s_a2["cached_tokens"], st
    assert st["entries"] >= 1 and 0 < st["bytes"] <= st["limit"]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}


@pytest.mark.parametrize("shape", ["chat", "adapter", "json_schema"])
def test_restored_output_equals_the_output_without_a_cache(
        shape: str, tiny_model_path: Path, tiny_chat_model_path: Path, tmp_path: Path,
        workers: list[Worker]) -> None:
    """Greedy text after a restore equals a cacheless worker's, for a chat (the template's
    markers around the history), a LoRA adapter (the cache keeps states per adapter) and
    a JSON schema (a grammar constrains the answer, not the prompt)."""
    model = tiny_chat_model_path if shape == "chat" else tiny_model_path
    adapters = {"a": str(tinymodel.write_tiny_lora(tmp_path / "a.gguf", seed=1))}
    extra: dict[str, Any] = {"adapter": "a"} if shape == "adapter" else \
        {"json_schema": SCHEMA} if shape == "json_schema" else {}

    def ask(w: Worker, req: str, history: list[str]) -> tuple[str, dict[str, Any]]:
        if shape == "chat":
            roles = ["user", "assistant"]
            msgs = [{"role": roles[i % 2], "content": t} for i, t in enumerate(history)]
            return w.run(req, "", messages=msgs, **extra)
        return w.run(req, " ".join(history), **extra)

    runs = {}
    for name, cache in (("cache", 64 * MIB), ("none", 0)):
        w = Worker(model, cache=cache, chat=shape == "chat", adapters=adapters)
        workers.append(w)
        a = [words("alpha", 50)]
        t1, s1 = ask(w, "a1", a)
        ask(w, "b1", [words("beta", 50)])  # takes the slot
        a += [t1, "and then a second question comes"]
        t2, s2 = ask(w, "a2", a)
        runs[name] = (t1, t2, s1, s2)
    assert runs["cache"][:2] == runs["none"][:2]
    s1, s2 = runs["cache"][2:]
    assert s2["cached_tokens"] >= s1["prompt_tokens"] - 2, (s1, s2)  # the history restored
    # Without the cache only what A shares with B (a BOS, the template's opening) is reused.
    assert runs["none"][3]["cached_tokens"] < s1["prompt_tokens"] // 2


def test_a_state_computed_under_an_adapter_serves_only_that_adapter(
        tiny_model_path: Path, tmp_path: Path, workers: list[Worker]) -> None:
    adapters = {"a": str(tinymodel.write_tiny_lora(tmp_path / "a.gguf", seed=1))}
    w = Worker(tiny_model_path, adapters=adapters)
    workers.append(w)
    a = words("alpha", 50)
    w.run("a1", a, adapter="a")
    w.run("b1", words("beta", 50))
    _, base = w.run("a-base", a + " more")  # the same text without the adapter
    assert base["cached_tokens"] <= 1
    w.run("b2", words("beta", 50) + " again")
    _, same = w.run("a-again", a + " more", adapter="a")
    assert same["cached_tokens"] >= 50


def test_a_shared_prefix_serves_many_requests_and_stays(tiny_model_path: Path,
                                                        workers: list[Worker]) -> None:
    """Restoring copies: one cached system prompt serves every request that starts with it."""
    w = Worker(tiny_model_path)
    workers.append(w)
    system = words("system", 50)
    w.run("s", system + " first question")
    hits = []
    for i in range(3):
        w.run(f"other{i}", words(f"other{i}x", 40))  # pushes the last one out of the slot
        _, st = w.run(f"q{i}", system + f" question number {i} is this")
        hits.append(st["cached_tokens"])
    assert all(n >= 50 for n in hits), hits
    assert w.stats()["hits"] == 3


def test_the_cache_comes_back_from_disk_after_the_worker_is_gone(
        tiny_model_path: Path, tmp_path: Path, workers: list[Worker]) -> None:
    """A stopping worker writes its slot and its cache to disk; the next one (an unload,
    a restart) restores from the file, and the text is the one a cold worker writes."""
    a1 = words("gamma", 80)
    first = Worker(tiny_model_path, disk=64 * MIB, cache_dir=tmp_path)
    workers.append(first)
    t_a1, s_a1 = first.run("a1", a1)
    first.close()
    assert list(tmp_path.glob("*.kvc")), "no cache file after the worker stopped"
    a2 = a1 + t_a1 + " and a follow-up question"
    second = Worker(tiny_model_path, disk=64 * MIB, cache_dir=tmp_path)
    cold = Worker(tiny_model_path, cache=0)
    workers += [second, cold]
    t_a2, s_a2 = second.run("a2", a2)
    assert t_a2 == cold.run("a2", a2)[0]
    assert s_a2["cached_tokens"] >= s_a1["prompt_tokens"], s_a2
    st = second.stats()
    assert st["disk_hits"] == 1 and st["disk_entries"] >= 1, st


@pytest.mark.parametrize("damage", ["other_context", "truncated", "corrupt", "garbage"])
def test_a_file_that_does_not_belong_is_removed_with_one_warning_and_recomputed(
        tiny_model_path: Path, tmp_path: Path, workers: list[Worker], damage: str) -> None:
    a1 = words("delta", 80)
    first = Worker(tiny_model_path, disk=64 * MIB, cache_dir=tmp_path)
    workers.append(first)
    t_a1, _ = first.run("a1", a1)
    first.close()
    (path,) = tmp_path.glob("*.kvc")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        path.write_bytes(data[:-100] + bytes(b ^ 0xFF for b in data[-100:]))
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    n_ctx = 2048 if damage == "other_context" else 1024
    second = Worker(tiny_model_path, disk=64 * MIB, cache_dir=tmp_path, n_ctx=n_ctx)
    cold = Worker(tiny_model_path, cache=0, n_ctx=n_ctx)
    workers += [second, cold]
    a2 = a1 + t_a1 + " and a follow-up question"
    t_a2, s_a2 = second.run("a2", a2)
    assert t_a2 == cold.run("a2", a2)[0]
    assert s_a2["cached_tokens"] == 0
    assert not path.exists()
    stderr = second.close()
    warnings = [line for line in stderr.splitlines() if "prompt cache" in line]
    assert len(warnings) == 1, stderr
    reason = {"other_context": "n_ctx", "truncated": "truncated", "corrupt": "checksum",
              "garbage": "not a prompt cache file"}[damage]
    assert reason in warnings[0], warnings


def test_an_unwritable_cache_directory_turns_the_disk_off_and_serving_goes_on(
        tiny_model_path: Path, tmp_path: Path, workers: list[Worker]) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("a file where the directory should be")
    w = Worker(tiny_model_path, disk=64 * MIB, cache_dir=blocked / "cache")
    workers.append(w)
    w.run("a", words("eps", 60))
    w.run("b", words("zeta", 60))
    _, st = w.run("a2", words("eps", 60) + " again")
    assert st["cached_tokens"] >= 60
    stats = w.stats()
    assert stats["disk_error"] and "cannot create" in stats["disk_error"], stats
    assert stats["hits"] == 1


def test_many_conversations_stay_within_the_memory_bound(tiny_model_path: Path,
                                                         workers: list[Worker]) -> None:
    """1,000 distinct conversations through one slot: the cache holds at most its limit
    and pushes the least recently used out; the last ones are still found."""
    limit = 2 * MIB
    w = Worker(tiny_model_path, cache=limit)
    workers.append(w)
    for i in range(1000):
        w.run(f"c{i}", words(f"conv{i}x", 20), max_tokens=1)
        if i % 100 == 99:
            st = w.stats()
            assert st["bytes"] <= limit, st
    st = w.stats()
    assert st["evicted"] > 0 and st["bytes"] <= limit and st["entries"] >= 2, st
    _, again = w.run("c998again", words("conv998x", 20) + " more", max_tokens=1)
    assert again["cached_tokens"] >= 20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_states_the_cache_lets_go_leave_the_process(tiny_model_path: Path,
                                                    workers: list[Worker]) -> None:
    """Emptying the cache (what memory pressure asks) gives its memory back to the kernel:
    the worker's RSS falls by about what the cache held."""
    w = Worker(tiny_model_path, cache=256 * MIB)
    workers.append(w)
    for i in range(90):
        w.run(f"c{i}", words(f"long{i}x", 110), max_tokens=1)
    held = w.stats()["bytes"]
    assert held > 30 * MIB, held
    before = rss(w.proc.pid)
    send_frame(w.sock, {"type": "set_prompt_cache", "limit": 0})
    answer = w.recv()
    assert answer["freed_bytes"] == held and answer["stats"]["bytes"] == 0, answer
    after = rss(w.proc.pid)
    assert before - after > 0.8 * held, (before, after, held)
    _, again = w.run("c89again", words("long89x", 110), max_tokens=1)
    assert again["cached_tokens"] >= 500  # the slot still holds the last one

