#!/usr/bin/env bash
# Install or upgrade hydrogate as a systemd service on Debian 12 / Raspberry Pi OS (bookworm),
# 32- or 64-bit. Run as root from a clone of the repository:
#
#   sudo scripts/install.sh             first install; again later = upgrade
#   sudo scripts/install.sh --upgrade   the same, said explicitly
#
# Every release is a virtualenv of its own in /opt/hydrogate/releases/, built from
# Debian's python3 with --system-site-packages: numpy, PyYAML, pyserial-asyncio, tqdm and
# systemd come from Debian (nothing compiles on a Pi); pip adds only what Debian lacks
# (aiomqtt, paho-mqtt, orjson) and a TFLite runtime if one can be installed here.
# /opt/hydrogate/venv is a symlink to the current release. An upgrade builds the new
# release beside the running one, checks the config with it, swaps the symlink and
# restarts; if any step fails the old release stays (or is put back) and keeps running.
#
# The environment can move everything, for tests and packagers:
#   HYDROGATE_ROOT    prefix of every path written (default: none, i.e. /)
#   HYDROGATE_PYTHON  the interpreter of the venvs (default /usr/bin/python3)
#   SYSTEMCTL         the systemctl command (default systemctl)
#   PIP_*             pip's own settings, e.g. PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR offline
set -euo pipefail
umask 022  # the service's user must read the release

src="$(cd "$(dirname "$0")/.." && pwd)"
root="${HYDROGATE_ROOT:-}"
python="${HYDROGATE_PYTHON:-/usr/bin/python3}"
systemctl="${SYSTEMCTL:-systemctl}"
prefix="$root/opt/hydrogate"
etc="$root/etc/hydrogate"
state="$root/var/lib/hydrogate"
unitdir="$root/etc/systemd/system"
bindir="$root/usr/local/bin"
modules="$root/etc/modules-load.d"
user=hydrogate
# TFLite runtimes in order of preference: tflite-runtime is 7 MB and has cp311 wheels
# for x86_64, aarch64 and armv7l; ai-edge-litert (60 MB) covers newer Pythons.
tflite_candidates=(tflite-runtime ai-edge-litert)

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

case "${1:-}" in
  "" | --upgrade) ;;
  -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
  *) die "unknown option $1 (use --upgrade or nothing)" ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root (sudo)"

# --- Debian's packages: everything that would otherwise compile or download big wheels.
debs=(python3 python3-venv python3-pip python3-numpy python3-yaml python3-serial-asyncio
      python3-systemd python3-tqdm)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- the service's user: in dialout for the serial ports.
if ! id "$user" >/dev/null 2>&1; then
  useradd --system --user-group --home-dir /var/lib/hydrogate \
    --shell /usr/sbin/nologin --groups dialout "$user"
fi

# --- build the new release beside the current one.
version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$src/gateway/__init__.py")"
release="$(date +%Y%m%d-%H%M%S)-$version"
new="$prefix/releases/$release"
mkdir -p "$prefix/releases"
[ -e "$new" ] && die "$new exists already; wait a second and run again"
cleanup() { [ -n "${new:-}" ] && rm -rf "$new"; }
trap cleanup EXIT
say "building $new"
# No pip of its own: Debian's pip (python3-pip, visible through the system site
# packages) installs into it, which keeps 14 MB out of every release.
"$python" -m venv --system-site-packages --without-pip "$new"
pip=("$new/bin/python" -m pip --disable-pip-version-check --no-input --quiet)
# Build hydrogate from the sources without writing into them (read-only checkouts work).
build="$(mktemp -d)"
tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./.cache --exclude=./node_modules \
  --exclude='*.egg-info' --exclude=./build -cf - . | tar -C "$build" -xf -
"${pip[@]}" install --no-cache-dir "$build[systemd]" \
  || { rm -rf "$build"; die "pip could not install hydrogate"; }
rm -rf "$build"

# --- a TFLite runtime for the ml controller, if this interpreter can have one.
numpy_pin="numpy==$("$new/bin/python" -c 'import numpy; print(numpy.__version__)')"
model_runs() {
  "$new/bin/python" -c 'from rules.mlruntime import Model, interpreter_backend
Model.load(); print(interpreter_backend()[0])' 2>/dev/null
}
tflite=""
for cand in "${tflite_candidates[@]}"; do
  # Without its dependencies first: the interpreter needs only numpy (Debian's);
  # if it does need more, with them, but never replacing Debian's numpy.
  for deps in --no-deps ""; do
    if "${pip[@]}" install --no-cache-dir --only-binary=:all: $deps \
         --constraint <(echo "$numpy_pin") "$cand" >/dev/null 2>&1 \
       && backend="$(model_runs)"; then
      tflite="$cand ($backend)"
      break 2
    fi
  done
  "${pip[@]}" uninstall -y "$cand" >/dev/null 2>&1 || true
