"""The threads policy in a real daemon on this host (backend none): a worker's threads
drop when busy processes start beside it and come back after they stop.

The neighbours are real busy loops; the daemon reads /proc as it always does. Where PSI
triggers are refused (this project's development hosts answer EINVAL) the daemon polls,
and says so. The same on real systemd with triggers: tests/guest/test_threads.py.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from harness import tiny_config, wait_for

CPUS = len(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(CPUS < 2, reason=f"{CPUS} CPU: no thread to give up")


@pytest.fixture
def neighbours() -> Iterator:
    """start(n): n busy-loop processes beside the daemon; stop() ends them."""
    procs: list[subprocess.Popen] = []

    class Hogs:
        def start(self, n: int) -> None:
            procs.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"])
                         for _ in range(n))

        def stop(self) -> None:
            for p in procs:
                p.kill()
                p.wait()
            procs.clear()

    hogs = Hogs()
    yield hogs
    hogs.stop()


def worker(d) -> dict:
    return d.status()["workers"][0]


def set_threads(d) -> list[dict]:
    """Through the in-process client: an llmctl process would itself be a neighbour."""
    with d.client() as c:
        events = c.call("events", limit=500)["events"]
    return [e for e in events if e["action"] == "set_threads"]


def quiet_baseline(d) -> int:
    """Wait until the worker has every CPU again, then return the count of set_threads
    events so far; the test's own processes can make it yield for a moment."""
    while True:
        wait_for(lambda: worker(d)["threads"] == CPUS, timeout=20, what=f"{CPUS} threads")
        before = len(set_threads(d))
        if worker(d)["threads"] == CPUS:
            return before


@needs_two
def test_threads_follow_busy_neighbours_down_at_once_and_back_after_a_calm(
        start_daemon, tiny_model_path, neighbours):
    d = start_daemon(tiny_config(tiny_model_path, threads=0))
    w = wait_for(lambda: (w := worker(d))["threads"] == CPUS and w, timeout=20,
                 what=f"{CPUS} threads on a quiet machine")
    assert w["threads_why"].startswith("affinity: ")
    cpu = d.status()["cpu"]
    if cpu["mode"] == "polling":  # this host: the kernel refuses triggers
        # fast once the first reading after the worker started saw it could use 2 CPUs
        cpu = wait_for(lambda: (c := d.status()["cpu"])["period_s"] == 0.2 and c, timeout=5,
                       what="readings every 0.2 s")
        assert cpu["why_polling"]
        logged = [e for e in d.logs() if e["event"] == "cpu_load_polling"]
        assert logged and logged[0]["why"] == cpu["why_polling"]
    else:
        assert cpu["mode"] == "psi-trigger" and cpu["trigger"] == "some 50000 500000"
    before = quiet_baseline(d)

    neighbours.start(CPUS)
    started = time.monotonic()
    w = wait_for(lambda: (w := worker(d))["threads"] == 1 and w, timeout=10,
                 what="the thread count to drop beside busy neighbours")
    dropped = time.monotonic() - started
    assert w["threads_why"].startswith("contention: "), w
    event = set_threads(d)[before]
    assert event["values"] == {"threads": 1} and event["policy"] == "threads"
    assert event["reason"].startswith("contention: ") and event["result"] == "done"
    d.assert_serving()  # a request while the neighbours run, with one thread

    neighbours.stop()
    stopped = time.monotonic()
    w = wait_for(lambda: (w := worker(d))["threads"] == CPUS and w, timeout=20,
                 what="the threads to come back after the neighbours stopped")
    back = time.monotonic() - stopped
    assert w["threads_why"].startswith(f"affinity: {CPUS} CPUs"), w
    assert back >= 3.0, f"given back after {back:.1f} s: sooner than raise_after_s"
    changes = set_threads(d)[before:]
    assert changes[-1]["values"]["threads"] == CPUS
    # the neighbours ran for seconds: one drop, then nothing until they stopped
    during = [e for e in changes if e["at"] < time.time() - back]
    assert [e["values"]["threads"] for e in during] == [1], during
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(changes)]
    assert all(g >= 0.5 for g in gaps), gaps  # at most one change per interval_s
    print(f"dropped after {dropped:.2f} s, given back after {back:.2f} s")


