#!/usr/bin/env bash
# Fault (b) of issue 4: the database down for 2 minutes at a steady 200 msg/s (20 devices),
# the real service binary, its RSS sampled every second. Exits non-zero unless every message
# the broker acknowledged reached the table (device_history), no device's state went backwards,
# RSS stayed flat during the outage (second-half peak within 10% of the first-half peak, and
# under +64 MiB) and the final counters add up.
#
#   scripts/fault-db-outage.sh
#   OUTAGE_SECS=300 OUTAGE_RATE=500 scripts/fault-db-outage.sh
#
# The broker must queue rate x outage messages for the service's session (24,000 here): the
# private Mosquitto it starts has max_queued_messages 100000 (the default, 1000, drops the rest
# silently). Private MariaDB and Mosquitto on free ports with their own data dirs; nothing shared
# is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --release --test it -- --ignored --exact \
    chaos::database_down_two_minutes_no_loss_and_bounded_memory --nocapture
