"""submit: queue a prompt for a model and stream its tokens back.

Access: any peer; the request belongs to the peer's uid.

Request: {"op": "submit", "prompt": "...", "model": "smollm2", "max_tokens": 64, ...}
     or: {"op": "submit", "messages": [{"role": "user", "content": "..."}], ...}
Reply:   {"request": "r7", "model": "smollm2", "position": 0}  (accepted)
Then events with the same id: {"event": "token", "text": "..."} for each piece of text,
and exactly one of {"event": "done", "stats": {...}} or {"event": "error", "error": {...}}.
A request refused before acceptance gets an error reply and no events.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ...catalog.config import ADAPTER_NAME_MAX
from ...core.requests import Request, Sink
from ...wire.durations import parse_keep_alive
from ...wire.messages import RequestParams, defaults
from ...wire.protocol import ProtocolError
from ...wire.schema import Shown
from .. import views
from .base import Context, Op, Param, register

if TYPE_CHECKING:
    from ...core.service import Service

# What section 5.2 of docs/protocol.md and llmctl's help show as the defaults.
SAMPLING_DEFAULTS = defaults("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed",
                             "raw", "ignore_eos")
MAX_ADAPTER_SCALE = 4.0  # llama.cpp takes any scale; past a few the adapter swamps the model
ROLES = ("system", "user", "assistant")
MAX_STOPS, MAX_STOP_CHARS = 8, 200
# Schema-to-grammar conversion recurses once per level (in the worker); real schemas nest
# a handful of levels.
MAX_SCHEMA_DEPTH = 64


def _message(msg: dict[str, Any]) -> None:
    """One chat message: exactly a role and a string content."""
    extra = sorted(set(msg) - {"role", "content"})
    if extra:
        raise ValueError(f"a message has only role and content, not {', '.join(extra)}")
    if msg.get("role") not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {Shown(msg.get('role'))!r}")
    if not isinstance(msg.get("content"), str):
        raise ValueError("content must be a string")


def _conversation(messages: list[dict[str, Any]]) -> None:
    """A conversation the model can answer: a user message in it, and the last message
    from the user (the answer follows) or the assistant (the answer continues its text)."""
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("there must be a user message")
    if messages[-1]["role"] == "system":
        raise ValueError("the last message must be from user or assistant, not system")


def _json_value(schema: dict[str, Any]) -> None:
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
    try:
        json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a JSON value ({exc})") from None


def _depth(value: Any) -> int:
    """How deeply arrays and maps nest in value (iterative: the stack is what's at stake)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((inner, depth + 1) for inner in
                         (item.values() if isinstance(item, dict) else item))
    return deepest


@register
class Submit(Op):
    name = "submit"
    params = {
        "prompt": Param(str, help="the prompt text; exactly one of prompt and messages", min=1),
        "messages": Param(list, help="the conversation, rendered with the model's chat template: "
                          "maps {role: system, user or assistant, content: string}; the "
                          "last is user, or assistant to continue its text", min=1,
                          items=Param(dict, help="a message", valid=_message), valid=_conversation),
        "model": Param(str, help="model name; default: the first configured model", max=200),
        "max_tokens": Param(int, help="most tokens to generate; 1 to the model's n_ctx", min=1),
        "priority": Param(int, help="higher runs first; FIFO within a priority", min=-1000, max=1000),
        "timeout": Param(float, help="seconds from acceptance until the request fails with timeout",
                         min=0.001, max=86400),
        "temperature": Param(float, help="sampling temperature; 0 is greedy", min=0, max=10),
        "top_p": Param(float, help="nucleus sampling", min=0, max=1),
        "top_k": Param(int, help="top-k sampling; 0 disables", min=0, max=100000),
        "min_p": Param(float, help="min-p sampling", min=0, max=1),
        "repeat_penalty": Param(float, help="repetition penalty; 1 disables", min=0, max=10),
        "seed": Param(int, help="sampling seed; -1 keeps the worker's", min=-1, max=2**31 - 1),
        "raw": Param(bool, help="send the prompt as is, without the model's chat template"),
        "ignore_eos": Param(bool, help="keep generating past end-of-sequence (benchmarks)"),
        "stop": Param(list, help="stop when the text contains one of these; it is not returned",
                      max=MAX_STOPS, items=Param(str, help="a stop string", min=1,
                                                 max=MAX_STOP_CHARS)),
        "json_schema": Param(dict, help="constrain the text to JSON matching this JSON Schema; "
                             "{} is any JSON value", valid=_json_value),
        "grammar": Param(str, help="constrain the text to this GBNF grammar (llama.cpp)", min=1),
        "adapter": Param(str, help="a LoRA adapter of the model (models.NAME.adapters), applied "
                         "to this request only", min=1, max=ADAPTER_NAME_MAX),
        "adapter_scale": Param(float, help="how strongly the adapter applies; 0 is the base "
                               "model; default 1 (with adapter only)", min=0,
                               max=MAX_ADAPTER_SCALE),
        "keep_alive": Param(str, help="how long the model stays loaded after this request: 30s, "
                            "5m, 1h, 0 (unload when done), -1 (forever); it holds until the "
                            "model unloads", max=32, valid=parse_keep_alive),
    }

    def execute(self, ctx: Context, args: dict[str, Any]) -> None:
        req, position = accept(ctx.service, args, ctx.uid, sink=None)
        ctx.send({"ok": True, "request": req.id, "model": req.model, "position": position})
        ctx.track(req)
        return None


