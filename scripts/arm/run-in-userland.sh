#!/usr/bin/env bash
# Run a command inside the ARCH userland that build-userland.sh made, under qemu-user with the
# CPU pinned, an ARM /proc/cpuinfo, the host's loopback (so a broker on 127.0.0.1 is reachable)
# and the given host directories bound in. The command becomes the process (exec): signals sent
# to this script's PID reach it.
#
#   scripts/arm/run-in-userland.sh arm64 [--bind SRC[:DST]]... [--env K=V]... -- CMD [ARGS]...
set -euo pipefail
# shellcheck source=scripts/arm/lib.sh
source "$(dirname "$0")/lib.sh"

[ $# -ge 3 ] || die "usage: $0 arm64|armhf [--bind SRC[:DST]]... [--env K=V]... -- CMD..."
ARCH=$1
shift
arch_info "$ARCH"
[ "$(id -u)" = "0" ] || exec sudo -E "$0" "$ARCH" "$@"
ROOT=$(rootfs_dir "$ARCH")
[ -e "$ROOT/.ready" ] || die "no $ARCH userland at $ROOT: run scripts/arm/build-userland.sh $ARCH"
touch "$ROOT/.used"  # build-userland.sh --fresh replaces it with a pristine copy
enter "$ARCH" "$ROOT" "$@"
