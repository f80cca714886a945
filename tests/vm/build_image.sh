#!/usr/bin/env bash
# Build (once per change) the Debian bookworm guest image used by tests/vm/guest.py.
#
# Usage: tests/vm/build_image.sh          -> prints the image directory on stdout
# The image lives in $LLM_VM_CACHE/<key>/ (default ~/.cache/llm-residentd/vm), where <key> hashes
# this script and the names of the llama-cpp-python and msgspec wheels. It holds rootfs.img,
# vmlinuz, initrd.img and build.log. Needs root; installs qemu-system-x86 and mmdebstrap with apt-get when missing.
# The hook subcommands (essential, customize) are called back by mmdebstrap, not by people.
set -euo pipefail

SELF="$(readlink -f "$0")"
WHEELS="${LLM_WHEELS:-$HOME/.cache/llm-residentd/wheels}"
CACHE="${LLM_VM_CACHE:-$HOME/.cache/llm-residentd/vm}"
SOURCES="${LLM_VM_SOURCES:-/etc/apt/sources.list.d/debian.sources}"
IMAGE_SIZE=3G
PACKAGES=(
  systemd systemd-sysv dbus udev kmod linux-image-amd64 initramfs-tools zstd
  python3 python3-pystemd python3-msgpack python3-structlog python3-psutil python3-prometheus-client
  python3-numpy python3-typing-extensions python3-diskcache python3-jinja2 python3-pytest
  python3-aiohttp
  libgomp1 stress-ng iproute2 procps
)

log() { echo "build_image: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- host side

find_wheel() {
  local found=("$WHEELS"/llama_cpp_python-0.3.36-*.whl)
  [[ -f "${found[0]}" ]] || die "no llama_cpp_python-0.3.36-*.whl in $WHEELS: run 'make install' first, it builds it"
  echo "${found[0]}"
}

find_msgspec_wheel() {  # Debian bookworm has no python3-msgspec; `make install` fetches this wheel
  local found=("$WHEELS"/msgspec-*-cp311-cp311-manylinux*_x86_64.whl)
  [[ -f "${found[0]}" ]] || die "no msgspec-*-cp311-*.whl in $WHEELS: run 'make install' first, it fetches it"
  echo "${found[-1]}"
}

image_key() {  # hash of this script and the wheels' names
  { cat "$SELF"; basename "$1"; basename "$2"; } | sha256sum | cut -c1-16
}

image_complete() {
  [[ -f "$1/rootfs.img" && -f "$1/vmlinuz" && -f "$1/initrd.img" ]]
}

ensure_tools() {  # $1 = 1 if the image must be built (mmdebstrap needed)
  local missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  [[ "$1" == 1 ]] && ! command -v mmdebstrap >/dev/null && missing+=(mmdebstrap)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $EUID -eq 0 ]] || die "need root to apt-get install ${missing[*]}"
  log "installing ${missing[*]}"
  local t0=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  local aptlog
  aptlog="$(mktemp /tmp/llm-vm-apt-XXXXXX.log)"
  { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; } >"$aptlog" 2>&1 \
    || { tail -n 30 "$aptlog" >&2; die "apt-get install ${missing[*]} failed (log: $aptlog)"; }
  rm -f "$aptlog"
  log "PHASE tools $((SECONDS - t0)) s"
}

BUILD_TMP=""
build_failed() {  # keep the log: the EXIT trap removes the build directory
  cp "$BUILD_TMP/build.log" "$CACHE/failed-build.log" 2>/dev/null || true
  die "$1 failed (log: $CACHE/failed-build.log)"
}

build() {  # $1 = final directory, $2 = llama wheel, $3 = msgspec wheel; builds in a temp dir, then renames it
  local final="$1" tmp
  tmp="$(mktemp -d "$CACHE/.build-XXXXXX")"
  BUILD_TMP="$tmp"
  trap 'rm -rf --one-file-system "$BUILD_TMP"' EXIT  # never follow a mount a failed mmdebstrap left
  [[ -r "$SOURCES" ]] || die "apt sources file $SOURCES not found"
  export LLM_VM_WHEEL="$2" LLM_VM_MSGSPEC_WHEEL="$3"  # hooks see only exported variables
  local t0=$SECONDS
  log "mmdebstrap into $tmp/rootfs (log: $tmp/build.log)"
  mmdebstrap --mode=root --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --essential-hook="\"$SELF\" essential \"\$1\"" \
    --customize-hook="\"$SELF\" customize \"\$1\"" \
    bookworm "$tmp/rootfs" "$SOURCES" >"$tmp/build.log" 2>&1 \
    || { tail -n 40 "$tmp/build.log" >&2; build_failed mmdebstrap; }
  log "PHASE mmdebstrap $((SECONDS - t0)) s"
  t0=$SECONDS
  cp "$(ls "$tmp"/rootfs/boot/vmlinuz-* | head -n1)" "$tmp/vmlinuz"
  cp "$(ls "$tmp"/rootfs/boot/initrd.img-* | head -n1)" "$tmp/initrd.img"
  mke2fs -q -t ext4 -L root -d "$tmp/rootfs" "$tmp/rootfs.img" "$IMAGE_SIZE" >>"$tmp/build.log" 2>&1 \
    || build_failed mke2fs
  rm -rf --one-file-system "$tmp/rootfs"
  log "PHASE mke2fs $((SECONDS - t0)) s"
  rm -rf --one-file-system "$final"  # an incomplete leftover; we hold the lock
  mv -T "$tmp" "$final"
  trap - EXIT
  rm -rf --one-file-system "$tmp"
}

