"""The worker process: owns one llama_cpp.Llama and serves generate commands one at a time.

Run by the daemon as `python -m llm_residentd.worker --fd N`. Fd N is a socketpair end
speaking the framed msgpack of protocol.py. Control messages (cancel, set_threads,
shutdown) are read between tokens and, during prompt evaluation, from llama.cpp's
abort callback, so a cancel takes effect within one token.
"""

from __future__ import annotations

import argparse
import codecs
import os
import random
import select
import signal
import socket
import sys
import time
from typing import Any

from .cpus import usable_cpus
from .protocol import recv_frame, send_frame

IPC_MAX_FRAME = 64 << 20
ABORT_POLL_S = 0.005


class Cancelled(Exception):
    """A stop asked for mid-request; stage is "prefill" or "decode"."""

    def __init__(self, stage: str, tokens: int) -> None:
        super().__init__(stage)
        self.stage = stage
        self.tokens = tokens


class Channel:
    """The socket to the daemon, with control messages that arrive mid-generation."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.cancelled: set[str] = set()
        self.threads_wanted: int | None = None
        self.shutdown = False
        self._pending: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        send_frame(self.sock, msg)

    def recv(self) -> dict[str, Any] | None:
        """Next command: held-back ones first, then a blocking read."""
        if self._pending:
            return self._pending.pop(0)
        return recv_frame(self.sock, IPC_MAX_FRAME)

    def poll(self) -> None:
        """Take in every control message that is waiting, without blocking."""
        while select.select([self.sock], [], [], 0)[0]:
            msg = recv_frame(self.sock, IPC_MAX_FRAME)
            if msg is None:
                self.shutdown = True
                return
            kind = msg.get("type")
            if kind == "cancel":
                self.cancelled.add(msg["req"])
            elif kind == "set_threads":
                self.threads_wanted = int(msg["n"])
            elif kind == "shutdown":
                self.shutdown = True
            else:
                self._pending.append(msg)

    def stop_asked(self, req: str) -> bool:
        return req in self.cancelled or self.shutdown


class Outbox:
    """Token text for the daemon, one frame per interval; the first token goes at once.

    Fewer frames leave more CPU to the model when its threads fill every core.
    """

    def __init__(self, ch: Channel, req: str, interval: float) -> None:
        self.ch, self.req, self.interval = ch, req, interval
        self.text, self.tokens, self.sent_at = "", 0, -interval

    def add(self, text: str) -> None:
        self.text += text
        self.tokens += 1
        if time.monotonic() - self.sent_at >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self.text:
            self.ch.send({"type": "token", "req": self.req, "text": self.text,
                          "tokens": self.tokens})
            self.text, self.tokens, self.sent_at = "", 0, time.monotonic()


class Engine:
    """One model in this process, generating with its own token loop."""

    def __init__(self, cfg: dict[str, Any], channel: Channel) -> None:
        import llama_cpp  # imported here so --help stays fast

        self.llama_cpp = llama_cpp
        self.channel = channel
        self.threads = cfg["threads"] or usable_cpus()
        self.llm = llama_cpp.Llama(
            model_path=cfg["path"], n_ctx=cfg["n_ctx"], n_batch=cfg["n_batch"],
            n_threads=self.threads, n_threads_batch=self.threads, verbose=False,
            seed=cfg["seed"] if cfg["seed"] >= 0 else llama_cpp.LLAMA_DEFAULT_SEED)
        # llama.cpp may round the context up; llama-cpp-python's buffers keep the asked size.
        self.n_ctx = min(self.llm.n_ctx(), cfg["n_ctx"])
        self.seed = cfg["seed"]
        self.stream_interval = cfg["stream_interval"]
        self.formatter = self._chat_formatter() if cfg["chat_template"] else None
        self._abort_req: str | None = None
        self._last_poll = 0.0
        self._abort_cb = llama_cpp.ggml_abort_callback(self._should_abort)

    def _chat_formatter(self) -> Any:
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        model = self.llm._model
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "")

    def tokens(self, prompt: str, raw: bool) -> list[int]:
        if self.formatter is not None and not raw:
            result = self.formatter(messages=[{"role": "user", "content": prompt}])
            return self.llm.tokenize(result.prompt.encode(), add_bos=not result.added_special,
                                     special=True)
        return self.llm.tokenize(prompt.encode(), add_bos=True, special=False)

    def set_threads(self, n: int) -> None:
        n = max(1, n)
        self.llama_cpp.llama_set_n_threads(self.llm.ctx, n, n)
        self.threads = n

    def _should_abort(self, _data: Any) -> bool:
        now = time.monotonic()
        if now - self._last_poll >= ABORT_POLL_S:
            self._last_poll = now
            self.channel.poll()
        return self._abort_req is not None and self.channel.stop_asked(self._abort_req)

    def _abort_during_eval(self, req: str | None) -> None:
        """Install the abort callback for prompt evaluation only; it costs time per node."""
        self._abort_req = req
        cb = self._abort_cb if req is not None else self.llama_cpp.ggml_abort_callback()
        self.llama_cpp.llama_set_abort_callback(self.llm.ctx, cb, None)

    def generate(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Stream tokens of one request to the daemon; return its stats."""
        req, ch = msg["req"], self.channel
        started = time.monotonic()
        prompt = self.tokens(msg["prompt"], msg.get("raw", False))
        if len(prompt) >= self.n_ctx:
            raise ValueError(f"too_long: the prompt is {len(prompt)} tokens; the context "
                             f"holds {self.n_ctx} and needs room for at least one more")
        max_tokens = min(msg["max_tokens"], self.n_ctx - len(prompt))
        # Seed every request: the request's, else the worker's, else a fresh one.
        seed = next((x for x in (msg.get("seed", -1), self.seed) if x >= 0), None)
        self.llm.set_seed(seed if seed is not None else random.randrange(2**31))
        vocab = self.llm._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = Outbox(ch, req, self.stream_interval)
        count, finish, first_at = 0, "length", None
        self._abort_during_eval(req)
        tokens = self.llm.generate(
            prompt, top_k=msg.get("top_k", 40), top_p=msg.get("top_p", 0.95),
            min_p=msg.get("min_p", 0.05), temp=msg.get("temperature", 0.8),
            repeat_penalty=msg.get("repeat_penalty", 1.0))
        try:
            for token in tokens:
                if first_at is None:
                    first_at = time.monotonic()
                    self._abort_during_eval(None)
                if self.llama_cpp.llama_vocab_is_eog(vocab, token) and not msg.get("ignore_eos"):
                    finish = "stop"
                    break
                count += 1
                out.add(decoder.decode(self.llm.detokenize([token])))
                if count >= max_tokens:
                    break
                ch.poll()
                if ch.threads_wanted is not None:
                    self.set_threads(ch.threads_wanted)
                    ch.send({"type": "threads", "n": self.threads})
                    ch.threads_wanted = None
                if ch.stop_asked(req):
                    raise Cancelled("decode", count)
        except RuntimeError:
            if not ch.stop_asked(req):
                raise
            self.llm.reset()  # the aborted decode left the context half-evaluated
            raise Cancelled("decode" if first_at else "prefill", count) from None
        finally:
            tokens.close()
            self._abort_during_eval(None)
        out.text += decoder.decode(b"", final=True)
        out.flush()
        done = time.monotonic()
        decode_s = done - first_at if first_at else 0.0
        return {
            "prompt_tokens": len(prompt), "completion_tokens": count, "finish_reason": finish,
            "prefill_s": (first_at or done) - started,
            "tokens_per_s": (count - 1) / decode_s if count > 1 and decode_s > 0 else None,
        }


