#!/usr/bin/env bash
# Builds the plantmesh gateway binary for a Linux gateway (ARM, or an x86_64 industrial PC).
#   scripts/build-gateway.sh aarch64-unknown-linux-gnu        (also: armv7-unknown-linux-gnueabihf,
#                                                              aarch64-unknown-linux-musl,
#                                                              armv7-unknown-linux-musleabihf,
#                                                              x86_64-unknown-linux-gnu and -musl)
#   FEATURES=simulators scripts/build-gateway.sh <target>     (extra cargo features; default none)
#   PROFILE=release scripts/build-gateway.sh <target>         (default: gateway, see Cargo.toml)
# The gateway feature set has no embedded broker and no simulators. With `cross` and a working
# container engine it uses `cross` (see Cross.toml); otherwise rustup targets plus Debian's cross
# linkers and qemu-user (from .cargo/config.toml), installing whatever is missing.
# Prints the path of the binary and its size.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/build-gateway.sh <target triple>}
profile=${PROFILE:-gateway}
features=${FEATURES:-}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages of the C cross compiler and libc, the compiler's name prefix, and the emulator.
case "$target" in
  aarch64-unknown-linux-gnu|aarch64-unknown-linux-musl) gcc_pkg=gcc-aarch64-linux-gnu; libc_pkg=libc6-dev-arm64-cross; prefix=aarch64-linux-gnu-; qemu=qemu-aarch64 ;;
  armv7-unknown-linux-gnueabihf|armv7-unknown-linux-musleabihf) gcc_pkg=gcc-arm-linux-gnueabihf; libc_pkg=libc6-dev-armhf-cross; prefix=arm-linux-gnueabihf-; qemu=qemu-arm ;;
  # x86_64 industrial PCs, and the static build footprint.sh measures on an x86_64 host.
  x86_64-unknown-linux-gnu|x86_64-unknown-linux-musl)
    [ "$(uname -m)" = x86_64 ] || { echo "$target: build it on an x86_64 host or with cross" >&2; exit 2; }
    gcc_pkg=gcc; libc_pkg=libc6-dev; prefix=; qemu=true ;;
  *) echo "unsupported target $target" >&2; exit 2 ;;
esac
args=(--profile "$profile" --target "$target" -p plantmesh --bin plantmesh --no-default-features)
[ -n "$features" ] && args+=(--features "$features")

engine_ok() { { command -v docker >/dev/null && docker info >/dev/null 2>&1; } || { command -v podman >/dev/null && podman info >/dev/null 2>&1; }; }
if command -v cross >/dev/null 2>&1 && engine_ok; then
  echo "building with cross (container engine found)"
  cross build "${args[@]}"
else
  echo "building with rustup target + Debian cross linker (no container engine)"
  rustup target list --installed | grep -q "^$target\$" || rustup target add "$target"
  missing=()
  dpkg -s "$gcc_pkg" >/dev/null 2>&1 || missing+=("$gcc_pkg")
  dpkg -s "$libc_pkg" >/dev/null 2>&1 || missing+=("$libc_pkg")
  command -v "$qemu" >/dev/null 2>&1 || missing+=(qemu-user)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # C code in dependencies (ring) is compiled with the same cross gcc.
  env_target=${target//-/_}
  export "CC_${env_target}=${prefix}gcc" "AR_${env_target}=${prefix}ar"
  cargo build "${args[@]}"
fi
bin="target/$target/$profile/plantmesh"
size=$(stat -c %s "$bin")
echo "built $bin: $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }') MiB)"
