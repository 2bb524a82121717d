#!/usr/bin/env bash
# Install hydrogate as a systemd service: code in /opt/hydrogate, a system user,
# /etc/hydrogate/config.yaml (kept if present), the unit file. Run as root.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/opt/hydrogate

[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }

id hydrogate >/dev/null 2>&1 || useradd --system --home-dir /var/lib/hydrogate \
  --shell /usr/sbin/nologin --groups dialout hydrogate
mkdir -p "$prefix" /etc/hydrogate /var/lib/hydrogate
if [ "$src" != "$prefix" ]; then
  cp -a "$src/." "$prefix/"
  rm -rf "$prefix/.venv"
fi
"$prefix/scripts/setup.sh"
ln -sf "$prefix/.venv/bin/hydrogate" /usr/local/bin/hydrogate
if [ ! -e /etc/hydrogate/config.yaml ]; then
  install -m 0640 -g hydrogate "$prefix/config/example.yaml" /etc/hydrogate/config.yaml
  echo "install.sh: edit /etc/hydrogate/config.yaml, then: systemctl enable --now hydrogate"
fi
chown hydrogate:hydrogate /var/lib/hydrogate
install -m 0644 "$prefix/systemd/hydrogate.service" /etc/systemd/system/hydrogate.service
systemctl daemon-reload
echo "install.sh: installed; check the config with: hydrogate check-config -c /etc/hydrogate/config.yaml"
