#!/usr/bin/env bash
# Prints the broker compatibility matrix of docs/brokers.md: runs the release binary against
# Mosquitto, rumqttd, aedes, amqtt and ejabberd (or the ones named), each installed from its
# package registry into target/broker-matrix/ and run as a private instance on 127.0.0.1.
# Slow (about 10 minutes per broker), so not part of scripts/test.sh. Needs root for ejabberd's
# apt-get install. Usage: scripts/broker-matrix.sh [mosquitto rumqttd aedes amqtt ejabberd], or
# scripts/broker-matrix.sh --one-in-flight OTHER_BINARY (a queued backlog drained through
# ejabberd's window of one message, this build against another, alternating).
set -euo pipefail

cd "$(dirname "$0")/.."

# MariaDB and Mosquitto (mosquitto_pub publishes the devices' messages), and the account the
# tests use (target/test-db.env).
scripts/setup.sh --for-tests
if [[ -f target/test-db.env ]]; then
    set -a
    # shellcheck source=/dev/null
    . target/test-db.env
    set +a
fi
cargo build --release --bin mqtt-ingest
exec python3 scripts/broker-matrix.py "$@"
