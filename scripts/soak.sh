#!/usr/bin/env bash
# The soak (issue 4): 1,000,000 messages from 1,000 devices through the real service binary,
# with its own private Mosquitto (free port, max_queued_messages 100000) and private MariaDB
# (own data dir), sampling the service's RSS every 2 s. Exits non-zero unless RSS after warm-up
# (the first 30% of the messages, SOAK_WARMUP_PCT) stays within 10% of the warm-up peak,
# every device ends at its last acknowledged seq, and the service's final counters add up
# (total = succeeded + failed).
#
#   scripts/soak.sh                                   # 1,000,000 x 1,000 devices
#   SOAK_MESSAGES=100000 SOAK_DEVICES=100 scripts/soak.sh   # a quick one
#
# Touches nothing shared: the test harness starts and removes its own servers.
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_MESSAGES="${SOAK_MESSAGES:-1000000}" SOAK_DEVICES="${SOAK_DEVICES:-1000}"
exec cargo test --release --test it -- --ignored --exact soak::soak --nocapture
