#!/usr/bin/env bash
# Install mosquitto from the distribution when it is missing (tests start their own instances).
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto
elif command -v brew >/dev/null 2>&1; then
  brew install mosquitto
else
  echo "mosquitto is missing and no known package manager was found; install it and retry" >&2
  exit 1
fi
# The Debian package starts a system broker on 1883; tests never use it (they pick free ports).
