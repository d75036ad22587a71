#!/usr/bin/env bash
# Debian package of the gateway build, carrying the systemd unit, sysusers and tmpfiles entries and
# the example config: arm64 from aarch64-unknown-linux-gnu, armhf from armv7-unknown-linux-gnueabihf;
# from a *-musl* target, the static build, which depends on no libc version.
#   scripts/package-deb.sh aarch64-unknown-linux-gnu   -> target/aarch64-unknown-linux-gnu/debian/plantmesh_*.deb
# Builds the binary first (scripts/build-gateway.sh) unless it exists; installs cargo-deb if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/package-deb.sh <target triple>}
[ -x "target/$target/gateway/plantmesh" ] || scripts/build-gateway.sh "$target"
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked -q
mkdir -p target/deb
sed "s|@BINDIR@|/usr/bin|g" packaging/systemd/plantmesh.service > target/deb/plantmesh.service
variant=()
case "$target" in *-musl*) variant=(--variant static) ;; esac
cargo deb -p plantmesh --target "$target" --profile gateway --no-build --no-strip "${variant[@]}"
deb=$(ls -t "target/$target/debian/"plantmesh_*.deb | head -1)
if [ -z "$(dpkg-deb -f "$deb" Depends)" ]; then
  # The static build depends on nothing; cargo-deb still writes an empty field, which policy forbids.
  tmp=$(mktemp -d)
  dpkg-deb -R "$deb" "$tmp/pkg"
  sed -i '/^Depends: *$/d' "$tmp/pkg/DEBIAN/control"
  dpkg-deb -b --root-owner-group "$tmp/pkg" "$deb" > /dev/null
  rm -rf "$tmp"
fi
echo "built $deb"
dpkg-deb --info "$deb" | sed -n 's/^ \(Package\|Version\|Architecture\|Depends\|Installed-Size\):/  \1:/p'
dpkg-deb --contents "$deb" | awk '{print "  " $6}'
