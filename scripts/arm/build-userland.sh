#!/usr/bin/env bash
# Build (or restore from the cache) a Debian 12 userland for ARCH (arm64 | armhf) with the agent's
# dependencies installed as docs/packaging.md ("Tested on ARM") tells a user; print its path.
#
#   scripts/arm/build-userland.sh arm64      # ~5 min cold, seconds when cached
#   scripts/arm/build-userland.sh --fresh arm64   # re-extract if run-in-userland.sh used it
#   scripts/arm/build-userland.sh --print-path armhf   # the path only; builds nothing
#
# Cache: $EDGEFLEET_ARM_CACHE (default ~/.cache/edgefleet/arm)/ARCH-KEY.tar.zst, KEY a hash of
# the requirement file and recipe.sh, extracted next to it as ARCH-KEY/. Older keys of the
# same ARCH are removed. The edgefleet package itself is not in the cache: tests install the
# worktree's wheel into the userland each run (run-in-userland.sh).
set -euo pipefail
# shellcheck source=scripts/arm/lib.sh
source "$(dirname "$0")/lib.sh"

if [ "${1:-}" = --print-path ]; then
  [ $# -eq 2 ] || die "usage: $0 --print-path arm64|armhf"
  rootfs_dir "$2"
  exit 0
fi
FRESH=0
if [ "${1:-}" = --fresh ]; then FRESH=1; shift; fi
[ $# -eq 1 ] || die "usage: $0 [--fresh] arm64|armhf"
ARCH=$1
arch_info "$ARCH"
[ "$(id -u)" = "0" ] || exec sudo -E "$0" "$@"
trap 'echo "error: build-userland.sh $ARCH failed at line $LINENO" >&2' ERR

# shellcheck source=scripts/arm/recipe.sh
source "$(dirname "$0")/recipe.sh"

# mirror: the Debian mirror the host's apt already uses (never a host hard-coded here).
mirror() {
  if [ -n "${EDGEFLEET_ARM_MIRROR:-}" ]; then echo "$EDGEFLEET_ARM_MIRROR"; return; fi
  python3 - <<'EOF' || die "no Debian mirror in the host's apt sources; set EDGEFLEET_ARM_MIRROR"
import glob, re, sys
uris = []
# deb822 .sources files: stanzas with Types/URIs/Suites.
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        fields = dict(
            (k.strip().lower(), v.strip())
            for k, v in (l.split(":", 1) for l in stanza.splitlines()
                         if ":" in l and not l.lstrip().startswith("#"))
        )
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
            suites = fields.get("suites", "").split()
            uris += [(u, suites) for u in fields.get("uris", "").split()]
# one-line format: deb [options] URI SUITE COMPONENTS...
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] == "deb":
            uris.append((line[1], [line[2]]))
# The main archive: a suite without "-" (not -security / -updates / -backports).
for uri, suites in uris:
    if any("-" not in s and "/" not in s for s in suites) and "security" not in uri:
        print(uri.rstrip("/"))
        sys.exit(0)
sys.exit(1)
EOF
}

# pip_conf: the host's pip index settings that work inside the chroot (network URLs only; the
# host's file:// indexes and find-links do not exist there), plus the CA bundle.
pip_conf() {
  echo "[global]"
  echo "cert = /etc/ssl/certs/ca-certificates.crt"
  echo "disable-pip-version-check = true"
  echo "timeout = ${PIP_DEFAULT_TIMEOUT:-120}"
  local key value urls
  for key in index-url extra-index-url trusted-host; do
    value=$(pip config get "global.$key" 2>/dev/null || true)
    case $key in
      index-url) value=${PIP_INDEX_URL:-$value} ;;
      extra-index-url) value=${PIP_EXTRA_INDEX_URL:-$value} ;;
      trusted-host) value=${PIP_TRUSTED_HOST:-$value} ;;
    esac
    urls=$(printf '%s\n' $value | { grep -E '^https?://|^[A-Za-z0-9.-]+(:[0-9]+)?$' || true; } \
      | tr '\n' ' ')
    [ -n "$urls" ] && echo "$key = $urls"
  done
  return 0
}

# in_root CMD...: run CMD inside the userland being built (resolv.conf for pip at build time).
in_root() { (enter "$ARCH" "$BUILD" -- "$@"); }

