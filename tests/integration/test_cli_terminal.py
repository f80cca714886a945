"""What llmctl submit tells a person at a terminal (stderr a tty), and what it keeps from
pipes and --json: the waiting line and the max_tokens notice."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import time

import pytest
from harness import tiny_config, wait_for
from llmctl import LlmctlError

LONG = {"max_tokens": 4000, "ignore_eos": True}  # keeps the single worker busy for seconds
CLEAR = b"\r\x1b[K"


def llmctl_on_tty(d, *args: str, until=None, timeout: float = 60) -> tuple[int, bytes]:
    """Run llmctl with stdout and stderr on one pty: what a terminal would show, in order.
    until(output) is called on each read (to act when something appears)."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "--socket", str(d.socket), *args],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the pty
                break
            if not data:
                break
            out += data
            if until is not None:
                until(out)
        else:
            raise AssertionError(f"llmctl still running after {timeout} s: {out!r}")
        return proc.wait(timeout=10), out
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def busy(start_daemon, tiny_model_path):
    """A daemon whose single worker runs a long request; busy.release() cancels it."""
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096))
    client = d.client()
    blocker = client.submit("keep busy", **LONG)
    wait_for(lambda: d.status()["workers"][0]["state"] == "busy", what="the worker busy")

    def release(_out: bytes = b"") -> None:
        if not blocker.finished:
            blocker.finished = True
            with contextlib.suppress(LlmctlError):  # it may have ended by itself
                client.cancel(blocker.request)
    d.release = release
    yield d
    release()
    client.close()


def test_waiting_line_shows_the_queue_and_is_cleared_before_the_text(busy):
    released = []

    def on_output(out: bytes) -> None:
        if b"queued: 1 ahead (1 running, 0 queued)" in out and not released:
            released.append(True)
            busy.release()

    rc, out = llmctl_on_tty(busy, "submit", "hello", "-n", "8", "--ignore-eos",
                            until=on_output)
    assert rc == 0, out
    assert released, f"no waiting line on the terminal: {out!r}"
    first = out.index(b"llmctl: queued: 1 ahead (1 running, 0 queued), ")
    assert out[first - len(CLEAR):first] == CLEAR  # drawn over one line
    last_line = out.rindex(b"llmctl: queued")
    cleared = out.index(CLEAR, last_line)
    text = out[cleared + len(CLEAR):]
    assert text.strip() and b"llmctl:" not in text.split(b"\n")[0], out  # text, nothing else


def test_no_waiting_line_on_a_pipe_or_with_json(busy):
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "--socket", str(busy.socket),
                             "submit", "hello", "-n", "4", "-v"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    time.sleep(3)  # three refreshes of the line, had it been drawn
    busy.release()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip()
    ttft_ms = int(re.search(rb"TTFT (\d+) ms", err).group(1))
    assert ttft_ms > 2000, "the request did not wait: this test proves nothing"
    assert b"queued" not in err and b"\x1b" not in err and b"\r" not in err, err


def test_no_waiting_line_on_a_terminal_with_json(busy):
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "--socket", str(busy.socket),
                             "submit", "--json", "hello", "-n", "4"], stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    time.sleep(3)  # three refreshes of the line, had it been drawn
    busy.release()
    out, _ = proc.communicate(timeout=60)
    os.set_blocking(master, False)
    try:
        err = os.read(master, 4096)
    except (BlockingIOError, OSError):  # nothing written, or the pty is closed
        err = b""
    os.close(master)
    assert proc.returncode == 0 and b'"done"' in out
    done = json.loads(out.splitlines()[-1])
    assert done["stats"]["queue_s"] > 2, "the request did not wait: this test proves nothing"
    assert err == b""


def test_a_request_stopped_by_max_tokens_says_so_on_a_terminal(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path))  # max_tokens = 16 in the model's config
    rc, out = llmctl_on_tty(d, "submit", "hello", "-n", "5", "--ignore-eos")
    assert rc == 0 and b"llmctl: stopped at max_tokens 5; use -n to allow more" in out, out
    rc, out = llmctl_on_tty(d, "submit", "hello", "--ignore-eos")
    assert rc == 0 and b"llmctl: stopped at max_tokens 16; use -n to allow more" in out, out
    r = d.llmctl("submit", "hello", "-n", "5", "--ignore-eos")  # stderr a pipe: nothing
    assert r.returncode == 0 and r.stderr == ""
    rc, out = llmctl_on_tty(d, "submit", "--json", "hello", "-n", "5", "--ignore-eos")
    assert rc == 0 and b"max_tokens" not in out and b'"finish_reason": "length"' in out