done
if [ -n "$tflite" ]; then
  say "TFLite runtime: $tflite; the ml controller can run"
else
  say "no TFLite runtime installs on this machine ($("$new/bin/python" -c 'import platform, struct
print(f"Python {platform.python_version()}, {8 * struct.calcsize("P")}-bit, {platform.machine()}")'))"
  say "nodes configured with controller: ml will decide with rb (check-config says so)"
fi

# --- configuration and data folders.
install -d -m 0750 -o root -g "$user" "$etc"
install -d -m 0750 -o "$user" -g "$user" "$state"
if [ ! -e "$etc/config.yaml" ]; then
  install -m 0640 -o root -g "$user" "$src/config/example.yaml" "$etc/config.yaml"
  first=1
else
  first=0
  say "checking $etc/config.yaml with the new release, as user $user"
  status=0
  out="$(cd / && runuser -u "$user" -- "$new/bin/hydrogate" check-config --quiet \
           -c "$etc/config.yaml" 2>&1)" || status=$?
  [ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/  /'
  [ "$status" = 0 ] || die "the new release refuses the current config (above); nothing changed"
fi

# --- the serial drivers loaded at boot, so the unit's DeviceAllow=char-ttyUSB/char-ttyACM
# (resolved from /proc/devices when the service starts) cover adapters plugged in later.
install -d "$modules"
printf '# hydrogate: register the USB serial majors before the service starts\nusbserial\ncdc_acm\n' \
  > "$modules/hydrogate.conf"

# --- swap: the venv symlink is replaced in one rename.
old="$(readlink "$prefix/venv" 2>/dev/null || true)"
ln -sfn "releases/$release" "$prefix/venv.new"
mv -Tf "$prefix/venv.new" "$prefix/venv"
trap - EXIT
install -d "$bindir" "$unitdir"
ln -sfn /opt/hydrogate/venv/bin/hydrogate "$bindir/hydrogate"
install -m 0644 "$src/systemd/hydrogate.service" "$unitdir/hydrogate.service"
$systemctl daemon-reload

rollback() {
  say "$1; putting back $old"
  # The new release may have migrated the buffer to its schema already, which the old
  # one refuses: the new one writes it back to the old one's schema first.
  $systemctl stop hydrogate || true
  local schema
  schema="$("$prefix/$old/bin/python" -c \
    'from gateway.store import SCHEMA_VERSION; print(SCHEMA_VERSION)' 2>/dev/null || true)"
  if [ -n "$schema" ]; then
    (cd / && runuser -u "$user" -- "$new/bin/hydrogate" storage downgrade \
       -c "$etc/config.yaml" --to "$schema" 2>&1 | sed 's/^/  /') || true
  fi
  ln -sfn "$old" "$prefix/venv.new" && mv -Tf "$prefix/venv.new" "$prefix/venv"
  $systemctl restart hydrogate || true
  rm -rf "$new"
  die "upgrade failed; the previous release ($old) runs again"
}
if $systemctl is-active --quiet hydrogate; then
  say "restarting hydrogate with $release"
  if ! $systemctl restart hydrogate; then
    [ -n "$old" ] && rollback "the new release did not start"
    die "hydrogate did not start: journalctl -u hydrogate -e"
  fi
  sleep 2
  if ! $systemctl is-active --quiet hydrogate; then
    [ -n "$old" ] && rollback "the new release stopped right after starting"
    die "hydrogate stopped right after starting: journalctl -u hydrogate -e"
  fi
fi

# --- keep the current release and the one before it.
keep_prev="${old#releases/}"
for dir in "$prefix"/releases/*; do
  name="$(basename "$dir")"
  [ "$name" = "$release" ] || [ "$name" = "$keep_prev" ] || rm -rf "$dir"
done

say "installed $release (hydrogate $version) in /opt/hydrogate"
if [ "$first" = 1 ]; then
  say "next: edit /etc/hydrogate/config.yaml, check it with"
  say "  hydrogate check-config -c /etc/hydrogate/config.yaml"
  say "then: systemctl enable --now hydrogate"
fi
