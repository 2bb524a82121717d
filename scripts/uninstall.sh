#!/usr/bin/env bash
# Remove the hydrogate service installed by scripts/install.sh. Run as root.
#
#   sudo scripts/uninstall.sh --keep-data   remove the program; keep /etc/hydrogate (config,
#                                           token), /var/lib/hydrogate (the buffer) and the user
#   sudo scripts/uninstall.sh --purge       remove those too: unsent readings are lost
#
# One of the two must be given: nothing is deleted by default.
# HYDROGATE_ROOT and SYSTEMCTL move paths and systemctl as in install.sh.
set -euo pipefail

root="${HYDROGATE_ROOT:-}"
systemctl="${SYSTEMCTL:-systemctl}"
user=hydrogate

say() { echo "uninstall.sh: $*"; }
usage() { sed -n '2,10p' "$0" >&2; exit 2; }

case "${1:-}" in
  --keep-data) purge=0 ;;
  --purge) purge=1 ;;
  *) usage ;;
esac
[ "$#" -eq 1 ] || usage
[ "$(id -u)" -eq 0 ] || { echo "uninstall.sh: run as root (sudo)" >&2; exit 1; }

if [ -e "$root/etc/systemd/system/hydrogate.service" ]; then
  # Stopping commands every pump off and commits the buffer (TimeoutStopSec=15).
  $systemctl disable --now hydrogate || say "could not stop the service cleanly; going on"
fi
rm -f "$root/etc/systemd/system/hydrogate.service" "$root/usr/local/bin/hydrogate" \
  "$root/etc/modules-load.d/hydrogate.conf"
rm -rf "$root/etc/systemd/system/hydrogate.service.d"
$systemctl daemon-reload || true
rm -rf "$root/opt/hydrogate"
say "removed the program (/opt/hydrogate) and the service"

if [ "$purge" = 1 ]; then
  rm -rf "$root/etc/hydrogate" "$root/var/lib/hydrogate"
  if id "$user" >/dev/null 2>&1; then
    userdel "$user" || say "could not remove user $user"
  fi
  say "purged the config (/etc/hydrogate), the buffer (/var/lib/hydrogate) and user $user"
else
  say "kept the config (/etc/hydrogate), the buffer (/var/lib/hydrogate) and user $user;"
  say "scripts/install.sh picks them up again, scripts/uninstall.sh --purge removes them"
fi
