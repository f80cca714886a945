"""The policy engine in a real daemon: third-party policies, admission, errors, live changes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from harness import read_until_done, running, tiny_config, wait_for
from llm_residentd.wire.protocol import recv_frame, send_frame

THIRD_PARTY = '''
from llm_residentd.policies import Admit, Defer, Finished, Param, Policy, ShrinkKv, Started, TrimKv


class Hold(Policy):
    """hold: defers every queued request while hold is true (a test policy)."""
    name = "hold"
    params = {"hold": Param(bool, True, "keep requests back")}

    def on_event(self, event, snap):
        action = Defer if self.settings["hold"] else Admit
        return [action(r.id, reason="test hold") for r in snap.queued]


class KvTest(Policy):
    """kvtest: trims the cache of a request as it starts, shrinks the context after it."""
    name = "kvtest"
    params = {"keep": Param(int, 4, "first tokens kept"), "n_ctx": Param(int, 128, "shrink to")}

    def on_event(self, event, snap):
        s = self.settings
        if isinstance(event, Started):
            return [TrimKv(snap.workers[0].name, keep=s["keep"], tail=8, min_prune=4)]
        if isinstance(event, Finished):
            return [ShrinkKv(snap.workers[0].name, s["n_ctx"])]
        return []


class Faulty(Policy):
    """faulty: raises on its second event (a test policy)."""
    name = "faulty"
    seen = 0

    def on_event(self, event, snap):
        self.seen += 1
        if self.seen > 1:
            raise RuntimeError("boom")
        return []
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A package that adds policies through the entry-point group, as a user's would."""
    site = tmp_path / "site"
    dist = site / "llmtest_policies-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "llmtest_policies.py").write_text(THIRD_PARTY)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmtest-policies\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[llm_residentd.policies]\n"
                                           "hold = llmtest_policies:Hold\n"
                                           "faulty = llmtest_policies:Faulty\n"
                                           "kvtest = llmtest_policies:KvTest\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site


def test_a_policy_defers_admits_and_times_out_deferred_requests(start_daemon, tiny_model_path,
                                                                 third_party):
    d = start_daemon(tiny_config(tiny_model_path) + '\n[[policies]]\nname = "hold"\n')
    sock = d.raw()
    send_frame(sock, {"id": "t", "op": "submit", "prompt": "hi", "max_tokens": 2, "timeout": 0.5})
    (_, error) = read_until_done(sock, 1)
    assert error["error"]["code"] == "deferred_timeout"
    send_frame(sock, {"id": "h", "op": "submit", "prompt": "hi", "max_tokens": 2})
    rid = recv_frame(sock)["request"]
    wait_for(lambda: rid in json.loads(d.llmctl("policy", "list", "--json").stdout)["deferred"],
             what="the request to be held")
    assert d.status()["workers"][0]["state"] == "idle"  # held back, not running
    r = d.llmctl("policy", "set", "hold", "hold=false")
    assert r.returncode == 0 and "hold=False" in r.stdout
    frames = read_until_done(sock, 1)
    assert frames[-1]["event"] == "done" and frames[-1]["request"] == rid
    events = json.loads(d.llmctl("events", "--json").stdout)
    assert {("defer", rid), ("admit", rid)} <= {(e["action"], e["target"]) for e in events}


def test_a_failing_policy_is_disabled_and_the_daemon_serves(start_daemon, tiny_model_path,
                                                            third_party):
    d = start_daemon(tiny_config(tiny_model_path) + '\n[[policies]]\nname = "faulty"\n')
    d.assert_serving()
    listing = json.loads(d.llmctl("policy", "list", "--json").stdout)
    assert "faulty" not in listing["enabled"] and "boom" in listing["disabled"]["faulty"]
    assert "boom" in d.llmctl("policy", "list").stdout
    disabled = [e for e in d.logs() if e.get("event") == "policy_disabled"]
    assert disabled and disabled[0]["policy"] == "faulty"
    d.assert_serving()


def test_static_policy_on_the_none_backend_reports_why_it_failed(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path) + '\n[[policies]]\nname = "static"\ncpu = "50%"\n')
    events = wait_for(lambda: [e for e in json.loads(d.llmctl("events", "--json").stdout)
                               if e["action"] == "set_limits"], what="a set_limits event")
    (e,) = events
    assert e["policy"] == "static" and e["target"] == "tiny" and "scope_error" in e["result"]
    d.assert_serving()


