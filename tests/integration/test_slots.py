"""Slots end to end (issue 14): one worker runs `parallel` requests at once, status and
llmctl show its slots, batch size and KV cells per request, a killed worker loses every
request in its slots and none of the queued ones, and priority preempts one sequence of
a full batch. A real daemon and worker with the generated tiny model."""

from __future__ import annotations

import json
import os
import re
import signal

from harness import read_until_done, running, submit_raw, tiny_config, wait_for
from llm_residentd.wire.protocol import recv_frame, send_frame

LONG = {"max_tokens": 3000, "ignore_eos": True}  # keeps a slot busy for a while



def test_four_requests_run_at_once_in_one_worker_and_a_fifth_waits(start_daemon,
                                                                   tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096, parallel=4))
    sock = d.raw()
    ids = [submit_raw(sock, f"s{i}", f"prompt number {i}", **LONG) for i in range(5)]
    st = wait_for(lambda: len(running(st := d.status())) == 4 and st, what="4 running")
    w = st["workers"][0]
    assert running(st) == ids[:4] and (w["slots"], w["slots_busy"], w["batch_limit"]) == (4, 4, 4)
    assert st["models"]["tiny"]["running"] == 4 and st["models"]["tiny"]["queued"] == [ids[4]]
    # The worker's Batch reports: steps holding several sequences, cells per sequence.
    st = wait_for(lambda: (s := d.status())["workers"][0]["batch"]["size"] is not None
                  and s["workers"][0]["batch"]["size"] > 1.5
                  and all(r["kv_cells"] for r in s["workers"][0]["requests"]) and s,
                  what="a batch report with 4 sequences")
    batch = st["workers"][0]["batch"]
    assert batch["steps"] > 0 and batch["sequences"] > batch["steps"] and batch["tokens"] > 0
    out = d.llmctl("status").stdout
    row = next(line for line in out.splitlines() if line.startswith("tiny-0"))
    assert "4/0" in row and re.search(rf"{ids[0]}:\d+ {ids[1]}:\d+ {ids[2]}:\d+ {ids[3]}:\d+", row)
    for rid in ids:
        send_frame(sock, {"id": f"c{rid}", "op": "cancel", "request": rid})
    frames = read_until_done(sock, 5)
    ends = {f["request"]: f["error"]["code"] for f in frames if f.get("event") == "error"}
    assert ends == dict.fromkeys(ids, "cancelled")
    wait_for(lambda: (w := d.status()["workers"][0])["state"] == "idle"
             and w["slots_busy"] == 0, what="the worker idle again")
    d.assert_serving()


def test_a_killed_worker_loses_every_running_request_and_none_queued(start_daemon,
                                                                    tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096, parallel=3))
    sock = d.raw()
    ids = [submit_raw(sock, f"s{i}", f"prompt {i}", **LONG) for i in range(3)]
    queued = submit_raw(sock, "q", "the last one", max_tokens=4)
    # Each running request has streamed a token: the kill fails them (no requeue).
    seen: set[str] = set()
    while seen != set(ids):
        msg = recv_frame(sock)
        if msg.get("event") == "token":
            seen.add(msg["request"])
    pid = d.status()["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    frames = read_until_done(sock, 4)
    errors = {f["request"]: f["error"] for f in frames if f.get("event") == "error"}
    assert set(errors) == set(ids)
    for err in errors.values():
        assert err["code"] == "worker_died" and f"(pid {pid}) killed by signal 9" in err["message"]
    (done,) = [f for f in frames if f.get("event") == "done"]
    assert done["request"] == queued  # it waited for the restarted worker
    w = wait_for(lambda: (w := d.status()["workers"][0])["state"] == "idle" and w,
                 what="restarted worker idle")
    assert w["pid"] != pid and w["restarts"] == 1 and w["requests"] == []
    assert d.status()["models"]["tiny"]["outcomes"] == {"worker_died": 3, "completed": 1}


def test_priority_preempts_one_sequence_only_when_no_slot_is_free(start_daemon,
                                                                  tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096, parallel=2,
                                 model_extra='[[policies]]\nname = "priority"\n'))
    sock = d.raw()
    low = submit_raw(sock, "low", "low priority", **LONG)
    wait_for(lambda: running(d.status()) == [low], what="the low one running")
    first = submit_raw(sock, "hi1", "a free slot", max_tokens=8, priority=5)  # takes the free slot
    frames = read_until_done(sock, 1)
    assert [f["request"] for f in frames if f.get("event") == "done"] == [first]
    assert not any(f.get("event") == "preempted" for f in frames)
    other = submit_raw(sock, "low2", "another low one", **LONG)
    wait_for(lambda: running(d.status()) == [low, other], what="both slots busy")
    urgent = submit_raw(sock, "hi2", "no free slot", max_tokens=8, priority=5)
    frames = read_until_done(sock, 1)
    (preempted,) = [f for f in frames if f.get("event") == "preempted"]
    assert preempted["request"] in (low, other)
    assert [f["request"] for f in frames if f.get("event") == "done"] == [urgent]
    kept = other if preempted["request"] == low else low
    assert kept in running(d.status())  # the other sequence went on
    for rid in (low, other):
        send_frame(sock, {"id": f"c{rid}", "op": "cancel", "request": rid})
    read_until_done(sock, 2)