main() {
  local wheel msgspec key final t0=$SECONDS
  wheel="$(find_wheel)"
  msgspec="$(find_msgspec_wheel)"
  key="$(image_key "$wheel" "$msgspec")"
  final="$CACHE/$key"
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9  # one builder at a time; the others then find the finished image
  rm -rf --one-file-system "$CACHE"/.build-*  # left by a killed build; we hold the lock
  if image_complete "$final"; then
    ensure_tools 0
  else
    ensure_tools 1
    build "$final" "$wheel" "$msgspec"
    log "PHASE total $((SECONDS - t0)) s"
  fi
  echo "$final"
}

# ---------------------------------------------------------------- mmdebstrap hooks (run on the host, $1 = rootfs)

hook_essential() {  # before the kernel is installed: a small initrd that only mounts a virtio ext4 root
  mkdir -p "$1/etc/initramfs-tools/conf.d"
  printf 'MODULES=list\nCOMPRESS=zstd\n' >"$1/etc/initramfs-tools/conf.d/llm-guest.conf"
  printf 'virtio_pci\nvirtio_blk\next4\n' >>"$1/etc/initramfs-tools/modules"
}

install_wheel() {  # $2 = wheel, $3 = its package; unzip only the package and its metadata,
  # then byte-compile (disk is -snapshot)
  cp "$2" "$1/tmp/pkg.whl"
  chroot "$1" python3 - "$3" <<'EOF'
import compileall, sys, zipfile
pkg = sys.argv[1]
dest = f"/usr/local/lib/python3.{sys.version_info[1]}/dist-packages"
with zipfile.ZipFile("/tmp/pkg.whl") as whl:
    names = [n for n in whl.namelist() if n.startswith((f"{pkg}/", f"{pkg}-", f"{pkg}_python-"))]
    whl.extractall(dest, names)
compileall.compile_dir(f"{dest}/{pkg}", quiet=1)
EOF
  rm "$1/tmp/pkg.whl"
}

write_guest_config() {
  echo llm-guest >"$1/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 llm-guest\n' >"$1/etc/hosts"
  mkdir -p "$1/share" "$1/proj"
  local opts=trans=virtio,version=9p2000.L,msize=524288
  cat >"$1/etc/fstab" <<EOF
/dev/vda / ext4 rw,errors=remount-ro 0 1
share /share 9p $opts,rw 0 0
proj /proj 9p $opts,ro,nofail 0 0
EOF
  printf '9pnet_virtio\n9p\n' >"$1/etc/modules-load.d/llm-guest-9p.conf"
  # Drivers udev would load for emulated hardware nobody uses (slow under TCG, noisy on the console).
  printf 'blacklist %s\n' floppy pcspkr psmouse kvm_amd kvm_intel kvm powernow_k8 \
    >"$1/etc/modprobe.d/llm-guest-blacklist.conf"
}

write_runner() {  # /usr/local/sbin/llm-guest-runner and its unit; see guest.py for the protocol
  cat >"$1/usr/local/sbin/llm-guest-runner" <<'EOF'
#!/bin/bash
# Run /share/run.sh once, keep its output in /share/output.log and exit code in /share/rc, power off.
say() { echo "llm-guest-runner: $* uptime=$(cut -d' ' -f1 /proc/uptime)" >/dev/console; }
say "START"
if mountpoint -q /share && [ -f /share/run.sh ]; then
  cd /share
  bash /share/run.sh 2>&1 </dev/null | tee /share/output.log >/dev/console
  rc=${PIPESTATUS[0]}
  echo "$rc" >/share/rc.tmp && mv /share/rc.tmp /share/rc
  say "DONE rc=$rc"
else
  say "NO-RUN-SH /share is not mounted or has no run.sh"
fi
sync
poweroff -f
EOF
  chmod 755 "$1/usr/local/sbin/llm-guest-runner"
  cat >"$1/etc/systemd/system/llm-guest-runner.service" <<'EOF'
[Unit]
Description=Run /share/run.sh for the host test harness, then power off
Wants=share.mount
After=multi-user.target share.mount dbus.service

[Service]
Type=simple
ExecStart=/usr/local/sbin/llm-guest-runner

[Install]
WantedBy=multi-user.target
EOF
  mkdir -p "$1/etc/systemd/system/multi-user.target.wants"
  ln -sf /etc/systemd/system/llm-guest-runner.service \
    "$1/etc/systemd/system/multi-user.target.wants/llm-guest-runner.service"
}

mask_units() {  # nothing logs in, and timers would only add TCG noise
  local unit
  for unit in serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer; do
    ln -sf /dev/null "$1/etc/systemd/system/$unit"
  done
}

hook_customize() {
  install_wheel "$1" "$LLM_VM_WHEEL" llama_cpp
  install_wheel "$1" "$LLM_VM_MSGSPEC_WHEEL" msgspec
  write_guest_config "$1"
  write_runner "$1"
  mask_units "$1"
}

case "${1:-}" in
  essential) hook_essential "$2" ;;
  customize) hook_customize "$2" ;;
  "") main ;;
  *) die "unknown subcommand $1" ;;
esac
