# shellcheck shell=bash
# What goes into a userland: the Debian release and packages, and the documented device install
# of the agent's requirements (docs/packaging.md, "Tested on ARM"). Sourced by build-userland.sh.
# This file and the requirement file are the cache key: change either and the userland is rebuilt.

# Debian 12: the release the issue names, and what Raspberry Pi OS (bookworm) is built on.
SUITE=bookworm
# The Debian packages of the documented install: python3-venv (ensurepip), python3-cffi (the
# build cryptography needs on armv7l, where PyPI has no cffi wheel), ca-certificates for pip.
DEB_PACKAGES=python3,python3-venv,python3-cffi,ca-certificates

# install_requirements REQ_FILE: inside the userland (in_root), the documented venv and its
# requirements; the venv sees Debian's python3-cffi through --system-site-packages. The agent
# itself is not installed here: each test run installs the one its bundle carries.
install_requirements() {
  in_root python3 -m venv --system-site-packages "$AGENT_VENV"
  in_root "$AGENT_VENV/bin/pip" install -r "$1"
}
