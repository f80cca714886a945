"""llmctl chat on a terminal (a pty) and from a pipe, against the tiny model with a
ChatML template: the history goes with each question (the daemon's prompt_tokens show
it), Ctrl-C cancels an answer and not the session, the commands work."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp
import pytest
import tinymodel
from harness import tiny_config, wait_for

PROMPT = b">>> "


class Terminal:
    """llmctl chat with a pty as its controlling terminal, as a person runs it."""

    def __init__(self, socket: Path, *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once
            os.execv(sys.executable, [sys.executable, "-m", "llmctl", "--socket", str(socket),
                                      "chat", *args])
        self.out = b""

    def read_until(self, done, timeout: float = 60) -> bytes:
        """Output from here until done(output) holds."""
        start, deadline = len(self.out), time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self.out[start:]):
                return self.out[start:]
            if select.select([self.fd], [], [], 0.5)[0]:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the child is gone
                    data = b""
                if not data:
                    break
                self.out += data
        if done(self.out[start:]):
            return self.out[start:]
        raise AssertionError(f"timed out; the terminal shows {self.out[start:]!r}")

    def ask(self, line: str) -> str:
        """Type a line; the answer printed before the next prompt."""
        os.write(self.fd, line.encode() + b"\r")
        shown = self.read_until(lambda o: o.endswith(PROMPT))
        echoed = line.encode() + b"\r\n"
        assert shown.startswith(echoed), shown
        return shown[len(echoed):-len(PROMPT)].decode().replace("\r\n", "\n")

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, 9)
        raise AssertionError("llmctl chat did not exit")


@pytest.fixture
def daemon(start_daemon, tiny_chat_model_path: Path):
    return start_daemon(tiny_config(tiny_chat_model_path, n_ctx=4096))


@pytest.fixture(scope="module")
def vocab(tiny_chat_model_path: Path):
    return llama_cpp.Llama(model_path=str(tiny_chat_model_path), vocab_only=True, verbose=False)


def _prompt_tokens(vocab, messages: list[dict[str, str]]) -> int:
    return len(vocab.tokenize(tinymodel.chatml(messages).encode(), add_bos=False, special=True))


def _finished(d) -> list[dict]:
    return [e for e in d.logs() if e.get("event") == "request_finished"]


def test_a_conversation_keeps_its_history_and_clear_forgets_it(daemon, vocab):
    term = Terminal(daemon.socket, "--temperature", "0", "-n", "6", "--system", "be brief")
    banner = term.read_until(lambda o: o.endswith(PROMPT))
    assert b"Chatting with tiny" in banner
    system = {"role": "system", "content": "be brief"}
    q1, q2 = "hello there", "tell me more"
    a1 = term.ask(q1)
    assert a1.endswith("\n\n") and a1.strip()
    a1 = a1[:-2]
    a2 = term.ask(q2)[:-2]
    history = [system, {"role": "user", "content": q1}, {"role": "assistant", "content": a1}]
    done = wait_for(lambda: len(_finished(daemon)) >= 2 and _finished(daemon), what="2 turns")
    assert [e["prompt_tokens"] for e in done] == [
        _prompt_tokens(vocab, history[:2]),
        _prompt_tokens(vocab, [*history, {"role": "user", "content": q2}])]
    history += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]

    # /clear forgets the history, not the system prompt; /bye leaves
    os.write(term.fd, b"/clear\r")
    assert b"Cleared" in term.read_until(lambda o: o.endswith(PROMPT))
    term.ask(q1)
    last = wait_for(lambda: len(_finished(daemon)) >= 3 and _finished(daemon)[-1])
    assert last["prompt_tokens"] == _prompt_tokens(vocab, history[:2])
    os.write(term.fd, b"/bye\r")
    assert term.exit_code() == 0


def test_ctrl_c_cancels_the_answer_and_leaves_the_question_out(daemon, vocab):
    # answers of 3500 tokens: seconds of text, long enough to interrupt
    term = Terminal(daemon.socket, "--temperature", "0", "-n", "3500")
    term.read_until(lambda o: o.endswith(PROMPT))
    os.write(term.fd, b"go on and on\r")
    term.read_until(lambda o: len(o) > 40)
    os.write(term.fd, b"\x03")
    shown = term.read_until(lambda o: o.endswith(PROMPT))
    assert b"cancelled; left out of the conversation" in shown
    (cancelled,) = wait_for(lambda: _finished(daemon), what="the cancelled request")
    assert cancelled["outcome"] == "cancelled"
    # the session goes on, and the next question is the first of the conversation
    os.write(term.fd, b"a new question\r")
    term.read_until(lambda o: o.endswith(PROMPT))
    done = wait_for(lambda: len(_finished(daemon)) >= 2 and _finished(daemon)[-1])
    assert done["outcome"] == "completed" and done["prompt_tokens"] == _prompt_tokens(
        vocab, [{"role": "user", "content": "a new question"}])
    os.write(term.fd, b"\x04")
    assert term.exit_code() == 0


def test_ctrl_d_leaves_and_help_lists_the_commands(daemon):
    term = Terminal(daemon.socket)
    term.read_until(lambda o: o.endswith(PROMPT))
    os.write(term.fd, b"/?\r")
    shown = term.read_until(lambda o: o.endswith(PROMPT))
    for command in (b"/system", b"/clear", b"/bye", b"Ctrl-C"):
        assert command in shown
    os.write(term.fd, b"/nope\r")
    assert b"Unknown command /nope" in term.read_until(lambda o: o.endswith(PROMPT))
    os.write(term.fd, b"\x04")
    assert term.exit_code() == 0


def test_piped_stdin_is_one_question(daemon, vocab):
    question = "what is the big red dog\nand the lazy cat"
    run = subprocess.run([sys.executable, "-m", "llmctl", "--socket", str(daemon.socket), "chat",
                          "--temperature", "0", "-n", "5", "--system", "one word"],
                         input=question, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    with daemon.client() as c:
        want = "".join(c.submit(messages=[{"role": "system", "content": "one word"},
                                          {"role": "user", "content": question}],
                                temperature=0.0, max_tokens=5).text())
    assert run.stdout == want + "\n"
    # the daemon may log the second request's end a moment after its done event
    (first, _) = wait_for(lambda: len(f := _finished(daemon)) == 2 and f,
                          what="two request_finished lines")
    assert first["prompt_tokens"] == _prompt_tokens(
        vocab, [{"role": "system", "content": "one word"}, {"role": "user", "content": question}])
    empty = subprocess.run([sys.executable, "-m", "llmctl", "--socket", str(daemon.socket),
                            "chat"], input="", capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "no question" in empty.stderr
