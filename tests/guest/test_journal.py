"""Native journal logging under real systemd: the daemon runs as a transient service whose
stderr is the journal, so it sends its events to journald with a PRIORITY and fields;
`journalctl -p err` shows a worker death and `journalctl REQUEST=r1` one request's lines."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from guestlib import sh, show, wait_for

UNIT = "llm-journal-test.service"
LONG = {"max_tokens": 3000, "ignore_eos": True}  # still running when its worker is killed


def entries(invocation: str, *match: str) -> list[dict]:
    """This run's journal entries (the daemon's: its invocation id), oldest first."""
    out = sh("journalctl", "--no-pager", "-o", "json", f"_SYSTEMD_INVOCATION_ID={invocation}",
             *match, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_events_reach_the_journal_with_priorities_and_fields(tmp_path: Path, tiny_model: Path):
    from llmctl.client import Client

    (tmp_path / "config.toml").write_text(
        f'[models.tiny]\npath = "{tiny_model}"\nn_ctx = 4096\nthreads = 1\n')
    sock = tmp_path / "llm.sock"
    sh("systemctl", "reset-failed", UNIT, check=False)
    # Type=notify: systemd-run returns once the daemon says READY=1. No --log-format:
    # auto must find that stderr is the journal stream. The project's site is on the
    # path of processes systemd starts (a .pth file, tests/vm/README.md).
    sh("systemd-run", f"--unit={UNIT}", "--property=Type=notify", "--collect",
       sys.executable, "-m", "llm_residentd", "--config", str(tmp_path / "config.toml"),
       "--socket", str(sock), "--backend", "systemd", "--log-level", "info", timeout=300)
    invocation = show(UNIT, "InvocationID")["InvocationID"]
    try:
        with Client(sock, timeout=300) as c:
            wait_for(lambda: c.status()["models"]["tiny"]["state"] == "ready", timeout=240,
                     what="model tiny ready")
            first = c.submit("hello", max_tokens=4)
            assert first.request == "r1"
            assert list(first.events())[-1]["event"] == "done"
            doomed = c.submit("tell me a long story", **LONG)
            events = doomed.events()
            assert next(events)["event"] == "token"
            pid = next(w["pid"] for w in c.status()["workers"] if w["name"] == "tiny-0")
            os.kill(pid, signal.SIGKILL)
            last = [e for e in events][-1]
            assert last["event"] == "error" and last["error"]["code"] == "worker_died", last
        r2 = doomed.request

        def errors() -> list[dict]:
            return entries(invocation, "-p", "err")

        (entry,) = wait_for(lambda: [e for e in errors() if e.get("REQUEST") == r2], timeout=30,
                            what=lambda: f"{r2} in journalctl -p err: {errors()}")
        assert entry["PRIORITY"] == "3" and entry["CODE"] == "worker_died"
        assert entry["EVENT"] == "request_finished" and entry["MODEL"] == "tiny"
        assert entry["SYSLOG_IDENTIFIER"] == "llm-residentd"
        assert entry["MESSAGE"].startswith(f"request_finished request={r2} outcome=worker_died")
        exits = [e for e in errors() if e.get("EVENT") == "worker_exited"]
        assert exits and exits[0]["WORKER"] == "tiny-0" and exits[0]["PRIORITY"] == "3"

        r1 = wait_for(lambda: [e for e in [entries(invocation, "REQUEST=r1")] if len(e) >= 2],
                      timeout=30, what="r1's lines")[0]
        assert [e["EVENT"] for e in r1] == ["request_accepted", "request_finished"]
        assert all(e["PRIORITY"] == "6" for e in r1) and r1[1]["OUTCOME"] == "completed"
        assert r1[0]["LLM_PRIORITY"] == "0"  # the request's priority, not the journal's
        # Nothing went the old way: no JSON line from this daemon in the journal.
        ours = [e for e in entries(invocation) if e.get("SYSLOG_IDENTIFIER") == "llm-residentd"]
        assert len(ours) > 5 and not [e for e in entries(invocation)
                                      if str(e.get("MESSAGE", "")).startswith('{"')]
    finally:
        sh("systemctl", "stop", UNIT, check=False)
        wait_for(lambda: show(UNIT, "ActiveState")["ActiveState"] in ("inactive", "failed", ""),
                 timeout=60, what=f"{UNIT} stopped")
