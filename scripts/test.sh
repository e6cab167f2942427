#!/usr/bin/env bash
# Runs every check the project has: formatting, clippy, and the whole test
# suite under cargo-nextest (profile "ci" in .config/nextest.toml).
# Prepares the machine first (scripts/setup.sh), so a fresh Debian/Ubuntu box
# gets MariaDB and Mosquitto. Extra arguments go to `cargo nextest run`.
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

echo "test: cargo nextest run --workspace --no-fail-fast --profile ci $*"
cargo nextest run --workspace --no-fail-fast --profile ci "$@"
