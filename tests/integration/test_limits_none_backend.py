"""Limits and PSI on a machine without systemd or cgroup2 (this host): clear errors.

The real scopes, limits and triggers are proven in the systemd guest (tests/vm).
"""

from __future__ import annotations

import json


def test_limits_show_and_refuse_on_the_none_backend(tiny_daemon):
    r = tiny_daemon.llmctl("limits", "tiny", "--json")
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["backend"] == "none" and reply["limits"]["cpu"] == "max"
    r = tiny_daemon.llmctl("limits", "tiny", "--cpu", "50%")
    assert r.returncode == 1 and "scope_error" in r.stderr and "none backend" in r.stderr
    r = tiny_daemon.llmctl("limits", "tiny")
    assert "cpu max" in r.stdout  # nothing changed


def test_bad_limits_change_nothing(tiny_daemon):
    for args, words in ((["--cpu", "0%"], "between 1%"), (["--cpu", "abc"], "percentage"),
                        (["--memory-high", "1K"], "at least 16M"),
                        (["--memory-high", "2G", "--memory-max", "1G"], "above memory_max")):
        r = tiny_daemon.llmctl("limits", "tiny", *args)
        assert r.returncode == 1 and "bad_request" in r.stderr and words in r.stderr, r.stderr
    r = tiny_daemon.llmctl("limits", "nope", "--cpu", "50%")
    assert r.returncode == 1 and "no_such_model" in r.stderr


def test_status_reports_backend_and_system_pressure(tiny_daemon):
    st = json.loads(tiny_daemon.llmctl("status", "--json").stdout)
    assert st["daemon"]["backend"] == "none"
    (worker,) = st["workers"]
    assert worker["backend"] == "none" and worker["unit"] is None and worker["cgroup"] is None
    assert st["pressure"]["system"]["cpu"]["some"]["total"] >= 0
    assert st["pressure"]["outside"] == {}  # no worker cgroup to be outside of
    # This host's kernel refuses PSI triggers: the daemon says so and keeps serving.
    refused = [e for e in tiny_daemon.logs() if e.get("event") == "psi_trigger_unavailable"]
    armed = st["pressure"]["triggers"]
    assert refused or armed, "PSI triggers neither armed nor reported as unavailable"
    tiny_daemon.assert_serving()