@needs_two
def test_a_pinned_count_and_a_policy_turned_off_stay_put(start_daemon, tiny_model_path,
                                                         neighbours):
    pinned = start_daemon(tiny_config(tiny_model_path, threads=2), name="pinned")
    off = start_daemon(tiny_config(tiny_model_path, threads=0)
                       + '\n[[policies]]\nname = "threads"\nenabled = false\n', name="off")
    listing = json.loads(off.llmctl("policy", "list", "--json").stdout)
    assert "threads" not in listing["enabled"]
    assert listing["disabled"]["threads"] == "enabled = false in the config"
    assert worker(pinned)["threads_why"] == "config: threads = 2"
    neighbours.start(CPUS)
    time.sleep(3)  # several readings and decisions
    for d in (pinned, off):
        assert worker(d)["threads"] == 2 and set_threads(d) == []
        d.assert_serving()


def test_bad_threads_settings_are_refused_by_name_and_change_nothing(start_daemon,
                                                                     tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, threads=0))
    before = json.loads(d.llmctl("policy", "show", "threads", "--json").stdout)["settings"]
    for settings, words in (
            (["interval_s=0"], "interval_s = 0.0 is below the minimum 0.2"),
            (["interval_s=2", "raise_after_s=1"], "raise_after_s = 1.0 is below interval_s = 2.0"),
            (["margin=two"], "margin: 'two' is not a float")):
        r = d.llmctl("policy", "set", "threads", *settings)
        assert r.returncode == 1 and words in r.stderr, (settings, r.stderr)
    after = json.loads(d.llmctl("policy", "show", "threads", "--json").stdout)["settings"]
    assert after == before
    r = d.llmctl("policy", "disable", "threads")
    assert r.returncode == 0 and "disabled by uid" in r.stdout
    r = d.llmctl("policy", "disable", "threads")
    assert r.returncode == 1 and "not enabled" in r.stderr
    assert d.llmctl("policy", "set", "threads", "margin=0.25").returncode == 0  # on again
    listing = json.loads(d.llmctl("policy", "list", "--json").stdout)
    assert listing["enabled"]["threads"]["margin"] == 0.25
    d.assert_serving()


@pytest.mark.parametrize("extra, words", [
    ('\n[[policies]]\nname = "threads"\ninterval_s = 0\n',
     "policies[0] (threads): interval_s = 0.0 is below the minimum 0.2"),
    ('\n[[policies]]\nname = "threads"\ninterval_s = 5.0\nraise_after_s = 1.0\n',
     "policies[0] (threads): raise_after_s = 1.0 is below interval_s = 5.0"),
    ('\n[[policies]]\nname = "threads"\nenabled = "no"\n',
     "policies[0].enabled: expected true or false"),
    ('\n[[policies]]\nname = "threads"\n[[policies]]\nname = "threads"\n',
     "policies[1].name: policy 'threads' is configured twice"),
])
def test_bad_threads_config_stops_the_daemon_naming_the_key(tmp_path, tiny_model_path, extra,
                                                            words):
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config(tiny_model_path) + extra)
    r = subprocess.run([sys.executable, "-m", "llm_residentd", "--config", str(cfg),
                        "--check-config"], capture_output=True, text=True)
    assert r.returncode == 2 and words in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["-1", "1025", '"2"'])
def test_a_threads_count_out_of_range_is_a_config_error(tmp_path, tiny_model_path, value):
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config(tiny_model_path).replace("threads = 1", f"threads = {value}"))
    r = subprocess.run([sys.executable, "-m", "llm_residentd", "--config", str(cfg),
                        "--check-config"], capture_output=True, text=True)
    assert r.returncode == 2 and "models.tiny.threads: " in r.stderr, r.stderr
