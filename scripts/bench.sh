#!/usr/bin/env bash
# Builds the service and the benchmark in release mode, then runs the benchmark (issue 3).
#
#   scripts/bench.sh                       # every scenario once, full size (a few minutes)
#   scripts/bench.sh --scale 0.1           # a quick smoke run at a tenth of the size
#   scripts/bench.sh --runs 3              # the whole set three times, then the medians
#   scripts/bench.sh --scenario drain-100,broker-100 --service-env INGEST_BATCH_MAX_WAIT_MS=5
#   scripts/bench.sh --help                # every option
#
# Every argument is passed to target/release/mqtt-ingest-bench unchanged.
#
# What it needs (scripts/setup.sh installs them): /usr/sbin/mosquitto and /usr/bin/mosquitto_sub,
# MariaDB or MySQL on 127.0.0.1:3306 whose user (root, empty password by default; see --db-user,
# --db-password) may CREATE and DROP databases.
#
# What it touches: nothing shared. It starts its own Mosquitto on a free 127.0.0.1 port (never
# the broker on 1883), creates the database bench_<random> and drops it at the end (also on
# Ctrl-C), and runs the service as its child. Only 127.0.0.1 is accepted.
#
# Output: progress on stderr, the table on stdout, JSON in target/bench/results-<unix time>.json
# (--json PATH for another file). Exit status 0 only if every scenario ran and nothing was lost.
#
# The machine is shared by the service, MariaDB, Mosquitto and the benchmark itself: compare
# figures only within one run (the broker and database limits are measured in the same run).
set -euo pipefail

cd "$(dirname "$0")/.."

cargo build --release --workspace --bins

exec target/release/mqtt-ingest-bench "$@"