KEY=$(cache_key "$ARCH")
ROOT="$CACHE_DIR/$ARCH-$KEY"
TARBALL="$ROOT.tar.zst"
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/$ARCH.lock"
flock 9  # one build per ARCH at a time (make and a pytest fixture may both ask)

# --fresh: a userland something ran in (run-in-userland.sh marks it .used) is replaced by a
# pristine copy from the tarball, so every test run starts from a device with no agent on it.
if [ -e "$ROOT/.ready" ] && { [ "$FRESH" = 0 ] || [ ! -e "$ROOT/.used" ]; }; then
  echo "$ROOT"
  exit 0
fi
ensure_host_tools
ensure_binfmt "$QEMU_NAME"
START=$(date +%s)

# Other keys of this ARCH are stale: the requirement file or recipe.sh changed.
for old in "$CACHE_DIR/$ARCH"-*; do
  [ -e "$old" ] || continue
  case "$old" in "$ROOT"|"$ROOT".*|"$CACHE_DIR/$ARCH-debootstrap.log") continue ;; esac
  log "removing stale $old"
  rm -rf --one-file-system "$old"
done

if [ ! -e "$TARBALL" ]; then
  BUILD="$ROOT.build"
  # A finished debootstrap (same key) is kept when a later step failed: resume after it.
  if [ ! -e "$BUILD/.debootstrapped" ]; then
    rm -rf --one-file-system "$BUILD"
    MIRROR=$(mirror)
    log "debootstrap $SUITE $DEB_ARCH from $MIRROR into $BUILD"
    # minbase: no init, no editors, just apt and the packages of the recipe.
    unshare --mount --propagation private -- debootstrap --arch="$DEB_ARCH" --variant=minbase \
      --include="$DEB_PACKAGES" \
      --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
      "$SUITE" "$BUILD" "$MIRROR" >"$CACHE_DIR/$ARCH-debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE_DIR/$ARCH-debootstrap.log" >&2; die "debootstrap of $ARCH failed"; }
    touch "$BUILD/.debootstrapped"
  fi
  # The host's CA certificates, including its extra local ones (a TLS-inspecting proxy's CA
  # on some networks), so pip inside trusts what pip outside trusts.
  cp /etc/ssl/certs/ca-certificates.crt "$BUILD/etc/ssl/certs/ca-certificates.crt"
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$BUILD/usr/local/share/ca-certificates/"
  fi
  pip_conf >"$BUILD/etc/pip.conf"
  cp /etc/resolv.conf "$BUILD/etc/resolv.conf"
  mkdir -p "$BUILD/root/edgefleet"
  cp "$REPO/$REQ_FILE" "$BUILD/root/edgefleet/requirements.txt"
  log "venv $AGENT_VENV and pip install -r $REQ_FILE (emulated: minutes)"
  # Not in an `||` list: set -e (and the ERR trap naming the line) must apply inside it.
  install_requirements /root/edgefleet/requirements.txt
  in_root "$AGENT_VENV/bin/pip" freeze >"$BUILD/root/edgefleet/freeze.txt"
  # Smaller tarball: downloaded .debs and pip's cache are not needed (apt lists stay: the
  # printed device commands run apt-get install, as on a device after apt-get update).
  rm -rf "$BUILD"/var/cache/apt/archives/*.deb "$BUILD"/var/cache/apt/*.bin "$BUILD/root/.cache"
  rm -f "$BUILD/.debootstrapped"
  log "packing $TARBALL"
  tar --numeric-owner --one-file-system -C "$BUILD" -cf - . | zstd -q -T0 -6 -o "$TARBALL.tmp"
  mv "$TARBALL.tmp" "$TARBALL"
  mv "$BUILD" "$ROOT"
else
  log "extracting $TARBALL"
  rm -rf --one-file-system "$ROOT"
  mkdir -p "$ROOT.tmp"
  zstd -q -dc "$TARBALL" | tar --numeric-owner -C "$ROOT.tmp" -xf -
  mv "$ROOT.tmp" "$ROOT"
fi
touch "$ROOT/.ready"
log "$ARCH userland ready in $(($(date +%s) - START)) s: $ROOT"
echo "$ROOT"
