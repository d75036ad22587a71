#!/usr/bin/env bash
# Runs the whole plantmesh test suite on a fresh machine: installs what it needs (Debian packages,
# Rust components, a Python venv with the protocol peers), then lints, builds and tests everything.
#   scripts/test.sh            everything
#   scripts/test.sh --quick    skip fmt/clippy
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
quick=0
[ "${1:-}" = "--quick" ] && quick=1

step() { printf '\n==> %s  [%dm%02ds]\n' "$*" $((SECONDS / 60)) $((SECONDS % 60)); }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

step "system packages"
missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v socat >/dev/null 2>&1 || missing+=(socat)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
command -v objdump >/dev/null 2>&1 || missing+=(binutils)
# Headless Chromium for the status and catalog pages (tests/tests/page.rs, fleet.rs).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"
mosquitto -h 2>&1 | head -1 || true

step "python peers (.venv)"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import pymodbus, asyncua, jsonschema, serial, paho.mqtt, grpc_tools, google.protobuf, open_data_contract_standard, datacontract' >/dev/null 2>&1; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/peers/requirements.txt
fi
.venv/bin/python -c 'import pymodbus, asyncua; print("pymodbus", pymodbus.__version__, "asyncua", asyncua.__version__)'
export PLANTMESH_PYTHON="$root/.venv/bin/python"

step "node peers (tests/peers/asyncapi: the AsyncAPI parser)"
if [ ! -d tests/peers/asyncapi/node_modules/@asyncapi/parser ]; then
  (cd tests/peers/asyncapi && npm ci --no-audit --no-fund --silent)
fi

# One clean build per run: incremental state would add gigabytes to target/ and buy nothing.
export CARGO_INCREMENTAL=0
disk() { printf 'disk: target/ %s, %s free\n' "$(du -sh target 2>/dev/null | cut -f1)" "$(df -h --output=avail . | tail -1 | tr -d ' ')"; }

step "rust components"
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
cargo --version
# The workspace's rust-version is the oldest toolchain it promises to build with: refuse an older one
# here, with the fix, rather than deep inside a dependency's build.
msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
have=$(rustc --version | cut -d' ' -f2)
if [ "$(printf '%s\n%s\n' "$msrv" "$have" | sort -V | head -1)" != "$msrv" ]; then
  echo "rustc $have is older than the workspace's rust-version $msrv: rustup update stable"; exit 1
fi
echo "rustc $have (rust-version $msrv)"

if [ $quick = 0 ]; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy"
  cargo clippy --workspace --all-targets -- -D warnings
  step "cargo clippy, gateway feature set (no embedded broker, no simulators)"
  cargo clippy -p plantmesh --no-default-features --all-targets -- -D warnings
  step "cargo deny: licences, duplicate versions, sources (deny.toml)"
  command -v cargo-deny >/dev/null 2>&1 || cargo install cargo-deny --locked -q
  cargo deny check licenses bans sources
  # Advisories need the RustSec database, fetched from its git host; where that cannot be reached
  # (package registries only), say so instead of failing on the network.
  if timeout 60 cargo deny fetch db >/dev/null 2>&1; then
    cargo deny check advisories
  else
    echo "advisories: the RustSec database cannot be fetched from here; not checked"
  fi
fi

step "protocol and firmware build for MCU targets (protocol alone first: no std leak can hide)"
for t in thumbv6m-none-eabi thumbv7em-none-eabihf; do
  rustup target list --installed | grep -q "^$t\$" || rustup target add "$t"
  cargo build -q -p plantmesh-protocol --no-default-features --target "$t"
  cargo build -q -p plantmesh-firmware --target "$t"
  echo "$t: protocol, firmware ok"
done
step "sensor-node board image (Raspberry Pi Pico): link, UF2, size"
scripts/build-firmware.sh

step "fuzz the sensor-link decoder briefly (cargo-fuzz, libFuzzer)"
# `-s none`: coverage-guided libFuzzer without a sanitizer, which runs on the stable toolchain (the
# crate forbids unsafe code, so AddressSanitizer would add little). A crash fails the script.
if [ "${PLANTMESH_FUZZ_SECONDS:-20}" != 0 ]; then
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked -q
  (cd protocol && cargo fuzz run decode -s none -- -max_total_time="${PLANTMESH_FUZZ_SECONDS:-20}" 2>&1 | tail -2)
fi

step "build"
cargo build --workspace --bins

step "tests"
cargo test --workspace -- --test-threads=2
disk

step "gateway binary for aarch64 (cross linker), run under qemu, library tests under emulation"
scripts/build-gateway.sh aarch64-unknown-linux-gnu
qemu-aarch64 -L /usr/aarch64-linux-gnu target/aarch64-unknown-linux-gnu/gateway/plantmesh --version
# The .deb must declare at least the newest glibc symbol version the binary links against.
need=$(objdump -T target/aarch64-unknown-linux-gnu/gateway/plantmesh | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
declared=$(sed -n 's/^depends = "libc6 (>= \([0-9.]*\))"$/\1/p' agent/Cargo.toml)
if [ -z "$declared" ] || [ "$(printf '%s\n%s\n' "$need" "$declared" | sort -V | tail -1)" != "$declared" ]; then
  echo "the package declares libc6 >= '${declared}' but the binary needs GLIBC_${need} (agent/Cargo.toml)"; exit 1
fi
echo "glibc: binary needs $need, package declares >= $declared"
# The property tests run fewer cases under emulation (the governance one: policies, the million
# records run natively above; power cuts; damaged files; file size).
PLANTMESH_GOVERN_CASES=8 PLANTMESH_POWER_CUTS=40 PLANTMESH_DAMAGE_CASES=12 PLANTMESH_FILE_FILLS=1 cargo test --target aarch64-unknown-linux-gnu -p plantmesh-protocol -p plantmesh \
  --no-default-features --lib -- --test-threads=2

disk
# The emulated test build is not needed again; the footprint step builds two more gateway binaries.
rm -rf target/aarch64-unknown-linux-gnu/debug

step "footprint budgets (README.md)"
scripts/footprint.sh --check
disk
