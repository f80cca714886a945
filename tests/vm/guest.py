"""Run a shell command as root inside a real systemd guest (Debian bookworm under QEMU/TCG).

The image comes from build_image.sh (cached). Protocol with the image's llm-guest-runner unit:
the host writes SHARE/run.sh; the guest mounts SHARE at /share (9p, tag `share`) and the
project checkout read-only at /proj (tag `proj`), runs `bash /share/run.sh`, writes its
stdout+stderr to /share/output.log and the exit code to /share/rc, then `poweroff -f`.
The serial console goes to SHARE/serial.log with host timestamps, for debugging.

run.sh unzips a wheel of the project (built here into SHARE/pkg) into /opt/llm-residentd/site,
puts that directory on sys.path (PYTHONPATH and a .pth file, so services started through
systemd see it too) and adds `llm-residentd` and `llmctl` wrappers to /usr/local/bin.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = Path(__file__).resolve().with_name("build_image.sh")
PIP = REPO / ".venv" / "bin" / "pip"
GUEST_SITE = "/opt/llm-residentd/site"
KERNEL_ARGS = "console=ttyS0 root=/dev/vda rw panic=-1"
MARK_START, MARK_DONE, MARK_NO_RUN = (
    "llm-guest-runner: START", "llm-guest-runner: DONE", "llm-guest-runner: NO-RUN-SH")
# Copied for the wheel build; everything else in the checkout is left out.
COPY_IGNORE = (".venv", ".git", "build", "dist", "*.egg-info", ".pytest_cache", ".ruff_cache",
               "__pycache__", ".run", "bench")


class GuestError(RuntimeError):
    """The guest could not be prepared or started (image, tools, wheel)."""


@dataclasses.dataclass(frozen=True)
class GuestResult:
    returncode: int | None  # exit code of the command; None if the guest never reported one
    output: str  # the command's stdout+stderr (/share/output.log)
    serial_log: Path  # whole serial console, each line prefixed with host seconds since QEMU start
    timed_out: bool
    qemu_returncode: int | None
    phases: dict[str, float]  # seconds: boot (QEMU start -> runner start), run, poweroff, total

    def describe(self, tail: int = 40) -> str:
        """A summary for assertion messages; the serial tail when the command never finished."""
        phases = " ".join(f"{k}={v:.1f}s" for k, v in self.phases.items())
        lines = [self.verdict(), f"guest returncode={self.returncode} timed_out={self.timed_out} "
                 f"qemu_returncode={self.qemu_returncode} {phases}", f"serial log: {self.serial_log}"]
        if self.returncode is None:
            lines += ["--- serial console tail ---", *_tail(self.serial_log, tail)]
        return "\n".join(lines)

    def verdict(self) -> str:
        """One line naming the phase that went wrong."""
        started = "boot" in self.phases
        if self.returncode is not None:
            return f"the command exited with {self.returncode}"
        if self.timed_out:
            return ("timed out while the command ran" if started
                    else "timed out before the runner started: the guest hung while booting")
        if started:
            return "the runner started but wrote no exit code (is /share mounted read-write?)"
        return "the guest did not boot: QEMU failed to start or the kernel panicked (see the serial tail)"


def ensure_image(phases: dict[str, float] | None = None) -> Path:
    """Build or reuse the cached image (build_image.sh installs QEMU and mmdebstrap if missing).

    `phases`, if given, receives the script's measured phases (tools, mmdebstrap, mke2fs) in seconds.
    """
    proc = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False)
    sys.stderr.write(proc.stderr)  # pytest shows it with the test's captured output
    for line in proc.stderr.splitlines():  # "build_image: PHASE mmdebstrap 50 s"
        words = line.split()
        if phases is not None and len(words) == 5 and words[1] == "PHASE" and words[3].isdigit():
            phases[words[2]] = float(words[3])
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-30:])
        raise GuestError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}:\n{tail}")
    image = Path(proc.stdout.strip().splitlines()[-1])
    if not (image / "rootfs.img").is_file():
        raise GuestError(f"{BUILD_SCRIPT} printed {image}, which holds no rootfs.img")
    return image


def run_in_guest(command: str, share: Path, timeout: float, *, image: Path | None = None,
                 repo: Path = REPO, env: Mapping[str, str] | None = None,
                 project_wheel: bool = True) -> GuestResult:
    """Boot the guest, run `command` (bash, as root, cwd /share) and power off; kill QEMU after `timeout` s.

    Files the command needs beyond the project wheel must already be in `share` (seen as /share).
    With project_wheel=False the checkout is not installed (the Debian package tests install
    the .deb instead).
    """
    image = image or ensure_image()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise GuestError("qemu-system-x86_64 not found: run tests/vm/build_image.sh, which installs it")
    share = share.resolve()
    _clean_share(share)
    if project_wheel:
        build_project_wheel(share / "pkg", repo)
    (share / "run.sh").write_text(run_script(command, env or {}, project_wheel))
    return _boot(qemu_command(qemu, image, share, repo), share, timeout)


def build_project_wheel(dest: Path, repo: Path = REPO) -> Path:
    """Build the pure-Python project wheel into `dest` from a clean copy of the checkout."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llm-guest-src-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(repo, src, ignore=shutil.ignore_patterns(*COPY_IGNORE), symlinks=True)
        base = [str(PIP), "wheel", "-q", "--disable-pip-version-check", "--no-deps", "-w", str(dest)]
        # Offline first; setuptools 65 without the `wheel` package has no bdist_wheel, then let pip
        # fetch the build-system requirements from pyproject.toml.
        for extra in (["--no-build-isolation"], []):
            proc = subprocess.run([*base, *extra, str(src)], capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                break
        else:
            raise GuestError(f"pip wheel of {repo} failed:\n{proc.stdout}{proc.stderr}")
    wheels = sorted(dest.glob("llm_residentd-*.whl"))
    if len(wheels) != 1:
        raise GuestError(f"expected one llm_residentd wheel in {dest}, found {wheels}")
    return wheels[0]


def run_script(command: str, env: Mapping[str, str], project_wheel: bool = True) -> str:
    """The /share/run.sh text: install the staged wheel (if project_wheel), then run `command`."""
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    install = _INSTALL_WHEEL if project_wheel else ""
    return f"""#!/bin/bash
# Written by tests/vm/guest.py. Setup steps fail fast; the command's exit code is the script's.
set -eu
{install}export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LLM_GUEST=1 LLM_GUEST_SHARE=/share
{exports}echo "run.sh: setup done, uptime $(cut -d' ' -f1 /proc/uptime) s"
set +eu
{command}
"""


_INSTALL_WHEEL = f"""site={GUEST_SITE}
mkdir -p "$site"
python3 -m zipfile -e /share/pkg/llm_residentd-*.whl "$site"
for pydir in /usr/local/lib/python3*/dist-packages; do echo "$site" > "$pydir/llm-residentd.pth"; done
printf '#!/bin/sh\\nexec python3 -m llm_residentd "$@"\\n' > /usr/local/bin/llm-residentd
printf '#!/bin/sh\\nexec python3 -m llmctl "$@"\\n' > /usr/local/bin/llmctl
chmod 755 /usr/local/bin/llm-residentd /usr/local/bin/llmctl
export PYTHONPATH="$site"
"""


def qemu_command(qemu: str, image: Path, share: Path, repo: Path) -> list[str]:
    """QEMU/TCG arguments (KVM here is paravirtual and cannot run a stock kernel)."""
    ninep = "security_model=none"
    return [
        qemu, "-accel", "tcg,thread=multi,tb-size=512", "-cpu", "max", "-smp", "2", "-m", "2G",
        "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot", "-snapshot",
        "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"), "-append", KERNEL_ARGS,
        "-drive", f"file={image / 'rootfs.img'},if=virtio,format=raw,cache=unsafe",
        "-virtfs", f"local,path={share},mount_tag=share,{ninep}",
        "-virtfs", f"local,path={repo},mount_tag=proj,{ninep},readonly=on",
        "-device", "virtio-rng-pci",
    ]


