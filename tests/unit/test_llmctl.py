"""llmctl without a daemon: its options, usage errors, status columns and completion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from llm_residentd.front.ops.events import Events
from llm_residentd.front.ops.limits import Limits
from llm_residentd.front.ops.load import Load
from llm_residentd.front.ops.submit import Submit
from llm_residentd.front.ops.unload import Unload
from llmctl import cli, completion, progress
from llmctl.commands import models, ps, status, submit
from llmctl.commands.params import op_fields

NO_DAEMON = "/nonexistent/llm.sock"  # a command that got this far would exit 3, not 2


def _subparser(name: str):
    return completion._subparsers(cli.build_parser())[name]


def test_every_submit_param_has_an_option_that_reaches_the_op(tmp_path):
    dests = {a.dest for a in _subparser("submit")._actions}
    assert set(Submit.params) - {"prompt"} <= dests
    schema, grammar = tmp_path / "schema.json", tmp_path / "g.gbnf"
    schema.write_text('{"type": "object"}')
    grammar.write_text('root ::= "yes" | "no"\n')
    args = cli.build_parser().parse_args([
        "submit", "hi", "-m", "tiny", "-n", "7", "-p", "3", "-t", "9", "--temperature", "0.5",
        "--top-p", "0.9", "--top-k", "5", "--min-p", "0.1", "--repeat-penalty", "1.2",
        "--seed", "42", "--raw", "--ignore-eos", "--stop", "END", "--stop", "\n\n",
        "--json-schema", str(schema), "--grammar", str(grammar), "--system", "be brief"])
    assert submit.submit_fields(args) == {
        "model": "tiny", "max_tokens": 7, "priority": 3, "timeout": 9.0, "temperature": 0.5,
        "top_p": 0.9, "top_k": 5, "min_p": 0.1, "repeat_penalty": 1.2, "seed": 42, "raw": True,
        "ignore_eos": True, "stop": ["END", "\n\n"], "json_schema": {"type": "object"},
        "grammar": 'root ::= "yes" | "no"\n'}
    # --system makes the request a conversation: messages instead of prompt
    assert submit.prompt_fields("hi", args.messages) == {"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    zeros = cli.build_parser().parse_args(["submit", "hi", "--temperature", "0", "--seed", "0",
                                           "--top-k", "0", "--min-p", "0"])
    assert submit.submit_fields(zeros) == {"temperature": 0.0, "seed": 0, "top_k": 0, "min_p": 0.0}
    plain = cli.build_parser().parse_args(["submit", "hi"])
    assert submit.submit_fields(plain) == {} and submit.prompt_fields("hi", plain.messages) == {
        "prompt": "hi"}


def test_options_built_from_an_ops_params_reach_the_op():
    parse = cli.build_parser().parse_args
    assert op_fields(parse(["load", "tiny", "--keep-alive", "5m", "--timeout", "9"]), Load) == {
        "model": "tiny", "keep_alive": "5m", "timeout": 9.0}
    assert op_fields(parse(["unload", "tiny"]), Unload) == {"model": "tiny", "force": False}
    assert op_fields(parse(["unload", "tiny", "--force"]), Unload)["force"] is True
    assert op_fields(parse(["limits", "tiny", "--cpu", "50%", "--memory-high", "1G",
                            "--memory-max", "2G", "--tasks-max", "0", "--cpu-weight", "5"]),
                     Limits) == {"model": "tiny", "cpu": "50%", "memory_high": "1G",
                                 "memory_max": "2G", "tasks_max": 0, "cpu_weight": 5}
    assert op_fields(parse(["limits", "tiny"]), Limits) == {"model": "tiny"}
    assert op_fields(parse(["events"]), Events) == {"limit": 50}


def test_chat_takes_the_submit_options_but_raw(tmp_path):
    dests = {a.dest for a in _subparser("chat")._actions}
    assert set(Submit.params) - {"prompt", "raw"} <= dests and "raw" not in dests


@pytest.mark.parametrize(("argv", "words"), [
    (["--stop", ""], "at least 1"),
    (["--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e", "--stop", "f",
      "--stop", "g", "--stop", "h", "--stop", "i"], "at most 8 times"),
    (["--json-schema", "-"], "not - (stdin)"),
    (["--json-schema", "/nonexistent.json"], "No such file"),
    (["--json-schema", "BADJSON"], "not JSON"),
    (["--json-schema", "ARRAY"], "json_schema must be a map, not array"),
    (["--grammar", "EMPTY"], "the length of grammar must be at least 1"),
])
def test_bad_output_options_are_usage_errors(argv, words, tmp_path, capsys):
    files = {"BADJSON": "{nope", "ARRAY": "[1]", "EMPTY": ""}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = [str(tmp_path / a) if a in files else a for a in argv]
    assert _exit_code(["--socket", NO_DAEMON, "submit", "hi", *argv]) == 2
    assert words in capsys.readouterr().err


def test_submit_help_shows_bounds_defaults_and_the_max_tokens_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["submit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--top-k K top-k sampling; 0 disables; 0..100000; default 40" in out
    assert "-n N, --max-tokens N" in out and "256 unless configured" in out


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return exc.value.code


@pytest.mark.parametrize("argv", [
    ["policy", "show"], ["policy", "set", "static"], ["policy", "set", "static", "cpu"],
    ["policy", "disable"], ["policy"], ["submit", "hi", "--top-p", "2"],
    ["submit", "hi", "--top-k", "x"], ["submit", "hi", "-n", "0"]])
def test_usage_errors_exit_2_without_calling_the_daemon(argv, capsys):
    assert _exit_code(["--socket", NO_DAEMON, *argv]) == 2
    assert "usage" in capsys.readouterr().err


def test_usage_error_with_json_is_one_json_object_on_stdout(capsys):
    assert _exit_code(["--socket", NO_DAEMON, "policy", "show", "--json"]) == 2
    out, err = capsys.readouterr()
    reply = json.loads(out)
    assert reply["ok"] is False and reply["error"]["code"] == "usage"
    assert "NAME" in reply["error"]["message"] and err == ""


def test_policy_json_option_is_taken_at_either_level():
    parse = cli.build_parser().parse_args
    assert parse(["policy", "--json", "list"]).json is True
    assert parse(["policy", "list", "--json"]).json is True
    assert parse(["policy", "list"]).json is False
    assert parse(["policy", "set", "static", "enabled=false"]).settings == [("enabled", "false")]


def test_outcome_counts_keep_cancelled_and_timeout_apart_from_failed():
    counts = status.outcome_counts({"completed": 5, "cancelled": 2, "timeout": 1,
                                    "deferred_timeout": 1, "worker_died": 3, "internal": 1})
    assert counts == {"done": 5, "cancelled": 2, "timeout": 2, "failed": 4}


class FakeClient:
    def __init__(self, status):
        self._status = status

    def status(self):
        return self._status


def _status_lines(capsys, workers: list, running: int = 0, outcomes: dict | None = None
                  ) -> list[str]:
    """`llmctl status` output for a daemon with these workers and one model, tiny."""
    summary = {"p50": None, "p95": None, "p99": None}
    st = {"daemon": {"version": "0", "pid": 1, "uptime_s": 1, "backend": "none", "config": "-",
                     "socket": "-"},
          "workers": workers,
          "models": {"tiny": {"state": "ready", "queue_depth": 0, "max_queue": 8,
                              "running": running, "outcomes": outcomes or {},
                              "ttft_s": summary, "latency_s": summary, "tokens_per_s": summary}}}
    status.cmd_status(FakeClient(st), cli.build_parser().parse_args(["status"]))
    return capsys.readouterr().out.splitlines()


def test_status_without_models_shows_the_outcome_columns(capsys):
    """The outcome columns came from the last model's row: with none, a NameError."""
    st = {"daemon": {"version": "0", "pid": 1, "uptime_s": 1, "backend": "none", "config": "-",
                     "socket": "-"}, "workers": [], "models": {}}
    assert status.cmd_status(FakeClient(st), cli.build_parser().parse_args(["status"])) == 0
    header = next(line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("MODEL"))
    assert header.split()[4:8] == ["DONE", "CANCELLED", "TIMEOUT", "FAILED"]


