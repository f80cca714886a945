"""The reload diff: which models start, drain, restart or change live, which daemon keys
need a restart, which policies change (daemon/core/reload.py; applying it is tested for real in
tests/integration/test_reload.py)."""

from __future__ import annotations

import dataclasses

import pytest
from llm_residentd.catalog import config
from llm_residentd.catalog.config import ConfigError, parse
from llm_residentd.core import reload


def _cfg(models: str, daemon: str = "", policies: str = "") -> config.Config:
    import tomllib

    return parse(tomllib.loads(f"[daemon]\n{daemon}\n{models}\n{policies}"), "test")


A = '[models.a]\npath = "/m/a.gguf"\n'
B = '[models.b]\npath = "/m/b.gguf"\n'


def test_the_same_config_changes_nothing():
    d = reload.diff(_cfg(A + B), _cfg(A + B))
    assert d == reload.Diff()
    assert d.changed == ()


def test_models_added_and_removed():
    d = reload.diff(_cfg(A), _cfg(B))
    assert d.added == ("b",) and d.removed == ("a",)
    assert d.restarted == () and d.retuned == {}


@pytest.mark.parametrize("line", ["n_ctx = 512", "workers = 2", "threads = 3",
                                  "flash_attn = false", "seed = 7", "chat_template = false",
                                  "parallel = 8", 'cache_type_k = "q8_0"',
                                  'cache_type_v = "q4_0"'])
def test_load_settings_restart_the_workers(line):
    d = reload.diff(_cfg(A + B), _cfg(A + line + "\n" + B))
    assert d.restarted == ("a",) and d.changed == ("a",)
    assert d.added == d.removed == ()


def test_another_model_file_restarts_the_workers():
    d = reload.diff(_cfg(A), _cfg(A.replace("a.gguf", "other.gguf")))
    assert d.restarted == ("a",)


@pytest.mark.parametrize(("line", "key"), [('cpu = "50%"', "cpu"), ('memory_high = "1G"', "memory_high"),
                                           ("max_queue = 3", "max_queue"), ("max_tokens = 9", "max_tokens"),
                                           ("cpu_weight = 50", "cpu_weight")])
def test_live_settings_change_without_a_restart(line, key):
    d = reload.diff(_cfg(A), _cfg(A + line + "\n"))
    assert d.restarted == () and d.retuned == {"a": (key,)} and d.changed == ("a",)


def test_a_model_with_both_kinds_of_change_restarts_and_retunes():
    d = reload.diff(_cfg(A), _cfg(A + 'n_ctx = 512\ncpu = "1"\n'))
    assert d.restarted == ("a",) and d.retuned == {"a": ("cpu",)}


def test_needs_restart_compares_load_settings_only():
    a = _cfg(A).models["a"]
    assert not reload.needs_restart(a, dataclasses.replace(a, max_queue=2, cpu="1"))
    assert reload.needs_restart(a, dataclasses.replace(a, n_ctx=128))


def test_daemon_keys_live_or_needing_a_restart():
    old = _cfg(A)
    new = _cfg(A, daemon='socket = "/tmp/other.sock"\nbackend = "none"\nhello_timeout = 3\n'
                         'socket_mode = "0600"\nclient_buffer = 100000\nslice = "x.slice"')
    d = reload.diff(old, new)
    assert set(d.daemon_restart) == {"socket", "backend", "socket_mode", "slice"}
    assert set(d.daemon_live) == {"hello_timeout", "client_buffer"}
    eff = reload.effective(old, new, d)
    # What runs keeps the old socket and backend; the live keys take the new values.
    assert eff.daemon.socket == old.daemon.socket and eff.daemon.backend == "auto"
    assert eff.daemon.socket_mode == "0660" and eff.daemon.slice == "llm.slice"
    assert eff.daemon.hello_timeout == 3.0 and eff.daemon.client_buffer == 100000
    assert eff.models == new.models


def test_every_daemon_key_is_classified():
    """A daemon key is live only if listed; any other change is reported as needing a restart."""
    names = {f.name for f in dataclasses.fields(config.DaemonConfig)}
    assert set(reload.LIVE_DAEMON_KEYS) <= names
    assert set(reload.LIVE_MODEL_FIELDS) <= {f.name for f in dataclasses.fields(config.ModelConfig)}


def test_policies_changed_added_and_removed():
    p_old = '[[policies]]\nname = "static"\n[[policies]]\nname = "sjf"\n'
    p_new = '[[policies]]\nname = "static"\ncpu = "50%"\n[[policies]]\nname = "priority"\n'
    d = reload.diff(_cfg(A, policies=p_old), _cfg(A, policies=p_new))
    assert d.policies == ("priority", "sjf", "static")
    assert reload.diff(_cfg(A, policies=p_old), _cfg(A, policies=p_old)).policies == ()


def test_the_key_of_a_config_error():
    with pytest.raises(ConfigError) as exc:
        _cfg('[models.a]\npath = "/m/a.gguf"\nn_ctx = "big"\n')
    assert reload._key(f"/etc/x.toml: {exc.value}") == "models.a.n_ctx"
    assert reload._key("/etc/x.toml: not valid TOML: oops") is None
    assert reload._key("/etc/x.toml: No such file or directory") is None


def test_http_settings_need_a_restart():
    """The HTTP sockets are bound at start: a reload keeps the running [http]."""
    models = {"m": {"path": "/x.gguf"}}
    old = parse({"models": models}, "old")
    new = parse({"http": {"listen": "127.0.0.1:11435", "max_body": 4096}, "models": models},
                "new")
    running = reload.effective(old, new, reload.diff(old, new))
    assert running.http == old.http and running.http.listen == ""
