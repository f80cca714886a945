"""`llmctl models add/remove` under real systemd, with the workers running as
daemon.worker_user: the file check is that user's, an added model's worker runs as it in
a scope of llm.slice, and a removal drains, then releases the scope."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from guestlib import GuestDaemon, config, llm_scopes, wait_for

NOBODY = 65534


def _uid(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                if x.startswith("Uid:"))
    return int(line.split()[1])


def test_models_add_as_the_workers_user_and_remove(tmp_path, tiny_model):
    top = Path("/srv/llm-models-admin")
    private = top / "private"
    private.mkdir(parents=True, mode=0o700)
    top.chmod(0o755)
    model = private / "extra.gguf"
    shutil.copyfile(tiny_model, model)
    model.chmod(0o644)
    tiny_model.chmod(0o644)
    cfg = config(tiny_model).replace("[daemon]\n", '[daemon]\nworker_user = "nobody"\n', 1)
    d = GuestDaemon(tmp_path / "d", cfg).start()
    try:
        assert _uid(d.worker("tiny-0")["pid"]) == NOBODY
        r = d.ctl("models", "add", "extra", "--path", str(model), "--n-ctx", "256", check=False)
        assert r.returncode == 1, r
        assert (f"not readable by the workers' user 'nobody': directory {private} (mode "
                "drwx------, owner 0:0) may not be searched by uid 65534 gid 65534 "
                "(bad_request)") in r.stderr, r.stderr
        assert [m["name"] for m in d.call("models")["models"]] == ["tiny"]

        private.chmod(0o755)
        out = d.ctl("models", "add", "extra", "--path", str(model), "--n-ctx", "256").stdout
        assert out.startswith("added extra: "), out
        d.ctl("load", "extra", "--timeout", "240", timeout=260)  # not first: on demand
        assert _uid(d.worker("extra-0")["pid"]) == NOBODY
        assert "llm-extra-0.scope" in llm_scopes()
        r = d.ctl("submit", "-m", "extra", "-n", "4", "--json", "hello")
        assert json.loads(r.stdout.splitlines()[-1])["event"] == "done", r.stdout

        d.ctl("models", "remove", "extra")
        wait_for(lambda: "llm-extra-0.scope" not in llm_scopes(), 60, "extra's scope released")
        # The scope turns inactive as its worker exits, a moment before the daemon has
        # released it and forgotten the model.
        wait_for(lambda: [m["name"] for m in d.call("models")["models"]] == ["tiny"], 30,
                 "extra gone from models")
        assert "llm-tiny-0.scope" in llm_scopes()
    finally:
        d.stop()
        shutil.rmtree(top, ignore_errors=True)
