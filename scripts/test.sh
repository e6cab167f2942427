#!/usr/bin/env bash
# Runs every check the project has: formatting, clippy, and the whole test
# suite under cargo-nextest (profile "ci" in .config/nextest.toml), with the
# service under test speaking MQTT 3.1.1; then the ingest-path tests again with
# it speaking MQTT 5 (TEST_MQTT_PROTOCOL, read by tests/app).
# Prepares the machine first (scripts/setup.sh), so a fresh Debian/Ubuntu box
# gets MariaDB and Mosquitto. Extra arguments go to both `cargo nextest run`s.
set -euo pipefail

cd "$(dirname "$0")/.."

scripts/setup.sh

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "test: installing cargo-nextest (cargo install --locked cargo-nextest)"
    cargo install --locked cargo-nextest
fi

# rustfmt and clippy come with rustup's default profile, not the minimal one.
add_component() {
    command -v rustup >/dev/null 2>&1 ||
        { echo "test: cargo $1 is missing and rustup is not available to add $2" >&2; exit 1; }
    echo "test: installing the $2 component (rustup component add $2)"
    rustup component add "$2"
}
cargo fmt --version >/dev/null 2>&1 || add_component fmt rustfmt
cargo clippy --version >/dev/null 2>&1 || add_component clippy clippy

echo "test: cargo fmt --all -- --check"
cargo fmt --all -- --check

echo "test: cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

echo "test: TEST_MQTT_PROTOCOL=3.1.1 cargo nextest run --workspace --no-fail-fast --profile ci $*"
v311=0
TEST_MQTT_PROTOCOL=3.1.1 cargo nextest run --workspace --no-fail-fast --profile ci "$@" || v311=$?

# Every test binary that runs the service's ingest path, once more under MQTT 5.
INGEST_PATH='binary(ingest) | binary(codehubot) | binary(faults) | binary(keep) | binary(tls) | binary(scale) | binary(ops) | binary(systemd) | binary(hostile) | binary(chaos)'
echo "test: TEST_MQTT_PROTOCOL=5 cargo nextest run --workspace --no-fail-fast --profile ci -E '$INGEST_PATH' $*"
v5=0
TEST_MQTT_PROTOCOL=5 cargo nextest run --workspace --no-fail-fast --profile ci -E "$INGEST_PATH" "$@" || v5=$?

if ((v311 != 0 || v5 != 0)); then
    echo "test: FAILED (MQTT 3.1.1 run: exit $v311, MQTT 5 run: exit $v5)" >&2
    exit 1
fi
echo "test: all passed under MQTT 3.1.1 and MQTT 5"
