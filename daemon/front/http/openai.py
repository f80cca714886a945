"""OpenAI request and response shapes, to and from the submit op's fields.

Requests: the fields we serve map onto the submit op's (docs/http.md has the table);
unknown fields are ignored, as llama-server and the SDKs' extra fields expect, but a
known field asking for what we cannot do (n > 1, logprobs, tools, ...) is refused, so
that no client silently gets less than it asked for. Values are not checked here: the
submit op's Params check them, the same as on the msgpack socket.
"""

from __future__ import annotations

import time
from typing import Any

from ...wire.events import Failure
from ...wire.protocol import ProtocolError
from ...wire.schema import Shown

# Fields that would change the answer in ways we do not serve, with what is accepted.
_UNSUPPORTED = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, None),
    "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "suffix": (None, ""), "logit_bias": (None, {}),
}
# OpenAI name -> submit op name, for fields passed through unchanged.
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "seed": "seed",
             "top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repeat_penalty",
             "ignore_eos": "ignore_eos", "priority": "priority", "timeout": "timeout",
             "model": "model", "adapter": "adapter", "adapter_scale": "adapter_scale"}
_ROLES = {"developer": "system"}  # OpenAI's newer name for the system role
# Submit op fields whose body field has another name: an error's param names the body's.
FIELDS = {"json_schema": "response_format"}


def bad(message: str, param: str | None) -> ProtocolError:
    """bad_request about the body's field param (None: the body as a whole)."""
    return ProtocolError("bad_request", message, param)


def _check_unsupported(body: dict[str, Any]) -> None:
    for key, allowed in _UNSUPPORTED.items():
        if key in body and body[key] not in allowed:
            raise bad(f"{key}={Shown(body[key])!r} is not supported by llm-residentd", key)


def _common(body: dict[str, Any], priority_header: str | None) -> dict[str, Any]:
    """The submit fields that chat and completions share."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None)
    _check_unsupported(body)
    msg: dict[str, Any] = {"op": "submit"}
    for ours, theirs in _SAMPLING.items():
        if body.get(ours) is not None:  # null means "not given", as in the OpenAI API
            msg[theirs] = body[ours]
    if "priority" not in msg and priority_header is not None:
        try:
            msg["priority"] = int(priority_header)
        except ValueError:
            raise bad(f"X-Priority must be an integer, not {priority_header!r}", None) from None
    for key in ("max_completion_tokens", "max_tokens"):  # the newer name wins
        if body.get(key) is not None:
            msg["max_tokens"] = body[key]
            break
    keep_alive = body.get("keep_alive")  # ollama's field: a duration or seconds
    if keep_alive is not None:
        number = isinstance(keep_alive, int | float) and not isinstance(keep_alive, bool)
        msg["keep_alive"] = str(keep_alive) if number else keep_alive
    stop = body.get("stop")
    if stop is not None:
        msg["stop"] = [stop] if isinstance(stop, str) else stop
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad("stream_options must be an object", "stream_options")
    if not isinstance(body.get("stream", False), bool):
        raise bad("stream must be a boolean", "stream")
    return msg


def _content(i: int, content: Any) -> Any:
    """A message's content: a string, or text parts joined (other parts are refused)."""
    if not isinstance(content, list):
        return content  # the op checks that it is a string
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise bad(f"messages[{i}].content: only text parts are supported", "messages")
        texts.append(part.get("text"))
    if not all(isinstance(t, str) for t in texts):
        raise bad(f"messages[{i}].content: a text part needs a string \"text\"", "messages")
    return "".join(texts)


def chat_submit(body: Any, priority_header: str | None = None) -> dict[str, Any]:
    """A /v1/chat/completions body as a submit op message (messages, stop, json_schema)."""
    msg = _common(body, priority_header)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad("messages must be an array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with role and content", "messages")
        role = m.get("role")  # the op checks it; a list or an object cannot be a dict key
        role = _ROLES.get(role, role) if isinstance(role, str) else role
        out.append({"role": role, "content": _content(i, m.get("content"))})
    msg["messages"] = out
    fmt = body.get("response_format")
    if fmt is not None:
        msg.update(_response_format(fmt))
    return msg


def _response_format(fmt: Any) -> dict[str, Any]:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {}}  # any JSON value
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad("response_format.json_schema must be an object with a \"schema\"",
                      "response_format")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema must be an object", "response_format")
        return {"json_schema": schema}
    raise bad("response_format.type must be \"text\", \"json_object\" or \"json_schema\"",
              "response_format")


def completion_submit(body: Any, priority_header: str | None = None) -> dict[str, Any]:
    """A /v1/completions body as a submit op message: the prompt as is (raw)."""
    msg = _common(body, priority_header)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the SDKs may send one prompt as a list
    elif isinstance(prompt, list):
        raise bad("prompt: one prompt per request (a string)", "prompt")
    if prompt is None:
        raise bad("prompt is required", "prompt")
    msg["prompt"] = prompt
    msg["raw"] = True
    return msg


def usage(stats: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage; cached_tokens (prompt tokens whose KV a cache held) where OpenAI
    reports it."""
    p, c = stats["prompt_tokens"], stats["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": stats.get("cached_tokens", 0)}}


class Shape:
    """The reply objects of one request, chat or text completion."""

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())

    def _base(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": f"{kind}.chunk" if chunk and self.chat else kind,
                "created": self.created, "model": self.model}

    def param(self, error: Failure) -> str | None:
        """The body field a failed request's error is about: the worker names it, and a
        prompt too long for the context is the body's messages or prompt."""
        if error.param is None and error.code == "too_long":
            return "messages" if self.chat else "prompt"
        return error.param

    def reply(self, text: str, stats: dict[str, Any]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": stats["finish_reason"],
                                  "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._base(False), "choices": [choice], "usage": usage(stats)}

    def chunk(self, text: str | None, finish_reason: str | None = None,
              first: bool = False, tokens: int | None = None) -> dict[str, Any]:
        """One streamed chunk; `tokens` (an extension, like llama-server's own fields) counts
        the tokens its text holds: the daemon gathers a stream_interval's tokens in one."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        counted = {} if tokens is None else {"tokens": tokens}
        return {**self._base(True), "choices": [choice], **counted}

    def usage_chunk(self, stats: dict[str, Any]) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": usage(stats)}