class PsClient:
    def __init__(self, entries):
        self.entries = entries

    def call(self, op):
        assert op == "ps"
        return {"models": self.entries}


def test_ps_and_status_show_the_kv_cache_types_and_bytes_per_cell(capsys):
    entry = {"name": "tiny", "state": "ready", "memory_bytes": 300 << 20, "slots": 4,
             "slots_busy": 1, "keep_alive": "forever", "keep_alive_s": None,
             "unload_in_s": None, "waiting": None, "cache_type_k": "q8_0",
             "cache_type_v": "q4_0", "kv_cell_bytes": 12240}
    # a daemon from before the cache types says nothing of them
    older = {k: v for k, v in entry.items() if not k.startswith(("cache", "kv"))}
    ps.cmd_ps(PsClient([entry, {**older, "name": "old"}]), cli.build_parser().parse_args(["ps"]))
    # (no prompt_cache in these entries: the column says off)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "MEMORY", "KV", "K/V", "KV/CELL", "SLOTS",
                                "PROMPT_CACHE", "KEEP_ALIVE", "UNLOADS"]
    assert lines[1].split() == ["tiny", "ready", "300.0M", "q8_0/q4_0", "12.0K", "1/4",
                                "off", "forever", "forever"]
    assert lines[2].split()[3:5] == ["-", "-"]

    summary = {"p50": None, "p95": None, "p99": None}
    model = {"state": "ready", "queue_depth": 0, "max_queue": 8, "running": 0, "outcomes": {},
             "ttft_s": summary, "latency_s": summary, "tokens_per_s": summary,
             "cache_type_k": "f16", "cache_type_v": "f16", "kv_cell_bytes": None}
    st = {"daemon": {"version": "0", "pid": 1, "uptime_s": 1, "backend": "none", "config": "-",
                     "socket": "-"}, "workers": [], "models": {"tiny": model}}
    status.cmd_status(FakeClient(st), cli.build_parser().parse_args(["status"]))
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("MODEL"))
    assert header.split()[-3:] == ["KV", "K/V", "KV/CELL"]
    assert next(line for line in lines if line.startswith("tiny")).split()[-2:] == ["f16/f16", "-"]


