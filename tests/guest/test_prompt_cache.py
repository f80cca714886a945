"""The prompt cache under a real memory squeeze (issue 22): memory.high on a worker's scope
below what it holds makes the kernel throttle it (memory PSI in the scope); the daemon
halves the prompt cache first, and no model is evicted while cache memory remains. The
kernel's view: the scope's memory.events (high rises, no oom_kill), its anonymous memory
falling by what the cache gave back.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

from guestlib import CGROUP, MODEL_SRC, SLICE, GuestDaemon, keyed, wait_for
from llmctl.client import Client


def log(msg: str) -> None:
    print(f"[{time.monotonic():9.2f}] {msg}", flush=True)


def text(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i % 9} w{i}" for i in range(n))


def test_a_memory_squeeze_shrinks_the_prompt_cache_and_evicts_nothing(
        tmp_path: Path, share: Path) -> None:
    model = Path("/var/tmp/kv.gguf")  # local disk: its pages are charged to the worker
    shutil.copyfile(share / "kv.gguf", model)
    d = GuestDaemon(tmp_path / "d", f"""
[daemon]
state_dir = "{tmp_path / 'state'}"
psi_scope_trigger = "some 20000 1000000"
pressure_unload_grace = 0  # an idle model could go at the first trigger: it must not
[models.a]
path = "{model}"
n_ctx = 4096
parallel = 1
threads = 0
max_tokens = 4000
prompt_cache = "256M"
prompt_cache_disk = "0"  # memory only: what it gives back is gone
[models.b]
path = "{MODEL_SRC}"
parallel = 1
threads = 1
keep_alive = "1h"
""").start()
    tokens: list[int] = []
    done = threading.Event()
    try:
        with Client(d.socket, timeout=600) as c:
            # Each pushes the one before into the prompt cache; the decoding request below
            # pushes the last. About 2 KiB a token (kv.gguf), 1 MiB a conversation: TCG
            # evaluates ~25 prompt tokens a second.
            for i in range(3):
                t0 = time.monotonic()
                events = list(c.submit(text(f"conv{i}x", 55), model="a", max_tokens=1,
                                       raw=True).events())
                assert events[-1]["event"] == "done", events
                log(f"conversation {i}: {events[-1]['stats']['prompt_tokens']} tokens in "
                    f"{time.monotonic() - t0:.1f} s")
            list(c.submit("hello", model="b", max_tokens=2).events())  # b: loaded, idle
        cgroup = Path(d.worker("a-0")["cgroup"]["cgroup"])
        assert cgroup.is_relative_to(CGROUP / SLICE)

        def decode() -> None:  # charges pages as it goes: a throttled scope stalls
            with Client(d.socket, timeout=600) as c:
                for e in c.submit("tell me everything " * 4, model="a", max_tokens=4000,
                                  ignore_eos=True, raw=True).events():
                    if e["event"] == "token":
                        tokens.append(e["tokens"])
                    if done.is_set():
                        break

        threading.Thread(target=decode, daemon=True).start()
        wait_for(lambda: len(tokens) >= 3, timeout=120, what="decoding to start")
        cache = wait_for(lambda: (p := d.status()["models"]["a"]["prompt_cache"])["entries"] >= 3
                         and p, timeout=60, what="the prompt cache to hold the conversations")
        held = cache["bytes"]
        log(f"prompt cache: {cache}")
        assert held > 2 << 20, cache
        before = keyed(cgroup / "memory.events")
        anon = keyed(cgroup / "memory.stat")["anon"]
        # A quarter of the cache below its anonymous memory (no swap): only giving memory
        # back ends the throttling, and halving the cache gives back twice that.
        high = (anon - held // 4) // 4096 * 4096
        log(f"squeeze: anon {anon}, cache {held}, memory.high -> {high}")
        d.call("limits", model="a", memory_high=str(high))

        def relieved() -> bool:
            return d.status()["models"]["a"]["prompt_cache"]["bytes"] <= held // 2 and \
                int((cgroup / "memory.current").read_text()) < high

        wait_for(relieved, timeout=180, what=lambda: (
            f"the cache to shrink (cache {d.status()['models']['a']['prompt_cache']}, "
            f"memory.current {(cgroup / 'memory.current').read_text().strip()}, anon "
            f"{keyed(cgroup / 'memory.stat')['anon']}, memory.events "
            f"{keyed(cgroup / 'memory.events')}, pressure "
            f"{(cgroup / 'memory.pressure').read_text().split()})"))
        after = keyed(cgroup / "memory.events")
        shrunk = [json.loads(line) for line in (d.dir / "daemon.log").read_text().splitlines()
                  if '"prompt_cache_pressure"' in line or '"prompt_cache_shrunk"' in line]
        log(f"memory.events {before} -> {after}; log: {shrunk}")
        assert after["high"] > before["high"] and after["oom_kill"] == 0
        assert any(e["event"] == "prompt_cache_pressure" for e in shrunk)
        assert keyed(cgroup / "memory.stat")["anon"] < anon - held // 4
        # Nothing was evicted: b (idle, past its grace of 0 s) is still loaded.
        evicted = [e for e in d.call("events", limit=500)["events"]
                   if e["policy"] == "lifecycle" and e["action"] == "evict"]
        assert evicted == [] and "b" in {m["name"] for m in d.call("ps")["models"]}, evicted
        assert keyed(CGROUP / SLICE / "memory.events")["oom_kill"] == 0
        seen = len(tokens)
        wait_for(lambda: len(tokens) >= seen + 3, timeout=120, what="tokens after the shrink")
    finally:
        done.set()
        d.stop()
        model.unlink(missing_ok=True)
