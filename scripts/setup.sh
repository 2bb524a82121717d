#!/usr/bin/env bash
# Install what hydrogate needs on Debian 12 / Raspberry Pi OS (bookworm) into ./.venv.
# Usage: scripts/setup.sh [--test]   (--test adds Mosquitto and the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"

pkgs=(python3 python3-venv python3-dev gcc pkg-config libsystemd-dev)
[ "$want_test" = 1 ] && pkgs+=(mosquitto openssl strace)  # strace: the fsync-timing tests
# Node.js runs the MicroPython WebAssembly port for the firmware tests; a Node.js
# already on the machine (e.g. one that bundles npm) is used as it is.
if [ "$want_test" = 1 ]; then
  command -v node >/dev/null 2>&1 || pkgs+=(nodejs)
  command -v npm >/dev/null 2>&1 || pkgs+=(npm)
fi
# The tests install hydrogate as scripts/install.sh does on a Pi (Debian's python3 and
# its packages, Debian's pip) and run it under a real systemd in a namespace.
[ "$want_test" = 1 ] && pkgs+=(systemd util-linux python3-pip python3-numpy python3-yaml
  python3-serial-asyncio python3-systemd python3-tqdm)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The test broker is started by the tests themselves, never as a system service.
if [ "$want_test" = 1 ] && command -v systemctl >/dev/null 2>&1; then
  $sudo_cmd systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$want_test" = 1 ]; then
  .venv/bin/python -m pip install -q -e ".[systemd,test]"
else
  .venv/bin/python -m pip install -q -e ".[systemd]"
fi
if [ "$want_test" = 1 ]; then
  # The MicroPython WebAssembly port, pinned by package-lock.json (test-only).
  npm ci --no-audit --no-fund --loglevel=error
fi

if [ "$want_test" = 1 ]; then
  # What pip would install on each target (tests/install_targets.py), resolved now,
  # with the network, into .cache/install; the tests resolve again offline from it
  # and fail for a target whose wheels are not there. Not fatal here: the tests say.
  [ -x .cache/install/debian-venv/bin/python ] \
    || /usr/bin/python3 -m venv --system-site-packages --without-pip .cache/install/debian-venv
  stamp="$(cat pyproject.toml tests/install_targets.py | sha256sum | cut -c1-16)"
  if [ "$(cat .cache/install/stamp 2>/dev/null)" != "$stamp" ]; then
    if .venv/bin/python tests/install_targets.py download .cache/install \
         .cache/install/debian-venv/bin/python; then
      echo "$stamp" > .cache/install/stamp
    else
      echo "setup.sh: some install targets did not resolve; tests/test_install_targets.py says which" >&2
    fi
  fi
fi
