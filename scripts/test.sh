#!/usr/bin/env bash
# Runs every check the project has: formatting, clippy, and the whole test
# suite under cargo-nextest (profile "ci" in .config/nextest.toml) when it is
# installed, else under plain cargo test, with the service under test speaking
# MQTT 3.1.1; then the ingest-path tests again with it speaking MQTT 5
# (TEST_MQTT_PROTOCOL, read by tests/app).
# Prepares the machine first (scripts/setup.sh), so a fresh Debian/Ubuntu box
# gets MariaDB and Mosquitto. Extra arguments go to both test runs.
set -euo pipefail

cd "$(dirname "$0")/.."

scripts/setup.sh --for-tests
# The account the tests log in with (root over TCP where that works, else one of their own).
if [[ -f target/test-db.env ]]; then
    set -a
    # shellcheck source=/dev/null
    . target/test-db.env
    set +a
fi
# The tests' own account (made by setup.sh where root cannot log in over TCP) may create users
# and holds every right on mi_* databases: it is dropped when the tests end, and made anew by the
# next run.
drop_test_account() {
    [[ ${TEST_DB_USER:-} == mqtt_ingest_test ]] || return 0
    local cli sudo=()
    cli=$(command -v mariadb || command -v mysql) || return 0
    [[ $(id -u) -ne 0 ]] && sudo=(sudo)
    "${sudo[@]}" "$cli" -e "DROP USER IF EXISTS 'mqtt_ingest_test'@'localhost', 'mqtt_ingest_test'@'127.0.0.1'" &&
        echo "test: the tests' database account mqtt_ingest_test dropped"
}
trap drop_test_account EXIT

# cargo-nextest when it is installed (a process per test, the "ci" profile's timeouts); plain
# cargo test otherwise: compiling nextest from source would take longer than the whole suite.
if cargo nextest --version >/dev/null 2>&1; then
    runner=nextest
else
    runner=cargo-test
    echo "test: cargo-nextest is not installed: running plain cargo test (cargo install --locked cargo-nextest for the faster runner)"
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

echo "test: cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# Every test module (of the one integration binary, tests/it) that runs the service's ingest
# path runs once more under MQTT 5.
INGEST_MODULES=(ingest codehubot faults keep tls scale ops systemd hostile chaos strict brokers cluster)
v311=0
v5=0
if [[ $runner == nextest ]]; then
    echo "test: TEST_MQTT_PROTOCOL=3.1.1 cargo nextest run --workspace --no-fail-fast --profile ci $*"
    TEST_MQTT_PROTOCOL=3.1.1 cargo nextest run --workspace --no-fail-fast --profile ci "$@" || v311=$?
    filter=$(printf 'test(/^%s::/) | ' "${INGEST_MODULES[@]}")
    filter="binary(it) & (${filter% | })"
    echo "test: TEST_MQTT_PROTOCOL=5 cargo nextest run --workspace --no-fail-fast --profile ci -E '$filter' $*"
    TEST_MQTT_PROTOCOL=5 cargo nextest run --workspace --no-fail-fast --profile ci -E "$filter" "$@" || v5=$?
else
    echo "test: TEST_MQTT_PROTOCOL=3.1.1 cargo test --workspace --no-fail-fast $*"
    TEST_MQTT_PROTOCOL=3.1.1 cargo test --workspace --no-fail-fast "$@" || v311=$?
    modules=$(printf -- '%s:: ' "${INGEST_MODULES[@]}")
    echo "test: TEST_MQTT_PROTOCOL=5 cargo test --no-fail-fast --test it $* -- $modules"
    # shellcheck disable=SC2086 # $modules is a list of words
    TEST_MQTT_PROTOCOL=5 cargo test --no-fail-fast --test it "$@" -- $modules || v5=$?
fi

if ((v311 != 0 || v5 != 0)); then
    echo "test: FAILED (MQTT 3.1.1 run: exit $v311, MQTT 5 run: exit $v5)" >&2
    exit 1
fi
echo "test: all passed under MQTT 3.1.1 and MQTT 5"