def test_status_table_has_a_column_per_outcome_and_names_the_failures(capsys):
    lines = _status_lines(capsys, [], outcomes={"completed": 5, "cancelled": 2, "timeout": 1,
                                                "worker_died": 3})
    header = next(line for line in lines if line.startswith("MODEL"))
    row = next(line for line in lines if line.startswith("tiny")).split()
    assert header.split()[4:8] == ["DONE", "CANCELLED", "TIMEOUT", "FAILED"]
    assert row[4:8] == ["5", "2", "1", "3"]
    assert "tiny failed: worker_died 3" in lines


# -- completion ------------------------------------------------------------------------------

def _names(words, what):
    return {"model": ["tiny", "smollm2"], "policy": ["static", "threads"]}[what]


@pytest.mark.parametrize(("words", "want"), [
    (["llmctl", "su"], ["submit"]),
    (["llmctl", ""], ["submit", "chat", "status", "models", "ps", "load", "unload", "cancel",
                      "limits", "policy", "events", "wait", "completion"]),
    (["llmctl", "load", ""], ["tiny", "smollm2"]),
    (["llmctl", "unload", "s"], ["smollm2"]),
    (["llmctl", "chat", "-m", ""], ["tiny", "smollm2"]),
    (["llmctl", "submit", "--top"], ["--top-k", "--top-p"]),
    (["llmctl", "submit", "-m", ""], ["tiny", "smollm2"]),
    (["llmctl", "submit", "--model", "sm"], ["smollm2"]),
    (["llmctl", "limits", ""], ["tiny", "smollm2"]),
    (["llmctl", "wait", "--timeout", "5", "t"], ["tiny"]),
    (["llmctl", "policy", "s"], ["show", "set"]),
    (["llmctl", "policy", "set", "th"], ["threads"]),
    (["llmctl", "policy", "--json", "disable", ""], ["static", "threads"]),
    (["llmctl", "completion", ""], ["bash", "zsh"]),
    (["llmctl", "cancel", ""], []),
    (["llmctl", "models", ""], ["add", "remove"]),
    (["llmctl", "models", "remove", ""], ["tiny", "smollm2"]),
    (["llmctl", "models", "add", ""], []),  # a new name: nothing to offer
    (["llmctl", "models", "add", "x", "--n"], ["--n-ctx"]),
])
def test_completion_candidates(words, want):
    parser = cli.build_parser()
    got = completion.candidates(parser, words, len(words) - 1, names=_names)
    assert sorted(got) == sorted(want)


