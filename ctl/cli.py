"""llmctl: the command line of llm-residentd."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any

from llm_residentd import __version__
from llm_residentd.front.ops import Param, check_field
from llm_residentd.front.ops.load import LOAD_WAIT_S, Load
from llm_residentd.front.ops.submit import SAMPLING_DEFAULTS, Submit
from llm_residentd.paths import SOCKET_ENV
from llm_residentd.wire.protocol import ProtocolError

from . import chat, completion
from .client import Client, LlmctlError
from .progress import StatusLine, events_with_status, stop_notice

# Exit codes, documented in --help and docs/llmctl.md.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_TIMEOUT = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130

EPILOG = f"""\
environment:
  {SOCKET_ENV}  socket path (overridden by --socket)

exit status:
  0    success
  1    the daemon refused or failed the request (the message names its error code)
  2    usage error (nothing is sent to the daemon)
  3    the daemon is not running or the socket cannot be reached
  4    timed out (the request's --timeout, or no answer from the daemon)
  130  interrupted; a running request was cancelled

With --json, every command prints JSON on stdout, errors too: one object
{{"ok": false, "error": {{"code": ..., "message": ...}}}} (usage errors: code "usage");
the exit status is the same as without --json.
"""


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


def _fmt_count(n: int | None) -> str:
    """12, 7.3k, 1.2M: a counter that grows without bound, in a few characters."""
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _fmt_pair(w: dict[str, Any], first: str, second: str) -> str:
    """"3/7.3k" from two counters of a worker's status entry; "-" without a process."""
    if w.get(first) is None and w.get(second) is None:
        return "-"
    return f"{_fmt_count(w.get(first))}/{_fmt_count(w.get(second))}"


def _fmt_ms(summary: dict[str, float | None]) -> str:
    vals = [summary.get(k) for k in ("p50", "p95", "p99")]
    return "/".join("-" if v is None else f"{v * 1000:.0f}" for v in vals)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[("-" if c is None else str(c)) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def _emit_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


def _error_json(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}, **extra}


def _tty(args: argparse.Namespace) -> bool:
    """Whether stderr may carry notes meant for a person: not with --json, not to a pipe."""
    return not args.json and sys.stderr.isatty()


# -- commands -----------------------------------------------------------------------------

def submit_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The submit op's fields from the options (each one is an op Param, see build_parser),
    but the text: prompt_fields says how the prompt goes."""
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
        _emit_json({"event": "accepted", "request": stream.request, "model": stream.model,
                    "position": stream.position})
    elif args.verbose:
        print(f"request {stream.request} accepted for {stream.model}, "
              f"{stream.position} ahead in the queue", file=sys.stderr)
    error = None
    line = StatusLine(sys.stderr) if _tty(args) else None
    try:
        for event in events_with_status(client, stream, line, accepted_at):
            if args.json:
                out = {k: v for k, v in event.items() if k != "id"}
                _emit_json({**out, "ok": False} if event["event"] == "error" else out)
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
            _emit_json(_error_json("interrupted", "interrupted; request cancelled",
                                   event="error"))
        else:
            print("\nllmctl: interrupted; request cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if not args.json and (stream.stats or error) and stream.client_printed:
            print(flush=True)
    if error is not None:
        if args.json:
            return EXIT_FOR_CODE.get(error.code, EXIT_FAILED)
        raise error
    if stream.stats and args.verbose and not args.json:
        s = stream.stats
        tps = f"{s['tokens_per_s']:.1f}" if s.get("tokens_per_s") else "-"
        print(f"[{s['prompt_tokens']} prompt + {s['completion_tokens']} tokens, "
              f"TTFT {s['ttft_s'] * 1000:.0f} ms, total {s['total_s']:.2f} s, {tps} tok/s, "
              f"{s['finish_reason']}]", file=sys.stderr)
    if _tty(args):
        notice = stop_notice(client, stream, args.max_tokens)
        if notice:
            print(notice, file=sys.stderr)
    return EXIT_OK


def cmd_chat(client: Client, args: argparse.Namespace) -> int:
    fields = {k: v for k, v in submit_fields(args).items() if k != "model"}
    return chat.run(client, args.model, args.messages, fields)


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    st = client.status()
    if args.json:
        _emit_json(st)
        return EXIT_OK
    d = st["daemon"]
    print(f"llm-residentd {d['version']}  pid {d['pid']}  up {d['uptime_s']:.0f}s  "
          f"backend {d['backend']}  config {d['config']}  socket {d['socket']}")
    if d.get("reload"):
        print(_fmt_reload(d["reload"]))
    print()
    print(_table(
        ["WORKER", "MODEL", "PID", "STATE", "THREADS", "RSS", "CPU%", "FAULTS maj/min",
         "CTXSW vol/invol", "SERVED", "RESTARTS", "SLOTS busy/free", "BATCH",
         "REQUESTS:KV cells"],
        [[w["name"], w["model"], w["pid"], w["state"], _fmt_threads(w),
          _fmt_bytes(w["rss_bytes"]),
          "-" if w.get("cpu_percent") is None else f"{w['cpu_percent']:.0f}",
          _fmt_pair(w, "major_faults", "minor_faults"),
          _fmt_pair(w, "ctx_switches_voluntary", "ctx_switches_involuntary"),
          w["served"], w["restarts"], _fmt_slots(w),
          "-" if (w.get("batch") or {}).get("size") is None else f"{w['batch']['size']:.2f}",
          " ".join(f"{r['id']}:{'-' if r['kv_cells'] is None else r['kv_cells']}"
                   for r in w.get("requests") or ()) or None]
         for w in st["workers"]]))
    print()
    rows, failures = [], []
    for name, m in st["models"].items():
        counts = outcome_counts(m["outcomes"])
        rows.append([name, m["state"], f"{m['queue_depth']}/{m['max_queue']}", m["running"],
                     *counts.values(), _fmt_ms(m["ttft_s"]), _fmt_ms(m["latency_s"]),
                     "-" if m["tokens_per_s"]["p50"] is None else f"{m['tokens_per_s']['p50']:.1f}"])
        failed = {k: v for k, v in sorted(m["outcomes"].items()) if k not in OUTCOME_COLUMNS}
        if failed:
            failures.append(f"{name} failed: " + ", ".join(f"{k} {v}" for k, v in failed.items()))
    print(_table(["MODEL", "STATE", "QUEUE", "RUNNING", *(c.upper() for c in counts),
                  "TTFT ms p50/95/99", "LATENCY ms p50/95/99", "TOK/S p50"], rows))
    if failures:
        print("\n".join(failures))
    scoped = [w for w in st["workers"] if w.get("cgroup")]
    if scoped:
        print()
        print(_table(["WORKER", "UNIT", "CPU.MAX", "MEM.HIGH", "MEM.MAX", "MEM.CURRENT",
                      "THROTTLED", "HIGH/MAX/OOM", "PSI CPU/MEM some10", "EVENTS"],
                     [_scope_row(w) for w in scoped]))
    pressure = st.get("pressure", {})
    lines = [label + "  ".join(f"{r} {v['some']['avg10']:.2f}%" for r, v in values.items() if v)
             for label, values in (("system PSI some avg10: ", pressure.get("system") or {}),
                                   ("outside the workers' cgroups: ", pressure.get("outside") or {}))
             if any(values.values())]
    cpu = st.get("cpu")
    if cpu and cpu.get("view"):
        v = cpu["view"]
        how = ("read on PSI triggers and every {period_s:g} s" if cpu["mode"] == "psi-trigger"
               else "polled every {period_s:g} s: {why_polling}").format(**cpu)
        lines.append(f"CPU load: {v['others_running']:.2f} other runnable tasks, "
                     f"{v['idle']:.2f} of {v['cpus']} CPUs idle ({how})")
    if lines:
        print("\n" + "\n".join(lines))
    threads = [f"{w['name']}: {w['threads']} threads, {w['threads_why']}"
               for w in st["workers"] if w.get("threads_why")]
    if threads:
        print("\n" + "\n".join(threads))
    for w in st["workers"]:
        for key in ("last_error", "scope_error"):
            if w.get(key):
                print(f"\n{w['name']}: {w[key]}")
    return EXIT_OK


def _fmt_reload(r: dict[str, Any]) -> str:
    """The last reload (SIGHUP): when, its result, and what changed or why it was refused."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
    what = [f"{k} {', '.join(r[k])}" for k in ("added", "removed", "changed", "needs_restart")
            if r.get(k)]
    detail = "; ".join([*what, *([r["error"]] if r.get("error") else [])])
    return f"last reload {when}: {r['result']}" + (f" ({detail})" if detail else "")


# How a finished request ended, by the outcome codes the daemon counts (its status op's
# "outcomes"): every code not named here is a failure.
OUTCOME_COLUMNS = {"completed": "done", "cancelled": "cancelled", "timeout": "timeout",
                   "deferred_timeout": "timeout"}


def outcome_counts(outcomes: dict[str, int]) -> dict[str, int]:
    """done, cancelled, timeout (also while deferred by a policy) and failed (the rest)."""
    counts = {"done": 0, "cancelled": 0, "timeout": 0, "failed": 0}
    for code, n in outcomes.items():
        counts[OUTCOME_COLUMNS.get(code, "failed")] += n
    return counts


def _fmt_slots(w: dict[str, Any]) -> str:
    """"3/1": running requests and slots still free (within a policy's batch limit, which
    follows as "max 2" when it holds the worker below its slots); "-" before it loads."""
    slots, busy = w.get("slots") or 0, w.get("slots_busy", 0)
    if not slots:
        return "-"
    limit = min(slots, w.get("batch_limit") or slots)
    return f"{busy}/{max(0, limit - busy)}" + (f" max {limit}" if limit < slots else "")


def _fmt_threads(w: dict[str, Any]) -> str:
    """The count and, in a word, what set it: affinity, quota, contention or config."""
    why = (w.get("threads_why") or "").split(":", 1)[0]
    asked = f"->{w['threads_asked']}" if w.get("threads_asked") else ""
    return f"{w['threads']}{asked} {why}".strip()


def _scope_row(w: dict[str, Any]) -> list[Any]:
    cg = w["cgroup"]
    stat, events, pressure = cg.get("cpu.stat") or {}, cg.get("memory.events") or {}, cg["pressure"]

    def some10(resource: str) -> str:
        p = pressure.get(resource)
        return "-" if not p else f"{p['some']['avg10']:.1f}"
    return [w["name"], w["unit"], cg["cpu.max"], cg["memory.high"], cg["memory.max"],
            _fmt_bytes(cg["memory.current"]),
            f"{stat.get('nr_throttled', 0)}x {stat.get('throttled_usec', 0) / 1e6:.1f}s",
            f"{events.get('high', 0)}/{events.get('max', 0)}/{events.get('oom_kill', 0)}",
            f"{some10('cpu')}/{some10('memory')}", w["pressure_events"]]


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    if args.action == "add":
        return _models_add(client, args)
    if args.action == "remove":
        return _models_remove(client, args)
    models = client.models()
    if args.json:
        _emit_json(models)
        return EXIT_OK
    print(_table(["MODEL", "STATE", "WORKERS", "N_CTX", "SOURCE"],
                 [[m["name"], m["state"], m["workers"], m["n_ctx"], m["source"]] for m in models]))
    for m in models:
        if m["error"]:
            print(f"\n{m['name']}: {m['error']}")
        for name, adapter in m.get("adapters", {}).items():  # an older daemon has none
            state = f"failed: {adapter['error']}" if adapter["error"] else adapter["path"]
            print(f"{m['name']} adapter {name}: {state}")
    return EXIT_OK


def _ps_row(m: dict[str, Any]) -> list[Any]:
    if m["state"] != "ready":
        until = m["waiting"] or m["state"]
    elif m["unload_in_s"] is None:
        until = "forever" if m["keep_alive_s"] is None else f"busy (then {m['keep_alive']})"
    else:
        until = f"in {m['unload_in_s']:.0f} s"
    return [m["name"], m["state"], _fmt_bytes(m["memory_bytes"]),
            f"{m['slots_busy']}/{m['slots']}", m["keep_alive"], until]


def cmd_ps(client: Client, args: argparse.Namespace) -> int:
    models = client.call("ps")["models"]
    if args.json:
        _emit_json({"models": models})
        return EXIT_OK
    print(_table(["NAME", "STATE", "MEMORY", "SLOTS", "KEEP_ALIVE", "UNLOADS"],
                 [_ps_row(m) for m in models]))
    return EXIT_OK


def cmd_load(client: Client, args: argparse.Namespace) -> int:
    fields = {k: v for k, v in (("keep_alive", args.keep_alive), ("timeout", args.timeout))
              if v is not None}
    client.timeout = (args.timeout or LOAD_WAIT_S) + 10  # the daemon answers once it loaded
    reply = client.call("load", model=args.model, **fields)
    if args.json:
        _emit_json(reply)
    else:
        print(f"{reply['name']} loaded: {_fmt_bytes(reply['memory_bytes'])}, keep_alive "
              f"{reply['keep_alive']}")
    return EXIT_OK


def cmd_unload(client: Client, args: argparse.Namespace) -> int:
    client.timeout = None  # the daemon answers once the running requests are done
    reply = client.call("unload", model=args.model, force=args.force)
    if args.json:
        _emit_json(reply)
    else:
        print(f"{reply['model']} unloaded")
    return EXIT_OK


# `models add` options that are model keys of their own (the rest go through --set).
MODEL_OPTIONS = {
    "n_ctx": ("N", "context tokens of one request"),
    "parallel": ("N", "requests one worker decodes together"),
    "workers": ("N", "worker processes"),
    "threads": ("N", "threads per worker; 0 follows the CPUs"),
    "keep_alive": ("D", "how long it stays loaded while idle: 5m, 30s, 0, -1"),
    "load": ("WHEN", "auto, at_start or on_demand"),
}
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def model_option(text: str) -> tuple[str, Any]:
    """argparse type of --set KEY=VALUE: VALUE as the type of the [models.NAME] key (an
    unknown key is sent as text: the daemon's answer names the keys it knows)."""
    from llm_residentd.core.config import ModelConfig

    key, value = _key_value(text)
    kind = {f.name: f.type for f in dataclasses.fields(ModelConfig)}.get(key, "str")
    try:
        if kind == "bool":
            return key, _BOOLS[value.lower()]
        return key, {"int": int, "float": float}.get(kind, str)(value)
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not {kind}") from None


class _ModelOption(argparse.Action):
    """`models add` options into one map of [models.NAME] keys; a key given twice (by its
    option and by --set) is a usage error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        key, value = values if self.const is None else (self.const, values)
        options = dict(getattr(namespace, self.dest) or {})
        if key in options:
            raise argparse.ArgumentError(self, f"{key} is given twice")
        options[key] = value
        setattr(namespace, self.dest, options)


def _models_add(client: Client, args: argparse.Namespace) -> int:
    # The daemon's working directory is not ours: send the path absolute.
    reply = client.call("add_model", name=args.new_model, path=os.path.abspath(args.path),
                        options=args.options or {})
    if args.json:
        _emit_json(reply)
        return EXIT_OK
    m = reply["model"]
    print(f"added {m['name']}: {m['state']}, {m['workers']} worker(s), n_ctx {m['n_ctx']} "
          f"({m['source']})")
    return EXIT_OK


def _models_remove(client: Client, args: argparse.Namespace) -> int:
    reply = client.call("remove_model", name=args.model)
    if args.json:
        _emit_json(reply)
        return EXIT_OK
    n = reply["requests"]
    print(f"removed {reply['model']}" + (f" ({n} request{'s' * (n != 1)} finishing first)"
                                         if n else ""))
    return EXIT_OK


def cmd_limits(client: Client, args: argparse.Namespace) -> int:
    changes = {"cpu": args.cpu, "memory_high": args.memory_high, "memory_max": args.memory_max,
               "tasks_max": args.tasks_max, "cpu_weight": args.cpu_weight}
    reply = client.call("limits", model=args.model, **changes)
    if args.json:
        _emit_json(reply)
        return EXIT_OK
    lim = reply["limits"]
    print(f"{reply['model']} ({reply['backend']} backend): cpu {lim['cpu']}, memory.high "
          f"{lim['memory_high']}, memory.max {lim['memory_max']}, tasks {lim['tasks_max']}, "
          f"cpu.weight {lim['cpu_weight']}")
    return EXIT_OK


def cmd_policy(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        reply = client.call("policy", action="list")
    elif args.action in ("set", "enable"):
        settings = dict(args.settings) if args.action == "set" else {}
        reply = client.call("policy", action="set", name=args.name, settings=settings)
    else:
        reply = client.call("policy", action=args.action, name=args.name)
    if args.json:
        _emit_json(reply)
    elif args.action == "list":
        rows = [[n, "enabled" if n in reply["enabled"] else
                 "DISABLED" if n in reply["disabled"] else "-",
                 " ".join(f"{k}={v}" for k, v in reply["enabled"].get(n, {}).items())]
                for n in reply["available"]]
        print(_table(["POLICY", "STATE", "SETTINGS"], rows))
        for name, why in {**reply["disabled"], **reply["load_errors"]}.items():
            print(f"\n{name}: {why.strip()}")
    elif args.action == "show":
        print(reply["doc"].strip() if reply["doc"] else reply["name"])
        print()
        print(_table(["PARAMETER", "TYPE", "DEFAULT", "MIN", "MAX", "CURRENT", "MEANING"],
                     [[k, p["type"], p["default"], p["min"], p["max"],
                       (reply["settings"] or {}).get(k), p["help"]]
                      for k, p in reply["params"].items()]))
    elif "disabled" in reply:  # disable, or set enabled=false
        print(f"{reply['name']}: {reply['disabled']}")
    else:
        print(f"{reply['name']}: " + " ".join(f"{k}={v}" for k, v in reply["settings"].items()))
    return EXIT_OK


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    events = client.call("events", limit=args.limit)["events"]
    if args.json:
        _emit_json(events)
        return EXIT_OK
    print(_table(["TIME", "POLICY", "ACTION", "TARGET", "VALUES", "RESULT", "REASON"],
                 [[time.strftime("%H:%M:%S", time.localtime(e["at"])), e["policy"], e["action"],
                   e["target"], " ".join(f"{k}={v}" for k, v in e["values"].items()) or "-",
                   e["result"], e["reason"]] for e in events]))
    return EXIT_OK


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    reply = client.cancel(args.request)
    if args.json:
        _emit_json(reply)
    else:
        print(f"cancelled {reply['request']}")
    return EXIT_OK


def wait_ready(path: str | None, model: str | None, timeout: float) -> int:
    """Poll until the daemon answers and the model (or every model) is ready."""
    ready_models(path, model, timeout)
    return EXIT_OK


def ready_models(path: str | None, model: str | None, timeout: float) -> list[dict[str, Any]]:
    """The models once they are all ready; raises LlmctlError if one cannot be, or on timeout."""
    deadline = time.monotonic() + timeout
    last = "the daemon did not answer"
    while time.monotonic() < deadline:
        try:
            with Client(path, timeout=5) as client:
                models = [m for m in client.models() if model in (None, m["name"])]
        except LlmctlError as exc:
            if exc.code not in ("not_running", "connection_lost", "client_timeout"):
                raise
            last = exc.message
        else:
            if not models:
                raise LlmctlError("no_such_model", f"no model {model!r}")
            bad = [m for m in models if m["state"] == "unavailable"]
            if bad:
                raise LlmctlError("model_unavailable", bad[0]["error"])
            # An unloaded model serves too: its first request loads it.
            if all(m["state"] in ("ready", "unloaded") for m in models):
                return models
            last = ", ".join(f"{m['name']} is {m['state']}" for m in models)
        time.sleep(0.2)
    raise LlmctlError("client_timeout", f"not ready after {timeout:g} s: {last}")


def cmd_wait(args: argparse.Namespace) -> int:
    models = ready_models(args.socket or args.global_socket, args.model, args.timeout)
    if args.json:
        _emit_json({"ok": True, "models": {m["name"]: m["state"] for m in models}})
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion.script(args.shell))
    return EXIT_OK


# -- argument parsing ------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are JSON on stdout when --json was given."""

    json_errors = False  # set by main from the command line, before parsing

    def error(self, message: str) -> Any:
        if Parser.json_errors:
            _emit_json(_error_json("usage", f"{self.prog}: {message}"))
            sys.exit(EXIT_USAGE)
        super().error(message)


def _common(nested: bool = False) -> argparse.ArgumentParser:
    """--socket and --json. Under `policy`, both levels take them; the inner level must not
    reset what the outer one set, hence no defaults there."""
    default = {"default": argparse.SUPPRESS} if nested else {}
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH", help="daemon socket (default: "
                        f"${SOCKET_ENV}, else /run/llm-residentd/llm.sock as root, "
                        "$XDG_RUNTIME_DIR/llm-residentd.sock otherwise if it exists, "
                        "else /run/llm-residentd/llm.sock)", **default)
    common.add_argument("--json", action="store_true", help="machine-readable output, errors "
                        "included", **default)
    return common


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


def _param_type(name: str, param: Param) -> Any:
    """argparse type: the text as the Param's kind, within its bounds (else exit 2)."""
    def convert(text: str) -> Any:
        try:
            return check_field(param, name, param.kind(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {param.kind.__name__}") from None
        except ProtocolError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
    convert.__name__ = param.kind.__name__  # argparse names the type in its messages
    return convert


def _bounds(param: Param) -> str:
    if param.kind is str or param.min is None or param.max is None:
        return ""
    return f"{param.kind(param.min)}..{param.kind(param.max)}"  # 2147483647, not 2.14748e+09


def _file_param(name: str, param: Param, as_json: bool) -> Any:
    """argparse type: a file's text (or its JSON), checked as the Param (else exit 2)."""
    def convert(path: str) -> Any:
        if path == "-":  # the prompt may be on stdin already
            raise argparse.ArgumentTypeError("give a file, not - (stdin)")
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f) if as_json else f.read()
            return check_field(param, name, value)
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{path}: {exc.strerror}") from None
        except ValueError as exc:  # JSON or UTF-8
            raise argparse.ArgumentTypeError(f"{path}: not JSON: {exc}") from None
        except ProtocolError as exc:
            raise argparse.ArgumentTypeError(f"{path}: {exc.message}") from None
    convert.__name__ = "file"
    return convert


class _Append(argparse.Action):
    """A repeatable option gathering an array field, at most param.max items."""

    def __init__(self, *args: Any, param: Param, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.param = param

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = [*(getattr(namespace, self.dest) or []), values]
        if self.param.max is not None and len(items) > self.param.max:
            raise argparse.ArgumentError(self, f"at most {self.param.max:g} times")
        setattr(namespace, self.dest, items)


def _add_special(parser: argparse.ArgumentParser, name: str, param: Param) -> None:
    """The submit fields that are no single value on the command line."""
    if name == "messages":  # the positional PROMPT is the user message
        parser.add_argument("--system", dest=name, metavar="TEXT", help="a system prompt: "
                            "the request is then messages [system TEXT, user PROMPT] in the "
                            "model's chat template (not with --raw)")
    elif name == "stop":
        item = param.items or Param(str, help=name)
        parser.add_argument("--stop", dest=name, metavar="STR", action=_Append, param=param,
                            type=_param_type(name, item), help=f"{param.help}; repeat for "
                            f"more, at most {param.max:g}, each {item.min:g}..{item.max:g} "
                            "characters")
    else:  # json_schema, grammar: a file
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, dest=name, metavar="FILE", help=f"{param.help}; read from "
                            "FILE" + (" (JSON)" if param.kind is dict else ""),
                            type=_file_param(name, param, as_json=param.kind is dict))


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
        notes = [_bounds(param), extra,
                 f"default {default}" if param.kind is not bool and default is not None else ""]
        text = "; ".join(n for n in [param.help, *notes] if n).replace("%", "%%")
        flags = [*aliases, f"--{name.replace('_', '-')}"]
        if param.kind is bool:
            parser.add_argument(*flags, dest=name, action="store_true", help=text)
        else:
            parser.add_argument(*flags, dest=name, type=_param_type(name, param),
                                metavar=metavar, help=text)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write settings as key=value")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    common, nested = _common(), _common(nested=True)
    fmt = argparse.RawDescriptionHelpFormatter
    p = Parser(prog="llmctl", description="Control llm-residentd: submit prompts, watch "
               "workers and queues.", epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"llmctl {__version__}")
    p.add_argument("--socket", dest="global_socket", metavar="PATH", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("submit", parents=[common], formatter_class=fmt, epilog=EPILOG,
                       help="generate from a prompt, streaming the text to stdout",
                       description="Generate from PROMPT and stream the text to stdout. With "
                       "--json, print one JSON object per event (accepted, token, done, error). "
                       "On a terminal, a line on stderr says where the request waits (queue "
                       "position, model loading) until the text starts.")
    s.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    add_submit_options(s)
    s.add_argument("--verbose", "-v", action="store_true",
                   help="print the request id and the stats on stderr")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("chat", formatter_class=fmt, epilog=EPILOG,
                       help="talk with a model: multi-turn, streamed, on a terminal",
                       description="An interactive conversation with a model, like `ollama "
                       "run`: each question is sent with the conversation so far (rendered "
                       "with the model's chat template) and the answer streams. Ctrl-C "
                       "cancels an answer and leaves that question out of the conversation; "
                       "Ctrl-D or /bye leaves; /clear forgets the conversation; /system TEXT "
                       "sets the system prompt; /? lists the commands. With standard input "
                       "not a terminal, all of it is one question: the answer is printed "
                       "and llmctl exits. No --json: for scripts, use submit --system.")
    s.add_argument("--socket", metavar="PATH", help="daemon socket (as for the other commands)")
    add_submit_options(s, skip=("raw",))
    s.set_defaults(func=cmd_chat, json=False)

    s = sub.add_parser("status", parents=[common], help="daemon, workers, queues, latencies",
                       description="Show the daemon, each worker (pid, state, threads, RSS) and "
                       "each model's queue, how its requests ended (done, cancelled, timeout, "
                       "failed) and TTFT, latency and tokens/s percentiles.")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("ps", parents=[common], help="the models in memory",
                       description="List the loaded models (and those loading or unloading): "
                       "memory measured, slots busy/total, keep_alive, and when each will "
                       "unload once idle, as `ollama ps`.")
    s.set_defaults(func=cmd_ps)
    s = sub.add_parser("load", parents=[common], help="load a model now",
                       description="Load MODEL and return once it serves. Idle models are "
                       "unloaded first if it does not fit (least recently used first); it "
                       "waits for busy ones up to --timeout. Exit 1 with insufficient_memory "
                       "if it cannot fit even with every other model unloaded.")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--keep-alive", metavar="DURATION",
                   type=_param_type("keep_alive", Load.params["keep_alive"]),
                   help="how long it stays loaded once idle: 30s, 5m, 1h, 0, -1 (forever); "
                   "default: the model's keep_alive")
    s.add_argument("--timeout", type=float, metavar="S",
                   help=f"seconds to wait for room and the load (default {LOAD_WAIT_S:g})")
    s.set_defaults(func=cmd_load)
    s = sub.add_parser("unload", parents=[common], help="unload a model, freeing its memory",
                       description="Stop MODEL's workers and free their memory. Running "
                       "requests finish first; with --force (root only) they fail with "
                       "model_unloaded. Queued requests stay queued and load it again. "
                       "Exit 1 with not_loaded if it is not loaded.")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--force", action="store_true", help="fail its running requests (root)")
    s.set_defaults(func=cmd_unload)
    s = sub.add_parser("models", parents=[common], formatter_class=fmt,
                       help="list the models; add or remove one (root)",
                       description="Without ACTION: list the configured models and whether "
                       "they can serve. add NAME --path FILE: serve one more model (root "
                       "only); remove NAME: stop serving one, its requests finish first "
                       "(root only). Both last until the daemon restarts; a reload of the "
                       "config file keeps them.")
    s.set_defaults(func=cmd_models, action=None)
    actions = s.add_subparsers(dest="action", metavar="ACTION")
    a = actions.add_parser("add", parents=[nested], formatter_class=fmt,
                           help="serve one more model (root)",
                           description="Add model NAME from the GGUF file FILE without a "
                           "restart (root only). The options are keys of a [models.NAME] "
                           "table (docs/configuration.md), checked as the config file's: "
                           "--set KEY=VALUE gives any of them. FILE must be readable by the "
                           "workers' user (daemon.worker_user).")
    a.add_argument("new_model", metavar="NAME", help="the new model's name")
    a.add_argument("--path", required=True, metavar="FILE", help="its GGUF file")
    for key, (metavar, what) in MODEL_OPTIONS.items():
        a.add_argument(f"--{key.replace('_', '-')}", dest="options", action=_ModelOption,
                       const=key, type=int if metavar == "N" else str, metavar=metavar,
                       help=what)
    a.add_argument("--set", dest="options", action=_ModelOption, type=model_option,
                   metavar="KEY=VALUE", help="any other key of [models.NAME]; repeat for more")
    a = actions.add_parser("remove", parents=[nested], help="stop serving a model (root)",
                           description="Remove model NAME without a restart (root only): "
                           "it takes no new request, its queued and running requests "
                           "finish, then its workers stop.")
    a.add_argument("model", metavar="NAME", help="the model (llmctl models)")
    s = sub.add_parser("cancel", parents=[common], help="cancel a queued or running request",
                       description="Cancel a request by the id that submit printed "
                       "(llmctl submit -v, or --json). Only its owner or root may cancel it.")
    s.add_argument("request", metavar="REQUEST", help="request id, e.g. r7")
    s.set_defaults(func=cmd_cancel)
    s = sub.add_parser("limits", parents=[common], formatter_class=fmt,
                       help="show or change a model's worker limits live (changes: root)",
                       description="Show MODEL's worker limits, or change them live. The "
                       "daemon applies the change to each worker's scope (systemd) or cgroup "
                       "(cgroupfs), reads it back from the kernel, and sets the workers' "
                       "thread counts to match the CPU quota. Changing needs root.")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--cpu", metavar="Q", help="CPU quota: 50%% of one CPU, 1.5 CPUs, or max")
    s.add_argument("--memory-high", metavar="SIZE", help="memory.high: 600M, 2G, or max")
    s.add_argument("--memory-max", metavar="SIZE", help="memory.max: 1G, or max")
    s.add_argument("--tasks-max", type=int, metavar="N", help="most tasks; 0 is no limit")
    s.add_argument("--cpu-weight", type=int, metavar="W", help="cpu.weight, 1..10000")
    s.set_defaults(func=cmd_limits)
    s = sub.add_parser("policy", parents=[common], formatter_class=fmt,
                       help="list, show or change the resource policies",
                       description="list: every policy and whether it is enabled. show NAME: "
                       "its manual and parameters. set NAME key=value...: change parameters "
                       "live, enabling the policy if it was off; enabled=false disables it "
                       "(root only). enable NAME, disable NAME: switch it on or off (root "
                       "only; what it set stays).")
    s.set_defaults(func=cmd_policy)
    actions = s.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", parents=[nested], help="every policy and its state")
    for action, what in (("show", "its manual and parameters"),
                         ("set", "change parameters (root); enabled=false disables"),
                         ("enable", "switch it on with its current settings (root)"),
                         ("disable", "switch it off; what it set stays (root)")):
        a = actions.add_parser(action, parents=[nested], help=what, description=what)
        a.add_argument("name", metavar="NAME", help="the policy (llmctl policy list)")
        if action == "set":
            a.add_argument("settings", nargs="+", metavar="KEY=VALUE", type=_key_value)
    s = sub.add_parser("events", parents=[common], help="the actions the policies took",
                       description="The policies' recent actions (admit, defer, set_limits, "
                       "set_threads, disable) with their targets, results and reasons.")
    s.add_argument("--limit", type=int, default=50, metavar="N", help="default 50")
    s.set_defaults(func=cmd_events)
    s = sub.add_parser("wait", parents=[common], help="wait until the daemon can serve",
                       description="Wait until the daemon answers and MODEL (default: every "
                       "model) is loaded. Exit 0 when ready, 1 if a model cannot be loaded, "
                       "4 on timeout. For scripts that start the daemon.")
    s.add_argument("model", metavar="MODEL", nargs="?", help="the model to wait for")
    s.add_argument("--timeout", type=float, default=60, metavar="S", help="default 60")
    s.set_defaults(func=None, local=cmd_wait)
    s = sub.add_parser("completion", help="print a shell completion script",
                       description="Print the completion script for bash or zsh; e.g. "
                       "source <(llmctl completion bash). Model and policy names are asked "
                       "from the daemon as you type (none when it is down). The Debian "
                       "package installs both scripts.")
    s.add_argument("shell", choices=sorted(completion.SCRIPTS))
    s.set_defaults(func=None, local=cmd_completion, json=False, socket=None)
    return p


EXIT_FOR_CODE = {"not_running": EXIT_NOT_RUNNING, "timeout": EXIT_TIMEOUT,
                 "deferred_timeout": EXIT_TIMEOUT, "client_timeout": EXIT_TIMEOUT}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv[:1] == ["__complete"]:  # the completion scripts ask here; not a command
        return completion.complete(parser, argv[1:])
    Parser.json_errors = "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv
    args = parser.parse_args(argv)
    try:
        if args.func is None:
            return args.local(args)
        with Client(args.socket or args.global_socket) as client:
            return args.func(client, args)
    except LlmctlError as exc:
        if args.json:
            extra = {"event": "error"} if args.command == "submit" else {}
            _emit_json(_error_json(exc.code, exc.message, **extra))
        else:
            print(f"llmctl: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_FOR_CODE.get(exc.code, EXIT_FAILED)
    except KeyboardInterrupt:
        if args.json:
            _emit_json(_error_json("interrupted", "interrupted"))
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
