"""`llmctl chat`: a multi-turn conversation with a model on a terminal, like `ollama run`.

Each turn sends the whole conversation (the system prompt, every earlier question and
answer, the new question) as the submit op's `messages`; the daemon renders it with the
model's chat template. The answer streams as it is generated. Ctrl-C during an answer
cancels that request only: the question and the partial answer are left out of the
history, as if never asked, and the prompt comes back. With standard input not a
terminal, all of it is one question: the answer is printed and llmctl exits.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from .client import Client, LlmctlError, Stream
from .progress import StatusLine, describe_wait

PROMPT, MORE = ">>> ", "... "
POLL_S = 0.2  # how soon Ctrl-C during an answer is seen
WAIT_LINE_AFTER_S = 1.0  # a status line on stderr if the answer has not started by then
HELP = """\
Commands:
  /system TEXT   set the system prompt (history kept); /system alone shows it
  /clear         forget the conversation (the system prompt stays)
  /bye           leave (also Ctrl-D)
  /?, /help      this help
Ctrl-C during an answer cancels it; the question is then left out of the history.
Begin a message with \"\"\" to write several lines; end it with \"\"\"."""


class Chat:
    """The conversation so far, and how one more turn goes."""

    def __init__(self, client: Client, model: str, system: str | None,
                 fields: dict[str, Any]) -> None:
        self.client, self.model, self.system, self.fields = client, model, system, fields
        self.history: list[dict[str, str]] = []  # user and assistant messages, in turn

    def messages(self, question: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": question}]

    def ask(self, question: str, out: Any, status: StatusLine | None) -> str | None:
        """Stream the answer to out; keep the turn in the history if it completed.
        Returns the answer, or None if cancelled (Ctrl-C). Raises LlmctlError if the
        daemon refused or failed it."""
        stream = self.client.submit(messages=self.messages(question), model=self.model,
                                    **self.fields)
        answer, cancelled = [], False
        for event in _events(self.client, stream, status):
            if event["event"] == "token":
                answer.append(event["text"])
                out.write(event["text"])
                out.flush()
            elif event["event"] == "error" and event["error"]["code"] == "cancelled":
                cancelled = True
            elif event["event"] == "error":
                raise LlmctlError(event["error"]["code"], event["error"]["message"])
        text = "".join(answer)
        if cancelled:
            return None
        self.history += [{"role": "user", "content": question},
                         {"role": "assistant", "content": text}]
        return text


def _events(client: Client, stream: Stream, status: StatusLine | None
            ) -> Iterator[dict[str, Any]]:
    """The stream's events; Ctrl-C meanwhile cancels the request (the stream then ends
    with its cancelled error). SIGINT only sets a flag here: an exception in the middle
    of reading a frame could lose the frame."""
    asked: list[bool] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: asked.append(True))
    started, cancelled = time.monotonic(), False
    try:
        while not stream.finished:
            if asked and not cancelled:
                cancelled = True
                with contextlib.suppress(LlmctlError):  # it may have just ended
                    stream.cancel()
            event = stream.next_event(POLL_S)
            if event is None:
                waited = time.monotonic() - started
                if status is not None and not cancelled and waited > WAIT_LINE_AFTER_S:
                    with contextlib.suppress(LlmctlError):
                        status.show(describe_wait(client.status(), stream, waited))
                continue
            if status is not None:
                status.clear()
            if not (cancelled and event["event"] == "token"):  # no text after the ^C
                yield event
    finally:
        signal.signal(signal.SIGINT, previous)
        if status is not None:
            status.clear()


def _read_message(first: str) -> str:
    """A message from its first line: \"\"\"... continues until a line ending \"\"\"."""
    if not first.startswith('"""'):
        return first
    text = first[3:]
    while not text.endswith('"""'):
        text += "\n" + input(MORE)
    return text[:-3].strip("\n")


def interactive(chat: Chat) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  line editing and history for input()
    print(f"Chatting with {chat.model}. /? for help, /bye or Ctrl-D to leave.")
    status = StatusLine(sys.stderr) if sys.stderr.isatty() else None
    while True:
        try:
            line = _read_message(input(PROMPT))
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /bye to leave)")
            continue
        command, _, rest = line.strip().partition(" ")
        if not line.strip():
            continue
        if command in ("/bye", "/exit"):
            return 0
        if command in ("/?", "/help"):
            print(HELP)
        elif command == "/clear":
            chat.history.clear()
            print("Cleared the conversation.")
        elif command == "/system":
            if rest.strip():
                chat.system = rest.strip()
                print("Set the system prompt.")
            else:
                print(chat.system or "(no system prompt)")
        elif line.startswith("/") and not line.startswith('"""'):
            print(f"Unknown command {command}; /? for help.")
        else:
            _turn(chat, line, status)


def _turn(chat: Chat, question: str, status: StatusLine | None) -> None:
    try:
        answer = chat.ask(question, sys.stdout, status)
    except LlmctlError as exc:
        if exc.code in ("connection_lost", "not_running"):
            raise
        hint = " (/clear forgets the conversation)" if exc.code == "too_long" else ""
        print(f"\nllmctl: {exc.message} ({exc.code}){hint}", file=sys.stderr)
        return
    if answer is None:
        print("\n(cancelled; left out of the conversation)")
    else:
        print("\n" if answer.endswith("\n") else "\n\n", end="", flush=True)


def run(client: Client, model: str | None, system: str | None,
        fields: dict[str, Any]) -> int:
    """`llmctl chat`: interactive on a terminal, one question from a pipe."""
    models = client.models()
    names = [m["name"] for m in models]
    if model is not None and model not in names:
        raise LlmctlError("no_such_model", f"no model {model!r} (configured: "
                          f"{', '.join(names)})")
    chat = Chat(client, model or names[0], system, fields)
    if sys.stdin.isatty():
        return interactive(chat)
    question = sys.stdin.read()
    if not question.strip():
        print("llmctl: no question on standard input", file=sys.stderr)
        return 2
    answer = chat.ask(question, sys.stdout, None)
    if answer is None:
        return 130
    if answer and not answer.endswith("\n"):
        print(flush=True)
    return 0
