# shellcheck shell=bash
# What goes into a userland: the Debian release and packages, and the documented device install
# of the agent's requirements (docs/packaging.md, "Tested on ARM"). Sourced by build-userland.sh.
# This file and the requirement file are the cache key: change either and the userland is rebuilt.

# Debian 12: the release the issue names, and what Raspberry Pi OS (bookworm) is built on.
SUITE=bookworm
# What debootstrap installs: python3 and ca-certificates (pip's HTTPS). The packages of the
# documented install come from apt inside, as on a device: debootstrap's resolver does not
# follow virtual packages (python3-cffi -> python3-pycparser -> python3-ply-lex-3.10).
DEB_PACKAGES=python3,ca-certificates

# install_requirements REQ_FILE: inside the userland (in_root), the documented device steps up
# to the agent itself (docs/packaging.md, "Tested recipe per architecture"): Debian's
# python3-venv, and python3-cffi/-numpy/-psutil, which PyPI has no armv7l wheels of; the venv
# that sees them; the requirement file, whose markers pick the stack per architecture. The agent
# is not installed here: each test run installs the wheel its bundle carries, and finds its
# requirements satisfied (what makes a warm run take minutes, not a quarter of an hour).
install_requirements() {
  in_root apt-get update -qq
  in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    python3-venv python3-cffi python3-numpy python3-psutil
  in_root python3 -m venv --system-site-packages "$AGENT_VENV"
  in_root "$AGENT_VENV/bin/pip" install -r "$1"
}