def test_completion_with_the_daemon_down_gives_no_names():
    words = ["llmctl", "--socket", NO_DAEMON, "submit", "-m", ""]
    assert completion.candidates(cli.build_parser(), words, 5) == []


def _llmctl_env() -> dict[str, str]:
    """PATH with the llmctl of this interpreter first, as the completion scripts call it."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def test_bash_completion_script_completes_subcommands_and_options():
    script = 'source <(llmctl completion bash); COMP_WORDS=({words}); COMP_CWORD={cword}; ' \
             '_llmctl; echo "${{COMPREPLY[@]}}"; complete -p llmctl'
    run = lambda words, cword: subprocess.run(  # noqa: E731
        ["bash", "-c", script.format(words=words, cword=cword)], capture_output=True,
        text=True, env=_llmctl_env(), timeout=60)
    r = run("llmctl su", 1)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["submit", "complete -o default -F _llmctl llmctl"]
    r = run(f"llmctl --socket {NO_DAEMON} submit --ignore", 4)
    assert r.stdout.splitlines()[0] == "--ignore-eos"


def test_zsh_completion_script_parses_and_registers():
    assert shutil.which("zsh"), "zsh is missing: make test-tools (apt-get install zsh)"
    r = subprocess.run(["zsh", "-n", "-c", completion.script("zsh")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["zsh", "-f", "-c", "autoload -U compinit && compinit -u -D && "
                        "source <(llmctl completion zsh) && print -r -- $_comps[llmctl]"],
                       capture_output=True, text=True, env=_llmctl_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "_llmctl"


def test_completion_scripts_are_package_data():
    assert "_llmctl()" in completion.script("bash")
    assert completion.script("zsh").startswith("#compdef llmctl")


# -- what a terminal is told -------------------------------------------------------------------

class FakeStream:
    request, model = "r9", "tiny"

    def __init__(self, stats=None):
        self.stats = stats


@pytest.mark.parametrize(("model", "want"), [
    ({"state": "ready", "queued": ["r7", "r8", "r9", "r10"], "running": 2},
     "llmctl: queued: 4 ahead (2 running, 2 queued), 12 s"),
    ({"state": "loading", "queued": ["r9"], "running": 0},
     "llmctl: loading model tiny, queued: 0 ahead (0 running, 0 queued), 12 s"),
    ({"state": "loading", "queued": [], "running": 0}, "llmctl: loading model tiny, 12 s"),
    ({"state": "ready", "queued": [], "running": 1}, "llmctl: processing the prompt, 12 s"),
    ({"state": "unloaded", "queued": ["r9"], "running": 0},
     "llmctl: loading model tiny, queued: 0 ahead (0 running, 0 queued), 12 s"),
    ({"state": "loading", "queued": ["r9"], "running": 0,
      "waiting": "waiting for memory: needs 90 MiB, 40 MiB free; busy: big"},
     "llmctl: model tiny is waiting for memory: needs 90 MiB, 40 MiB free; busy: big, "
     "queued: 0 ahead (0 running, 0 queued), 12 s"),
])
def test_waiting_line_text(model, want):
    assert progress.describe_wait({"models": {"tiny": model}}, FakeStream(), 12.2) == want


class ModelsClient:
    def models(self):
        return [{"name": "tiny", "n_ctx": 256, "max_tokens": 16}]


@pytest.mark.parametrize(("stats", "asked", "want"), [
    ({"finish_reason": "stop", "completion_tokens": 3}, None, None),
    ({"finish_reason": "length", "completion_tokens": 16}, None,
     "llmctl: stopped at max_tokens 16; use -n to allow more"),
    ({"finish_reason": "length", "completion_tokens": 40}, 40,
     "llmctl: stopped at max_tokens 40; use -n to allow more"),
    ({"finish_reason": "length", "completion_tokens": 200}, 250,
     "llmctl: stopped: the context of model tiny is full (256 tokens)"),
])
def test_stop_notice(stats, asked, want):
    assert progress.stop_notice(ModelsClient(), FakeStream(stats), asked) == want


def test_status_shows_cpu_faults_and_context_switches_per_worker(capsys):
    worker = {"name": "tiny-0", "model": "tiny", "pid": 42, "state": "busy", "threads": 2,
              "threads_why": "config: threads = 2", "threads_asked": None,
              "rss_bytes": 50 << 20, "served": 3, "restarts": 1,
              "slots": 4, "slots_busy": 2, "batch_limit": 4,
              "batch": {"steps": 10, "tokens": 20, "sequences": 19, "size": 1.9},
              "requests": [{"id": "r7", "tokens": 3, "kv_cells": 412},
                           {"id": "r9", "tokens": 0, "kv_cells": None}],
              "cpu_percent": 187.4, "major_faults": 3, "minor_faults": 7345,
              "ctx_switches_voluntary": 1_250_000, "ctx_switches_involuntary": 12}
    gone = {**worker, "name": "tiny-1", "pid": None, "state": "restarting", "requests": [],
            "slots": 0, "slots_busy": 0, "batch": {"size": None},
            "rss_bytes": None, "cpu_percent": None, "major_faults": None, "minor_faults": None,
            "ctx_switches_voluntary": None, "ctx_switches_involuntary": None}
    lines = _status_lines(capsys, [worker, gone], running=1)
    header = next(line for line in lines if line.startswith("WORKER"))
    assert "CPU%  FAULTS maj/min  CTXSW vol/invol" in header
    # THREADS is two words ("2 config")
    assert next(line for line in lines if line.startswith("tiny-0")).split()[6:10] == [
        "50.0M", "187", "3/7.3k", "1.2M/12"]
    assert next(line for line in lines if line.startswith("tiny-1")).split()[6:10] == [
        "-", "-", "-", "-"]


def test_status_shows_slots_batch_size_and_kv_cells_per_request(capsys):
    """Issue 14: slots busy/free per worker, the mean batch size, cells per sequence."""
    base = {"model": "tiny", "pid": 42, "state": "busy", "threads": 2, "threads_why": None,
            "threads_asked": None, "rss_bytes": None, "served": 0, "restarts": 0,
            "cpu_percent": None, "major_faults": None, "minor_faults": None,
            "ctx_switches_voluntary": None, "ctx_switches_involuntary": None}
    workers = [
        {**base, "name": "tiny-0", "slots": 4, "slots_busy": 2, "batch_limit": 4,
         "batch": {"size": 1.9}, "requests": [{"id": "r7", "tokens": 3, "kv_cells": 412},
                                              {"id": "r9", "tokens": 0, "kv_cells": None}]},
        {**base, "name": "tiny-1", "slots": 4, "slots_busy": 2, "batch_limit": 2,
         "batch": {"size": None}, "requests": [{"id": "r3", "tokens": 1, "kv_cells": 5},
                                               {"id": "r4", "tokens": 1, "kv_cells": 6}]},
        {**base, "name": "tiny-2", "state": "starting", "slots": 0, "slots_busy": 0,
         "batch_limit": 0, "batch": {"size": None}, "requests": []}]
    lines = _status_lines(capsys, workers, running=4)
    header = next(line for line in lines if line.startswith("WORKER"))
    assert header.endswith("SLOTS busy/free  BATCH  REQUESTS:KV cells")
    rows = {line.split()[0]: line for line in lines if line.startswith("tiny-")}
    assert rows["tiny-0"].endswith("2/2              1.90   r7:412 r9:-")
    assert rows["tiny-1"].endswith("2/0 max 2        -      r3:5 r4:6")
    assert rows["tiny-2"].endswith("-                -      -")


# -- models add / remove ---------------------------------------------------------------------

class CallClient:
    """Records the op a command sends and answers it."""

    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def call(self, op, **fields):
        self.calls.append((op, fields))
        return self.reply


ADDED = {"model": {"name": "extra", "state": "loading", "workers": 2, "n_ctx": 512,
                   "source": "/m/x.gguf"}}


def test_models_add_sends_the_options_as_model_keys(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser().parse_args([
        "models", "add", "extra", "--path", "x.gguf", "--n-ctx", "512", "--workers", "2",
        "--parallel", "3", "--threads", "1", "--keep-alive", "10m", "--load", "on_demand",
        "--set", "max_tokens=64", "--set", "flash_attn=false", "--set", "stream_interval=0.1",
        "--set", "cpu=50%", "--set", "other=text"])
    client = CallClient(ADDED)
    assert models.cmd_models(client, args) == 0
    assert client.calls == [("add_model", {
        "name": "extra", "path": str(tmp_path / "x.gguf"),  # absolute: the daemon's cwd differs
        "options": {"n_ctx": 512, "workers": 2, "parallel": 3, "threads": 1,
                    "keep_alive": "10m", "load": "on_demand", "max_tokens": 64,
                    "flash_attn": False, "stream_interval": 0.1, "cpu": "50%",
                    "other": "text"}})]
    assert capsys.readouterr().out == "added extra: loading, 2 worker(s), n_ctx 512 (/m/x.gguf)\n"


def test_models_add_without_options_and_json(capsys):
    args = cli.build_parser().parse_args(["models", "add", "extra", "--path", "/m/x.gguf",
                                          "--json"])
    client = CallClient(ADDED)
    assert models.cmd_models(client, args) == 0
    assert client.calls == [("add_model", {"name": "extra", "path": "/m/x.gguf",
                                           "options": {}})]
    assert json.loads(capsys.readouterr().out) == ADDED


@pytest.mark.parametrize(("reply", "want"), [
    ({"model": "extra", "requests": 0}, "removed extra\n"),
    ({"model": "extra", "requests": 1}, "removed extra (1 request finishing first)\n"),
    ({"model": "extra", "requests": 3}, "removed extra (3 requests finishing first)\n"),
])
def test_models_remove(capsys, reply, want):
    client = CallClient(reply)
    assert models.cmd_models(client, cli.build_parser().parse_args(
        ["models", "remove", "extra"])) == 0
    assert client.calls == [("remove_model", {"name": "extra"})]
    assert capsys.readouterr().out == want


@pytest.mark.parametrize(("argv", "words"), [
    (["models", "add", "x"], "the following arguments are required: --path"),
    (["models", "add", "x", "--path", "/m", "--n-ctx", "4", "--set", "n_ctx=5"],
     "n_ctx is given twice"),
    (["models", "add", "x", "--path", "/m", "--set", "n_ctx=many"], "n_ctx: 'many' is not int"),
    (["models", "add", "x", "--path", "/m", "--set", "flash_attn=maybe"],
     "flash_attn: 'maybe' is not bool"),
    (["models", "add", "x", "--path", "/m", "--set", "n_ctx"], "write settings as key=value"),
    (["models", "add", "x", "--path", "/m", "--workers", "two"], "invalid int value"),
    (["models", "remove"], "the following arguments are required: NAME"),
])
def test_models_usage_errors_exit_2_before_any_connection(argv, words):
    r = subprocess.run([sys.executable, "-m", "llmctl", "--socket", NO_DAEMON, *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and words in r.stderr, r.stderr


def test_models_alone_still_lists(capsys):
    class Lister:
        def models(self):
            return [{"name": "tiny", "state": "ready", "workers": 1, "n_ctx": 256,
                     "source": "/t.gguf", "error": None}]
    assert models.cmd_models(Lister(), cli.build_parser().parse_args(["models"])) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["tiny", "ready", "1", "256",
                                                               "/t.gguf"]
