#!/usr/bin/env python3
"""A minimal llm-residentd client written from docs/protocol.md alone (stdlib + msgpack).
Streams the answer to PROMPT on stdout, the done stats on stderr; exits 1 on any error."""

import argparse
import os
import socket
import struct
import sys

import msgpack


def default_socket() -> str:
    if os.geteuid() == 0:
        return "/run/llm-residentd/llm.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/llm-residentd-{os.geteuid()}"
    return os.path.join(runtime, "llm-residentd.sock")


def fail(error: dict) -> None:
    sys.exit(f"raw_client: {error['message']} ({error['code']})")


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        if not (chunk := sock.recv(n - len(buf))):
            fail({"code": "connection_lost", "message": "the daemon closed the connection"})
        buf += chunk
    return buf


def send(sock: socket.socket, msg: dict) -> None:
    body = msgpack.packb(msg, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(body)) + body)


def next_for(sock: socket.socket, msg_id: int) -> dict:
    while True:
        (length,) = struct.unpack(">I", recv_exactly(sock, 4))
        msg = msgpack.unpackb(recv_exactly(sock, length), raw=False)
        if msg.get("id") == msg_id:
            return msg
        if msg.get("id") is None and msg.get("ok") is False:  # connection-level error
            fail(msg["error"])


def main() -> int:
    ap = argparse.ArgumentParser(description="Submit PROMPT to llm-residentd, stream the answer.")
    ap.add_argument("prompt")
    ap.add_argument("--socket", default=os.environ.get("LLM_RESIDENTD_SOCKET") or default_socket())
    ap.add_argument("--model")
    ap.add_argument("--max-tokens", type=int)
    args = ap.parse_args()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args.socket)
    except OSError as exc:  # ENOENT, ECONNREFUSED: not running; EACCES: not allowed
        fail({"code": "not_running", "message": f"cannot connect to {args.socket}: {exc}"})
    submit = {"id": 2, "op": "submit", "prompt": args.prompt, "model": args.model,
              "max_tokens": args.max_tokens}
    for msg in ({"id": 1, "op": "hello", "protocol": 1, "client": "raw_client/1"},
                {k: v for k, v in submit.items() if v is not None}):  # omit, never send nil
        send(sock, msg)
        if not (reply := next_for(sock, msg["id"]))["ok"]:
            fail(reply["error"])  # refused: for submit, no events follow
    print(f"[{reply['request']} accepted for {reply['model']}]", file=sys.stderr)
    while (event := next_for(sock, 2))["event"] == "token":
        print(event["text"], end="", flush=True)
    print()
    if event["event"] == "error":
        fail(event["error"])
    print(f"[done: {event['stats']}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
