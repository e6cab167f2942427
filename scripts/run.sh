#!/usr/bin/env bash
# Runs the service from this checkout: prepares the machine (scripts/setup.sh),
# creates .env from .env.example on first use, then builds and starts
# mqtt-ingest in release mode. Extra arguments go to the binary.
set -euo pipefail

cd "$(dirname "$0")/.."

scripts/setup.sh

if [[ ! -f .env ]]; then
    cp .env.example .env
    chmod 0600 .env
    echo "run: created .env from .env.example (edit it to change settings)"
fi

exec cargo run --release --bin mqtt-ingest -- "$@"