def _clean_share(share: Path) -> None:
    share.mkdir(parents=True, exist_ok=True)
    for name in ("rc", "rc.tmp", "output.log", "run.sh", "serial.log"):
        (share / name).unlink(missing_ok=True)
    shutil.rmtree(share / "pkg", ignore_errors=True)


class _SerialReader(threading.Thread):
    """Copies QEMU's stdout (serial console + QEMU's own errors) to a file, noting marker times."""

    def __init__(self, proc: subprocess.Popen[bytes], path: Path, t0: float) -> None:
        super().__init__(daemon=True)
        self.proc, self.path, self.t0 = proc, path, t0
        self.marks: dict[str, float] = {}

    def run(self) -> None:
        assert self.proc.stdout is not None
        with self.path.open("w", encoding="utf-8") as log:
            for raw in self.proc.stdout:
                now = time.monotonic() - self.t0
                line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
                log.write(f"[{now:8.3f}] {line}\n")
                log.flush()
                for mark in (MARK_START, MARK_DONE, MARK_NO_RUN):
                    if mark in line:
                        self.marks.setdefault(mark, now)


def _boot(cmd: list[str], share: Path, timeout: float) -> GuestResult:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reader = _SerialReader(proc, share / "serial.log", t0)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    total = time.monotonic() - t0
    reader.join(timeout=10)
    return GuestResult(
        returncode=_read_rc(share / "rc"),
        output=_read_text(share / "output.log"),
        serial_log=share / "serial.log",
        timed_out=timed_out,
        qemu_returncode=None if timed_out else proc.returncode,
        phases=_phases(reader.marks, total),
    )


def _phases(marks: Mapping[str, float], total: float) -> dict[str, float]:
    phases: dict[str, float] = {}
    start, done = marks.get(MARK_START), marks.get(MARK_DONE)
    if start is not None:
        phases["boot"] = start
    if start is not None and done is not None:
        phases["run"] = done - start
        phases["poweroff"] = total - done
    phases["total"] = total
    return phases


def _read_rc(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _tail(path: Path, n: int) -> list[str]:
    return _read_text(path).splitlines()[-n:]


def main(argv: list[str]) -> int:
    """Manual use: python tests/vm/guest.py SHARE_DIR 'COMMAND' [TIMEOUT]."""
    if len(argv) not in (2, 3):
        print(main.__doc__, file=sys.stderr)
        return 2
    result = run_in_guest(argv[1], Path(argv[0]), float(argv[2]) if len(argv) == 3 else 900.0)
    print(result.output, end="" if result.output.endswith("\n") else "\n")
    print(result.describe(), file=sys.stderr)
    return result.returncode if result.returncode is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
