"""submit: queue a prompt for a model and stream its tokens back.

Access: any peer; the request belongs to the peer's uid.

Request: {"op": "submit", "prompt": "...", "model": "smollm2", "max_tokens": 64, ...}
Reply:   {"request": "r7", "model": "smollm2", "position": 0}  (accepted)
Then events with the same id: {"event": "token", "text": "..."} for each piece of text,
and exactly one of {"event": "done", "stats": {...}} or {"event": "error", "error": {...}}.
A request refused before acceptance gets an error reply and no events.
"""

from __future__ import annotations

from typing import Any

from ..protocol import ProtocolError
from . import Context, Op, Param, register

SAMPLING_DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05,
                     "repeat_penalty": 1.0, "seed": -1, "raw": False, "ignore_eos": False}


@register
class Submit(Op):
    name = "submit"
    params = {
        "prompt": Param(str, "the prompt text", required=True, min=1),
        "model": Param(str, "model name; default: the first configured model", max=200),
        "max_tokens": Param(int, "most tokens to generate; 1 to the model's n_ctx", min=1),
        "priority": Param(int, "higher runs first; FIFO within a priority", min=-1000, max=1000),
        "timeout": Param(float, "seconds from acceptance until the request fails with timeout",
                         min=0.001, max=86400),
        "temperature": Param(float, "sampling temperature; 0 is greedy", min=0, max=10),
        "top_p": Param(float, "nucleus sampling", min=0, max=1),
        "top_k": Param(int, "top-k sampling; 0 disables", min=0, max=100000),
        "min_p": Param(float, "min-p sampling", min=0, max=1),
        "repeat_penalty": Param(float, "repetition penalty; 1 disables", min=0, max=10),
        "seed": Param(int, "sampling seed; -1 keeps the worker's", min=-1, max=2**31 - 1),
        "raw": Param(bool, "send the prompt as is, without the model's chat template"),
        "ignore_eos": Param(bool, "keep generating past end-of-sequence (benchmarks)"),
    }

    def execute(self, ctx: Context, args: dict[str, Any]) -> None:
        service = ctx.service
        model = args.get("model") or next(iter(service.config.models))
        cfg = service.config.models.get(model)
        max_tokens = args.get("max_tokens", min(cfg.max_tokens, cfg.n_ctx) if cfg else 1)
        if cfg is not None and max_tokens > cfg.n_ctx:
            raise ProtocolError("bad_request", f"max_tokens must be at most {cfg.n_ctx}, "
                                f"the context of model {model!r}")
        params = {k: args.get(k, v) for k, v in SAMPLING_DEFAULTS.items()}
        params["max_tokens"] = max_tokens
        req, position = service.submit(model, args["prompt"], params, args.get("priority", 0),
                                       args.get("timeout"), ctx.uid, sink=None)
        ctx.send({"ok": True, "request": req.id, "model": model, "position": position})
        ctx.track(req)
        return None