def check_combination(args: dict[str, Any]) -> None:
    """What the fields cannot be together; raises bad_request."""
    if ("prompt" in args) == ("messages" in args):
        raise ProtocolError("bad_request", "submit needs exactly one of 'prompt' and "
                            "'messages'", param="prompt")
    if "messages" in args and args.get("raw"):
        raise ProtocolError("bad_request", "raw applies to a prompt: messages are always "
                            "rendered with the model's chat template", param="raw")
    if "json_schema" in args and "grammar" in args:
        raise ProtocolError("bad_request", "give json_schema or grammar, not both",
                            param="json_schema")
    if args.get("ignore_eos") and ("json_schema" in args or "grammar" in args):
        raise ProtocolError("bad_request", "ignore_eos cannot go with json_schema or grammar: "
                            "a complete answer ends with end-of-sequence", param="ignore_eos")
    if "adapter_scale" in args and "adapter" not in args:
        raise ProtocolError("bad_request", "adapter_scale needs adapter", param="adapter_scale")


def check_adapter(service: Service, model: str, adapters: dict[str, str], name: str) -> None:
    """A request's adapter must be one the model lists, and not one its workers failed to
    load (a worker not loaded yet refuses the request itself, with the same reason)."""
    if name not in adapters:
        known = ", ".join(sorted(adapters)) if adapters else "none"
        raise ProtocolError("bad_request", f"model {model!r} has no adapter {name!r} "
                            f"(its adapters: {known})", param="adapter")
    found = service.models.get(model)
    why = views.adapter_error(found.workers if found else [], name)
    if why:
        raise ProtocolError("bad_request", f"adapter {name!r} of model {model!r} failed to "
                            f"load: {why}", param="adapter")


def accept(service: Service, args: dict[str, Any], uid: int, sink: Sink | None,
           ) -> tuple[Request, int]:
    """Queue a submit whose fields ops.validate() checked; returns the request and its
    queue position. Every front end (this op, HTTP) goes through here."""
    check_combination(args)
    model = args.get("model") or next(iter(service.config.models))
    cfg = service.config.models.get(model)
    max_tokens = args.get("max_tokens", min(cfg.max_tokens, cfg.n_ctx) if cfg else 1)
    if cfg is not None and max_tokens > cfg.n_ctx:
        raise ProtocolError("bad_request", f"max_tokens must be at most {cfg.n_ctx}, "
                            f"the context of model {model!r}", param="max_tokens")
    if cfg is not None and "adapter" in args:
        check_adapter(service, model, cfg.adapters, args["adapter"])
    given = {k: v for k, v in args.items() if k in RequestParams.__struct_fields__}
    params = RequestParams(**{**given, "max_tokens": max_tokens})
    return service.submit(model, params, args.get("priority", 0), args.get("timeout"), uid,
                          sink=sink, keep_alive=args.get("keep_alive"))
