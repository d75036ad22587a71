#!/usr/bin/env bash
# Flashes the sensor-node image onto a Raspberry Pi Pico, the usual ways for that board:
#   1. picotool, if installed (the Pico is rebooted into BOOTSEL mode if it runs a USB stack,
#      otherwise hold BOOTSEL while plugging it in);
#   2. otherwise the boot ROM's USB drive: hold BOOTSEL while plugging the Pico in, and the UF2 is
#      copied onto the RPI-RP2 drive (found under /media, /run/media or /mnt, or given as $2).
#   scripts/flash-firmware.sh [image.uf2] [mount point]
set -euo pipefail
cd "$(dirname "$0")/.."
uf2=${1:-target/firmware/plantmesh-node-pico.uf2}
[ -f "$uf2" ] || { echo "no image at $uf2: run scripts/build-firmware.sh first" >&2; exit 1; }

if command -v picotool >/dev/null 2>&1; then
  picotool load -v -x "$uf2" -f
  exit 0
fi

mount=${2:-}
if [ -z "$mount" ]; then
  for m in /media/*/RPI-RP2 /run/media/*/RPI-RP2 /media/RPI-RP2 /mnt/RPI-RP2; do
    [ -f "$m/INFO_UF2.TXT" ] && { mount=$m; break; }
  done
fi
if [ -z "$mount" ] || [ ! -f "$mount/INFO_UF2.TXT" ]; then
  echo "no RPI-RP2 drive found: hold BOOTSEL while plugging the Pico in (or pass its mount point)" >&2
  exit 1
fi
grep -q "RP2" "$mount/INFO_UF2.TXT" || { echo "$mount is not an RP2040 boot drive" >&2; exit 1; }
cp "$uf2" "$mount/" && sync
echo "flashed $uf2 to $mount; the Pico reboots into the new image"
