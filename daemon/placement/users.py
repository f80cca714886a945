"""Which user a worker process runs as (daemon.worker_user): the arguments that start it
so, for the workers and for the checks that the user may read a model's file."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any


def run_as(user: str) -> dict[str, Any]:
    """create_subprocess_exec arguments that start a worker as `user` (daemon.worker_user).

    Only a root daemon switches: empty `user`, a daemon that is not root or a root
    `user` give {} (the worker runs as the daemon). KeyError if the user does not exist.
    """
    if not user or os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(user)
    if pw.pw_uid == 0:
        return {}
    env = {**os.environ, "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "env": env}


def worker_dir(path: Path, user: str) -> None:
    """Make a directory the workers write (their prompt cache files): owned by `user`
    (daemon.worker_user) when the daemon switches to it, else by the daemon; mode 0700.
    OSError if it cannot be made or given away."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    creds = run_as(user)
    if creds:
        os.chown(path, creds["user"], creds["group"])