def test_policy_show_set_and_bad_values(tiny_daemon):
    r = tiny_daemon.llmctl("policy", "show", "psi-admission")
    assert r.returncode == 0 and "defer_above" in r.stdout and "6.8" in r.stdout
    r = tiny_daemon.llmctl("policy", "set", "psi-admission", "defer_above=150")
    assert r.returncode == 1 and "above the maximum" in r.stderr
    assert "psi-admission" not in json.loads(
        tiny_daemon.llmctl("policy", "list", "--json").stdout)["enabled"]
    r = tiny_daemon.llmctl("policy", "set", "psi-admission", "defer_above=55")
    assert r.returncode == 0 and "defer_above=55.0" in r.stdout
    r = tiny_daemon.llmctl("policy", "set", "nope", "x=1")
    assert r.returncode == 1 and "no policy 'nope'" in r.stderr
    r = tiny_daemon.llmctl("policy", "set", "psi-admission", "colour=red")
    assert r.returncode == 1 and "no parameter 'colour'" in r.stderr
    tiny_daemon.assert_serving()


@pytest.mark.parametrize("table, words", [
    ('name = "nope"', "policies[0].name: no policy 'nope'"),
    ('name = "psi-admission"\ndefer_above = 400', "policies[0] (psi-admission): defer_above"),
    ('name = "static"\ncpu = "banana"', "policies[0] (static): cpu 'banana': use a percentage"),
])
def test_bad_policy_config_stops_the_daemon_naming_the_key(tmp_path, tiny_model_path, table,
                                                           words):
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config(tiny_model_path) + f"\n[[policies]]\n{table}\n")
    r = subprocess.run([sys.executable, "-m", "llm_residentd", "--config", str(cfg),
                        "--check-config"], capture_output=True, text=True)
    assert r.returncode == 2 and words in r.stderr


def test_sjf_runs_the_short_job_before_an_earlier_long_one(start_daemon, tiny_model_path):
    d = start_daemon(tiny_config(tiny_model_path, n_ctx=4096) + '\n[[policies]]\nname = "sjf"\n')
    sock = d.raw()
    send_frame(sock, {"id": "b", "op": "submit", "prompt": "go", "max_tokens": 3000,
                      "ignore_eos": True})
    blocker = recv_frame(sock)["request"]
    wait_for(lambda: running(d.status()) == [blocker], what="blocker running")
    ids = {}
    for name, n in (("long", 400), ("short", 2)):
        send_frame(sock, {"id": name, "op": "submit", "prompt": "go", "max_tokens": n,
                          "ignore_eos": True})
        while (msg := recv_frame(sock)).get("id") != name:
            pass
        ids[name] = msg["request"]
    queued = wait_for(lambda: (q := d.status()["models"]["tiny"]["queued"]) and len(q) == 2
                      and q, what="both queued")
    assert queued == [ids["short"], ids["long"]]  # FIFO would be long first
    send_frame(sock, {"id": "c", "op": "cancel", "request": blocker})
    frames = read_until_done(sock, 3)
    done = [f["request"] for f in frames if f.get("event") == "done"]
    assert done == [ids["short"], ids["long"]]


def test_kv_actions_reach_the_worker_and_its_report_is_recorded(start_daemon, tiny_model_path,
                                                                third_party):
    config = tiny_config(tiny_model_path, n_ctx=512).replace("max_tokens = 16",
                                                             "max_tokens = 400")
    d = start_daemon(config + '\n[[policies]]\nname = "kvtest"\n')
    with d.client() as c:
        stream = c.submit("tell me a story " * 12, max_tokens=300, ignore_eos=True, raw=True)
        text = "".join(stream.text())
    assert stream.stats["completion_tokens"] == 300 and text
    wait_for(lambda: len([e for e in json.loads(d.llmctl("events", "--json").stdout)
                          if e["values"].get("ms") is not None]) == 2, what="two KV reports")
    events = [e for e in json.loads(d.llmctl("events", "--json").stdout)
              if e["policy"] == "kvtest"]  # not the lifecycle's load
    asked = [(e["action"], e["result"]) for e in events if "ms" not in e["values"]]
    assert asked == [("trim_kv", "asked"), ("shrink_kv", "asked")]
    trim, shrink = [e for e in events if "ms" in e["values"]]
    assert trim["policy"] == "kvtest" and trim["result"].startswith("trimmed"), trim
    assert trim["values"]["tokens_after"] == 4 + 8 and trim["values"]["tokens_before"] >= 40
    assert shrink["result"] == "n_ctx 512 -> 128" and shrink["values"]["n_ctx"] == 128
    assert d.status()["workers"][0]["n_ctx"] == 128


def test_a_kv_action_with_bad_values_disables_its_policy(start_daemon, tiny_model_path,
                                                         third_party):
    config = tiny_config(tiny_model_path).replace("max_tokens = 16", "max_tokens = 200")
    d = start_daemon(config + '\n[[policies]]\nname = "kvtest"\nkeep = -5\n')
    with d.client() as c:
        assert "".join(c.submit("hi", max_tokens=100, ignore_eos=True).text())
    listing = json.loads(d.llmctl("policy", "list", "--json").stdout)
    assert "keep=-5" in listing["disabled"]["kvtest"]
    d.assert_serving()
