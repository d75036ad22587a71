#!/usr/bin/env bash
# Builds the sensor-node board image for the Raspberry Pi Pico (RP2040, thumbv6m-none-eabi): the ELF
# and a UF2 for drag-and-drop flashing, and prints the flash and RAM it uses.
#   scripts/build-firmware.sh                  -> target/firmware/plantmesh-node-pico.{elf,uf2}
#   PLANTMESH_NODE_ID=0x2a scripts/build-firmware.sh   (a per-board node id)
# Also checks that the firmware library builds for thumbv7em-none-eabihf (Cortex-M4F boards).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/firmware
mkdir -p "$out"

for t in thumbv6m-none-eabi thumbv7em-none-eabihf; do
  rustup target list --installed | grep -q "^$t\$" || rustup target add "$t"
done
cargo build -q -p plantmesh-firmware --target thumbv7em-none-eabihf

board=firmware/boards/pico
# The board crate has its own workspace (a host `cargo test` never links it) and its own
# .cargo/config.toml (target, linker script), read from its directory.
(cd "$board" && cargo build --release --target-dir ../../../target/boards)
elf=target/boards/thumbv6m-none-eabi/release/plantmesh-node-pico
cp "$elf" "$out/plantmesh-node-pico.elf"
python3 scripts/fwtool.py uf2 "$out/plantmesh-node-pico.elf" "$out/plantmesh-node-pico.uf2"
# The boot ROM loads the second-stage boot loader from the first 256 bytes of flash.
python3 scripts/fwtool.py check-uf2 "$out/plantmesh-node-pico.uf2" --start 0x10000000
echo "Raspberry Pi Pico image (RP2040: 2 MiB flash, 264 KiB SRAM):"
python3 scripts/fwtool.py size "$out/plantmesh-node-pico.elf" --flash-kib 2048 --ram-kib 264
echo "flash it: scripts/flash-firmware.sh $out/plantmesh-node-pico.uf2"
