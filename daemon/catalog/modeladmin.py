"""Models added and removed at run time (`llmctl models add/remove`): the checks a new
model passes before the daemon takes it, and the overlay a reload of the config file
keeps (reload.Reloader applies both; this module decides nothing about workers)."""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ..placement.users import run_as
from ..wire.protocol import ProtocolError
from . import modelsource
from .config import Config, ConfigError, ModelConfig, model_from_table

log = structlog.get_logger()


def build(name: str, path: str, options: dict[str, Any]) -> ModelConfig:
    """The model as the config file would give it; bad_request names the key at fault."""
    for key in ("path", "package"):
        if key in options:
            raise ProtocolError("bad_request", f"options.{key}: give the file as the path "
                                "field, not as an option")
    if not os.path.isabs(path):
        raise ProtocolError("bad_request", f"path {path!r} is not absolute (the daemon does "
                            "not share the client's working directory)")
    try:
        return model_from_table(name, {"path": path, **options})
    except ConfigError as exc:
        raise ProtocolError("bad_request", str(exc)) from None


def _may(st: os.stat_result, uid: int, gid: int, bit: int) -> bool:
    """The kernel's mode-bit check (ACLs aside): the owner's bits for the owner, else the
    group's for its group, else the others'."""
    if st.st_uid == uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == gid:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def unreadable_by(path: Path, uid: int, gid: int) -> str | None:
    """Why uid:gid (a worker: no supplementary groups) cannot read path, or None if it
    can: each directory on the way, as given and with symlinks resolved, needs x, the
    file r. Mode bits only: an ACL that grants more is not seen (the load then tells)."""
    if uid == 0:
        return None
    dirs = {*Path(path).parents, *path.resolve().parents}
    for d in sorted(dirs, key=lambda p: len(p.parts)):
        try:
            st = d.stat()
        except OSError as exc:
            return f"{d}: {exc.strerror}"
        if not _may(st, uid, gid, stat.S_IXOTH):
            return f"directory {d} (mode {stat.filemode(st.st_mode)}, owner {st.st_uid}:" \
                   f"{st.st_gid}) may not be searched by uid {uid} gid {gid}"
    st = path.stat()
    if not _may(st, uid, gid, stat.S_IROTH):
        return f"{path} (mode {stat.filemode(st.st_mode)}, owner {st.st_uid}:{st.st_gid}) " \
               f"may not be read by uid {uid} gid {gid}"
    return None


def check_file(path: Path, worker_user: str) -> None:
    """bad_request unless path is a GGUF file that the workers' user may read (the
    daemon reads it to check, but a root daemon's workers run as daemon.worker_user)."""
    if not path.is_file():
        if path.exists():
            raise ProtocolError("bad_request", f"{path}: not a regular file")
        hidden = path.parts[1:2] in (("home",), ("root",)) or str(path).startswith("/run/user/")
        raise ProtocolError("bad_request", f"{path}: no such file" + (
            " (llm-residentd.service runs with ProtectHome=yes: /home, /root and /run/user "
            "are hidden from it)" if hidden else ""))
    try:
        modelsource.check_gguf(path)
    except modelsource.ModelUnavailable as exc:
        raise ProtocolError("bad_request", str(exc)) from None
    try:
        creds = run_as(worker_user)
    except KeyError:
        raise ProtocolError("bad_request", f"daemon.worker_user: no user {worker_user!r}") \
            from None
    if creds:
        why = unreadable_by(path, creds["user"], creds["group"])
        if why is not None:
            raise ProtocolError("bad_request", f"not readable by the workers' user "
                                f"{worker_user!r}: {why}")


@dataclass
class Overlay:
    """The run-time changes a reload of the config file keeps until the daemon restarts:
    models added (unless the file now has the name: the file wins), names removed."""

    added: dict[str, ModelConfig] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)

    def add(self, model: ModelConfig) -> None:
        self.added[model.name] = model
        self.removed.discard(model.name)

    def remove(self, name: str) -> None:
        self.added.pop(name, None)
        self.removed.add(name)

    def merge(self, loaded: Config) -> tuple[Config, tuple[str, ...]]:
        """loaded with the overlay applied, and the added names the file has now (the
        caller drops them with `forget` once the reload is applied)."""
        if not self.added and not self.removed:
            return loaded, ()
        models = {n: m for n, m in loaded.models.items() if n not in self.removed}
        taken = tuple(n for n in self.added if n in loaded.models)
        for name, model in self.added.items():
            models.setdefault(name, model)
        if not models:
            raise ConfigError("models: every model of the file was removed with `llmctl "
                              f"models remove` ({', '.join(sorted(self.removed))}); add one "
                              "back or restart the daemon")
        return dataclasses.replace(loaded, models=models), taken

    def forget(self, names: tuple[str, ...]) -> None:
        for name in names:
            log.info("runtime_model_replaced", model=name,
                     reason="the config file now has this model: its settings win")
            self.added.pop(name, None)
