#!/usr/bin/env bash
# Runs the service from this checkout: creates .env from .env.example on first
# use (a database user of its own, mqtt_ingest, with a generated password),
# prepares the machine (scripts/setup.sh), then builds and starts mqtt-ingest in
# release mode. Extra arguments go to the binary.
set -euo pipefail

cd "$(dirname "$0")/.."

# First use: .env from .env.example, with a database user of the service's own and a generated
# password (scripts/setup.sh creates that user on a local server; root is never used).
if [[ ! -f .env ]]; then
    password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    (
        umask 077
        sed -e "s/^DB_USER=.*/DB_USER=mqtt_ingest/" -e "s/^DB_PASSWORD=.*/DB_PASSWORD=$password/" \
            .env.example >.env
    )
    echo "run: created .env from .env.example, with DB_USER=mqtt_ingest and a generated DB_PASSWORD (edit it to change settings)"
fi

scripts/setup.sh

exec cargo run --release --bin mqtt-ingest -- "$@"
