# shellcheck shell=bash
# Shared by build-userland.sh and run-in-userland.sh: paths, the per-architecture table, host
# tools (qemu-user-static, debootstrap), binfmt_misc registration and entering a userland.
# Sourced, never run. Nothing here changes what goes into a cached userland: that is recipe.sh,
# part of the cache key with the requirement file.

ARM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$ARM_DIR/../.." && pwd)
# Outside the repo, so a checkout stays small and CI can cache this one directory between runs.
CACHE_DIR=${EDGEFLEET_ARM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgefleet/arm}
# Where the agent's venv lives on the device (docs/packaging.md, "Tested on ARM").
AGENT_VENV=/opt/edgefleet-agent

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[arm] $*" >&2; }

# as_root CMD...: run as root (sudo when we are not root).
as_root() {
  if [ "$(id -u)" = "0" ]; then "$@"; else sudo "$@"; fi
}

# arch_info ARCH: set DEB_ARCH, QEMU_NAME, QEMU_CPU_PIN, UNAME_M and REQ_FILE for ARCH.
arch_info() {
  case "$1" in
    arm64)
      DEB_ARCH=arm64; QEMU_NAME=aarch64; UNAME_M=aarch64
      # qemu's default `max` CPU computes wrong int8 results in XNNPACK (the golden self-test
      # caught it: max abs error 78); a Cortex-A72 is the Raspberry Pi 4's core.
      QEMU_CPU_PIN=cortex-a72
      REQ_FILE=requirements/agent.txt
      ;;
    armhf)
      DEB_ARCH=armhf; QEMU_NAME=arm; UNAME_M=armv7l
      # The Raspberry Pi 2's core, the oldest armv7l board of firmware_profiles/.
      QEMU_CPU_PIN=cortex-a7
      # The same file: its markers select tflite-runtime 2.14, numpy<2 and cryptography<46.
      REQ_FILE=requirements/agent.txt
      ;;
    *) die "unknown architecture '$1': use arm64 or armhf" ;;
  esac
}

# cache_key ARCH: what the userland's content depends on (requirement file + recipe.sh).
cache_key() {
  arch_info "$1"
  { echo "$1"; cat "$REPO/$REQ_FILE" "$ARM_DIR/recipe.sh"; } | sha256sum | cut -c1-16
}

# rootfs_dir ARCH: the extracted userland for the current cache key.
rootfs_dir() { echo "$CACHE_DIR/$1-$(cache_key "$1")"; }

# ensure_host_tools: qemu-user-static, debootstrap, zstd and unshare, from apt when missing.
ensure_host_tools() {
  local missing=()
  command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
  command -v zstd >/dev/null || missing+=(zstd)
  command -v unshare >/dev/null || missing+=(util-linux)
  [ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

# ensure_binfmt QEMU_NAME: register qemu-QEMU_NAME with binfmt_misc (idempotent). By hand,
# because PID 1 is not always systemd (containers, CI runners) and so nothing reads binfmt.d.
ensure_binfmt() {
  local name=$1 dir=/proc/sys/fs/binfmt_misc
  [ -e "$dir/register" ] || as_root mount -t binfmt_misc binfmt_misc "$dir" \
    || die "cannot mount binfmt_misc on $dir (needs root / CAP_SYS_ADMIN)"
  [ -e "$dir/qemu-$name" ] && return 0
  local conf=/usr/lib/binfmt.d/qemu-$name.conf
  [ -r "$conf" ] || die "$conf is missing: apt-get install qemu-user-static"
  # The F flag in Debian's entry opens the interpreter now, so chroots need no copy of qemu.
  as_root sh -c "cat '$conf' > '$dir/register'" || die "binfmt registration of qemu-$name failed"
}

# write_cpuinfo ARCH FILE: an ARM /proc/cpuinfo with one entry per host CPU. litert's cpuinfo
# library parses /proc/cpuinfo and crashes on the host's x86 one.
write_cpuinfo() {
  local n i
  n=$(nproc --all 2>/dev/null || echo 1)
  arch_info "$1"
  : >"$2"
  for ((i = 0; i < n; i++)); do
    if [ "$1" = arm64 ]; then  # Raspberry Pi 4 (Cortex-A72), 64-bit kernel
      printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
      printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n'
      printf 'CPU part\t: 0xd08\nCPU revision\t: 3\n\n'
    else  # Raspberry Pi 2 (Cortex-A7), 32-bit kernel
      printf 'processor\t: %d\nmodel name\t: ARMv7 Processor rev 5 (v7l)\nBogoMIPS\t: 38.40\n' "$i"
      printf 'Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32'
      printf ' lpae evtstrm\nCPU implementer\t: 0x41\nCPU architecture: 7\nCPU variant\t: 0x0\n'
      printf 'CPU part\t: 0xc07\nCPU revision\t: 5\n\n'
    fi
  done >>"$2"
  if [ "$1" = arm64 ]; then
    printf 'Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n'
  else
    printf 'Hardware\t: BCM2835\nRevision\t: a21041\nModel\t\t: Raspberry Pi 2 Model B Rev 1.1\n'
  fi >>"$2"
}

# enter ARCH ROOT [--bind SRC[:DST]]... [--env K=V]... -- CMD...: exec CMD in ROOT under qemu.
# A private mount namespace holds /proc, /sys, /dev, the ARM cpuinfo and the binds, so they
# vanish with the process: nothing to unmount, nothing left behind after a crash or SIGKILL.
enter() {
  local arch=$1 root=$2 binds=() envs=()
  shift 2
  while [ $# -gt 0 ]; do
    case "$1" in
      --bind) binds+=("$2"); shift 2 ;;
      --env) envs+=("$2"); shift 2 ;;
      --) shift; break ;;
      *) die "enter: unexpected argument '$1' (put the command after --)" ;;
    esac
  done
  [ $# -gt 0 ] || die "enter: no command given"
  arch_info "$arch"
  ensure_binfmt "$QEMU_NAME"
  local cpuinfo
  cpuinfo=$(mktemp "${TMPDIR:-/tmp}/edgefleet-cpuinfo-$arch.XXXXXX")
  write_cpuinfo "$arch" "$cpuinfo"
  local setup='set -e
    root=$1; cpuinfo=$2; shift 2
    mount -t proc proc "$root/proc"
    mount --bind "$cpuinfo" "$root/proc/cpuinfo"
    rm -f "$cpuinfo"  # the bind keeps the inode; nothing is left in TMPDIR
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    while [ "$1" != -- ]; do
      src=${1%%:*}; dst=${1#*:}; shift
      mkdir -p "$root$dst"
      mount --bind "$src" "$root$dst"
    done
    shift
    exec chroot "$root" "$@"'
  local bind_args=() b
  for b in "${binds[@]}"; do
    case "$b" in *:*) bind_args+=("$b") ;; *) bind_args+=("$b:$b") ;; esac
  done
  # Debian's PATH and locale; QEMU_CPU is read by qemu on every exec of an ARM binary, so the
  # agent's self-test child processes are pinned too.
  exec unshare --mount --propagation private -- sh -c "$setup" sh "$root" "$cpuinfo" \
    "${bind_args[@]}" -- /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 QEMU_CPU="$QEMU_CPU_PIN" "${envs[@]}" "$@"
}