def serve(ch: Channel, engine: Engine) -> None:
    while not ch.shutdown:
        msg = ch.recv()
        if msg is None:
            return
        kind = msg.get("type")
        if kind == "generate":
            req = msg["req"]
            ch.cancelled.clear()  # cancels of earlier requests that came too late
            try:
                stats = engine.generate(msg)
                ch.send({"type": "done", "req": req, "stats": stats})
            except Cancelled as stop:
                ch.send({"type": "done", "req": req, "stats": None, "cancelled": True,
                         "stage": stop.stage, "completion_tokens": stop.tokens})
            except ValueError as exc:
                code, _, text = str(exc).partition(": ")
                if code != "too_long":
                    code, text = "bad_request", str(exc)
                ch.send({"type": "error", "req": req, "code": code, "message": text})
            except Exception as exc:  # report, then keep serving
                ch.send({"type": "error", "req": req, "code": "internal",
                         "message": f"{type(exc).__name__}: {exc}"})
        elif kind == "set_threads":
            engine.set_threads(int(msg["n"]))
            ch.send({"type": "threads", "n": engine.threads})
        elif kind == "shutdown":
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-residentd-worker",
                                     description="llm-residentd model worker (started by the daemon)")
    parser.add_argument("--fd", type=int, required=True, help="socketpair fd to the daemon")
    parser.add_argument("--name", default="worker", help="worker name, for process listings")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when workers stop
    ch = Channel(socket.socket(fileno=args.fd))
    cfg = ch.recv()
    if cfg is None or cfg.get("type") != "load":
        return 2
    t0 = time.monotonic()
    try:
        engine = Engine(cfg, ch)
    except Exception as exc:
        ch.send({"type": "load_failed", "message": f"cannot load {cfg['path']}: {exc}"})
        return 1
    ch.send({"type": "ready", "pid": os.getpid(), "threads": engine.threads,
             "n_ctx": engine.n_ctx, "load_s": time.monotonic() - t0,
             "chat_template": engine.formatter is not None})
    serve(ch, engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
