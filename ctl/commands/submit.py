"""llmctl submit: generate from a prompt, streaming the text to stdout. Its options are
the submit op's fields, from the op's Param declarations (chat takes them too)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

from llm_residentd.front.ops import Param
from llm_residentd.front.ops.submit import SAMPLING_DEFAULTS, Submit

from ..client import Client, LlmctlError
from ..output import emit_json, error_json, tty
from ..progress import StatusLine, events_with_status, stop_notice
from . import EXIT_INTERRUPTED, EXIT_OK, Command, exit_code
from .params import Append, bounds, file_type, param_type

# What the submit op's Params cannot say: the short aliases, metavars and defaults that
# depend on the daemon's config.
SUBMIT_EXTRAS: dict[str, tuple[list[str], str, str]] = {
    "model": (["-m"], "MODEL", ""),
    "max_tokens": (["-n"], "N", "default: the model's max_tokens, 256 unless configured; "
                   "on a terminal, llmctl says when an answer stopped there"),
    "priority": (["-p"], "P", "default 0"),
    "timeout": (["-t"], "S", "exit 4 when it passes"),
    "keep_alive": ([], "DURATION", "default: the model's keep_alive"),
    "adapter": ([], "NAME", "llmctl models lists each model's adapters"),
    "adapter_scale": ([], "X", ""),
}


def _add_special(parser: argparse.ArgumentParser, name: str, param: Param) -> None:
    """The submit fields that are no single value on the command line."""
    if name == "messages":  # the positional PROMPT is the user message
        parser.add_argument("--system", dest=name, metavar="TEXT", help="a system prompt: "
                            "the request is then messages [system TEXT, user PROMPT] in the "
                            "model's chat template (not with --raw)")
    elif name == "stop":
        item = param.items or Param(str, help=name)
        parser.add_argument("--stop", dest=name, metavar="STR", action=Append, param=param,
                            type=param_type(name, item), help=f"{param.help}; repeat for "
                            f"more, at most {param.max:g}, each {item.min:g}..{item.max:g} "
                            "characters")
    else:  # json_schema, grammar: a file
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, dest=name, metavar="FILE", help=f"{param.help}; read from "
                            "FILE" + (" (JSON)" if param.kind is dict else ""),
                            type=file_type(name, param, as_json=param.kind is dict))


def add_submit_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One option per field of the submit op, from its Param declarations, so that the CLI
    offers exactly what the daemon takes."""
    for name, param in Submit.params.items():
        if name == "prompt" or name in skip:
            continue
        if param.kind in (list, dict) or name == "grammar":
            _add_special(parser, name, param)
            continue
        aliases, metavar, extra = SUBMIT_EXTRAS.get(name, ([], name.split("_")[-1].upper(), ""))
        default = SAMPLING_DEFAULTS.get(name)
        notes = [bounds(param), extra,
                 f"default {default}" if param.kind is not bool and default is not None else ""]
        text = "; ".join(n for n in [param.help, *notes] if n).replace("%", "%%")
        flags = [*aliases, f"--{name.replace('_', '-')}"]
        if param.kind is bool:
            parser.add_argument(*flags, dest=name, action="store_true", help=text)
        else:
            parser.add_argument(*flags, dest=name, type=param_type(name, param),
                                metavar=metavar, help=text)


def submit_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The submit op's fields from the options (each one is an op Param, see
    add_submit_options), but the text: prompt_fields says how the prompt goes."""
    values = {name: getattr(args, name, None) for name in Submit.params
              if name not in ("prompt", "messages")}
    # `is`, not `in`: 0 == False, and --temperature 0 is a value (greedy), not an absence
    return {k: v for k, v in values.items() if v is not None and v is not False}


def prompt_fields(prompt: str, system: str | None) -> dict[str, Any]:
    """The prompt, or with a system prompt the conversation [system, user]."""
    if system is None:
        return {"prompt": prompt}
    return {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": prompt}]}


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    stream = client.submit(**prompt_fields(prompt, args.messages), **submit_fields(args))
    accepted_at = time.monotonic()
    if args.json:
        emit_json({"event": "accepted", "request": stream.request, "model": stream.model,
                   "position": stream.position})
    elif args.verbose:
        print(f"request {stream.request} accepted for {stream.model}, "
              f"{stream.position} ahead in the queue", file=sys.stderr)
    error = None
    line = StatusLine(sys.stderr) if tty(args) else None
    try:
        for event in events_with_status(client, stream, line, accepted_at):
            if args.json:
                out = {k: v for k, v in event.items() if k != "id"}
                emit_json({**out, "ok": False} if event["event"] == "error" else out)
            elif event["event"] == "token":
                sys.stdout.write(event["text"])
                sys.stdout.flush()
                stream.client_printed = True
            if event["event"] == "error":
                error = LlmctlError(event["error"]["code"], event["error"]["message"])
    except KeyboardInterrupt:
        with contextlib.suppress(LlmctlError):
            stream.cancel()
        if args.json:
            emit_json(error_json("interrupted", "interrupted; request cancelled",
                                 event="error"))
        else:
            print("\nllmctl: interrupted; request cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if not args.json and (stream.stats or error) and stream.client_printed:
            print(flush=True)
    if error is not None:
        if args.json:  # the error event was the JSON
            return exit_code(error.code)
        raise error
    if stream.stats and args.verbose and not args.json:
        s = stream.stats
        tps = f"{s['tokens_per_s']:.1f}" if s.get("tokens_per_s") else "-"
        print(f"[{s['prompt_tokens']} prompt + {s['completion_tokens']} tokens, "
              f"TTFT {s['ttft_s'] * 1000:.0f} ms, total {s['total_s']:.2f} s, {tps} tok/s, "
              f"{s['finish_reason']}]", file=sys.stderr)
    if tty(args):
        notice = stop_notice(client, stream, args.max_tokens)
        if notice:
            print(notice, file=sys.stderr)
    return EXIT_OK


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    add_submit_options(parser)
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="print the request id and the stats on stderr")


COMMAND = Command(
    "submit", help="generate from a prompt, streaming the text to stdout",
    description="Generate from PROMPT and stream the text to stdout. With --json, print "
    "one JSON object per event (accepted, token, done, error). On a terminal, a line on "
    "stderr says where the request waits (queue position, model loading) until the text "
    "starts.", run=cmd_submit, arguments=_arguments, raw=True, epilog=True)