def test_a_reload_that_changes_parallel_restarts_the_worker_with_the_new_slots(
        start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, parallel=1))
    old = d.status()["workers"][0]
    assert old["slots"] == 1 and d.status()["models"]["tiny"]["slots"] == 1
    d.config.write_text(tiny_config(tiny_model_path, parallel=3))
    d.proc.send_signal(signal.SIGHUP)
    w = wait_for(lambda: (w := d.status()["workers"][0])["slots"] == 3
                 and w["state"] == "idle" and w, what="the worker restarted with 3 slots")
    assert w["pid"] != old["pid"]
    assert d.status()["daemon"]["reload"]["changed"] == ["tiny"]
    assert [m["parallel"] for m in json.loads(d.llmctl("models", "--json").stdout)] == [3]
    d.assert_serving()


def test_a_timeout_a_disconnect_and_a_cancel_each_end_one_sequence_of_a_full_batch(
        start_daemon, tiny_model_path):
    """Per request as before batching: each ends its own slot, the fourth request in the
    same batch completes with every token, and the slots are free afterwards."""
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096, parallel=4))
    keeper, gone = d.raw(), d.raw()
    timed = submit_raw(keeper, "t", "one", timeout=1.0, **LONG)
    cancelled = submit_raw(keeper, "c", "two", **LONG)
    full = submit_raw(keeper, "f", "three", max_tokens=2000, ignore_eos=True)
    dropped = submit_raw(gone, "g", "four", **LONG)
    wait_for(lambda: len(running(d.status())) == 4, what="4 running")
    gone.close()  # the client goes away: its request is cancelled
    send_frame(keeper, {"id": "x", "op": "cancel", "request": cancelled})
    frames = read_until_done(keeper, 3)
    ends = {f["request"]: f for f in frames if f.get("event") in ("done", "error")}
    assert ends[timed]["error"]["code"] == "timeout", ends[timed]
    assert ends[cancelled]["error"]["code"] == "cancelled"
    assert ends[full]["event"] == "done" and ends[full]["stats"]["completion_tokens"] == 2000
    tokens = sum(f.get("tokens", 1) for f in frames
                 if f.get("event") == "token" and f["request"] == full)
    assert tokens == 2000
    finished = wait_for(lambda: {e["request"]: e for e in d.logs()
                                 if e.get("event") == "request_finished"
                                 and e["request"] == dropped} or None,
                        what="the dropped client's request ended")
    assert finished[dropped].get("code") == "cancelled", finished
    wait_for(lambda: (w := d.status()["workers"][0])["slots_busy"] == 0
             and w["state"] == "idle", what="every slot free")
    d.assert_serving()
