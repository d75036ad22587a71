#!/usr/bin/env bash
# Installs plantmesh on a gateway as a hardened systemd service, or removes it.
#   sudo scripts/install-gateway.sh [--binary PATH]          install (binary: the gateway build for
#                                                             this machine, found under target/)
#   sudo scripts/install-gateway.sh --uninstall [--purge]    remove (--purge: config and data too)
#   scripts/install-gateway.sh --root DIR [--binary PATH]    install into a directory tree (a
#                                                             throwaway root or an image being built):
#                                                             nothing is started, no system user is
#                                                             touched outside DIR
# Layout: binary /usr/local/bin/plantmesh; config /etc/plantmesh (an example is installed if there is
# none, and `plantmesh check` runs before every start); data /var/lib/plantmesh (the only writable
# path); secrets /etc/plantmesh/credentials (root only, handed over with LoadCredential); unit
# /etc/systemd/system/plantmesh.service; user `plantmesh` (systemd-sysusers), in dialout.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=""
binary=""
uninstall=0
purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2%/}; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
live=0
[ -z "$root" ] && live=1
if [ $live = 1 ] && [ "$(id -u)" != 0 ]; then
  echo "run as root (or with --root DIR to install into a directory)" >&2
  exit 1
fi
bindir=/usr/local/bin
unit=$root/etc/systemd/system/plantmesh.service
systemd_running() { [ $live = 1 ] && [ -d /run/systemd/system ]; }

if [ $uninstall = 1 ]; then
  if systemd_running; then
    systemctl disable --now plantmesh.service 2>/dev/null || true
  fi
  rm -f "$unit" "$root$bindir/plantmesh" "$root/etc/sysusers.d/plantmesh.conf" "$root/etc/tmpfiles.d/plantmesh.conf"
  systemd_running && systemctl daemon-reload
  if [ $purge = 1 ]; then
    rm -rf "$root/etc/plantmesh" "$root/var/lib/plantmesh"
    if [ $live = 1 ] && id plantmesh >/dev/null 2>&1; then userdel plantmesh || true; fi
    echo "removed plantmesh, its config, data and user"
  else
    echo "removed plantmesh; kept /etc/plantmesh and /var/lib/plantmesh (--purge removes them)"
  fi
  exit 0
fi

if [ -z "$binary" ]; then
  arch=$(uname -m)
  for c in "target/$arch-unknown-linux-gnu/gateway/plantmesh" target/gateway/plantmesh target/release/plantmesh; do
    [ -x "$here/$c" ] && { binary=$here/$c; break; }
  done
  [ -n "$binary" ] || { echo "no binary: build one (scripts/build-gateway.sh) or pass --binary" >&2; exit 1; }
fi
"$binary" --version >/dev/null 2>&1 || echo "note: $binary does not run here (another architecture?); installing it anyway"

install -d -m 0755 "$root$bindir" "$root/etc/systemd/system" "$root/etc/sysusers.d" "$root/etc/tmpfiles.d"
install -m 0755 "$binary" "$root$bindir/plantmesh"
sed "s|@BINDIR@|$bindir|g" "$here/packaging/systemd/plantmesh.service" > "$unit"
chmod 0644 "$unit"
install -m 0644 "$here/packaging/systemd/plantmesh.sysusers" "$root/etc/sysusers.d/plantmesh.conf"
install -m 0644 "$here/packaging/systemd/plantmesh.tmpfiles" "$root/etc/tmpfiles.d/plantmesh.conf"

# The service user: systemd-sysusers where there is one (it also writes into a --root tree).
if command -v systemd-sysusers >/dev/null 2>&1; then
  if [ $live = 1 ]; then systemd-sysusers "$root/etc/sysusers.d/plantmesh.conf"; else systemd-sysusers --root="$root" "$root/etc/sysusers.d/plantmesh.conf"; fi
elif [ $live = 1 ] && ! id plantmesh >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/plantmesh --shell /usr/sbin/nologin --groups dialout plantmesh
fi
group=plantmesh
getent group plantmesh >/dev/null 2>&1 || group=root
[ $live = 1 ] || group=$(awk -F: '$1 == "plantmesh" { print $3 }' "$root/etc/group" 2>/dev/null || true)
[ -n "$group" ] || group=0

install -d -m 0750 -g "$group" "$root/etc/plantmesh" "$root/etc/plantmesh/products"
install -d -m 0700 "$root/etc/plantmesh/credentials"
install -d -m 0750 "$root/var/lib/plantmesh"
if [ ! -e "$root/etc/plantmesh/agent.toml" ]; then
  # A starting point: the example gateway (edit devices, upstream and products before starting).
  install -m 0640 -g "$group" "$here/configs/example/agent.toml" "$root/etc/plantmesh/agent.toml"
  [ -f "$here/configs/example/governance.toml" ] && install -m 0640 -g "$group" "$here/configs/example/governance.toml" "$root/etc/plantmesh/governance.toml"
  cp -r "$here/configs/example/products/." "$root/etc/plantmesh/products/" 2>/dev/null || true
  echo "installed the example config in /etc/plantmesh: edit it, then \`plantmesh check /etc/plantmesh\`"
fi

if systemd_running; then
  systemd-tmpfiles --create "$root/etc/tmpfiles.d/plantmesh.conf" || true
  systemctl daemon-reload
  systemctl enable plantmesh.service
  echo "enabled plantmesh.service; start it with: systemctl start plantmesh (logs: journalctl -u plantmesh)"
else
  echo "installed into ${root:-/} (systemd is not running here: nothing enabled or started)"
fi
