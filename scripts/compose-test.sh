#!/usr/bin/env bash
# The compose stack (docker/docker-compose.yml), run for real: builds the images, brings the
# stack up on free ports, publishes the seed README's payloads and the firmware's from this
# host, checks the rows, /metrics and /readyz through the published ports, stops the service's
# container with SIGTERM while devices publish and checks that it exited cleanly and that
# nothing taken in was lost, then brings the stack down and removes what it made.
#
#   scripts/compose-test.sh            (as root, or a user who may sudo)
#
# Exit status: 0 passed, 77 skipped (no engine can be installed or run here), else failed.
#
# Engine: Docker where its daemon answers (`docker compose`), else podman with podman-compose,
# installed with runc (and debootstrap, the clients) where missing. podman runs under runc with
# the ulimits of target/compose/containers.conf (crun fails on hosts with hybrid cgroups), given
# through CONTAINERS_CONF without touching /etc.
#
# Images: the real ones are pulled where a registry answers. Where none does, stand-ins are built
# once and tagged with the real names (docker/standins/README.md says how each differs); they
# and the builder's cache stay in the engine's store, so a later run builds only what changed.
#
# COMPOSE_TEST_KEEP=1 leaves the stack up for a look (printed: how to take it down).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$ROOT/target/compose
T0=$(date +%s)

say() { printf 'compose-test: [%4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() {
    printf 'compose-test: FAILED: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

if [[ $EUID -ne 0 ]]; then
    have sudo || die "run as root (podman runs rootful here), or install sudo"
    exec sudo --preserve-env=PATH,HOME,COMPOSE_TEST_KEEP "$0" "$@"
fi
mkdir -p "$WORK"

# ------------------------------------------------------------------ engine --

missing=()
for pair in mosquitto_pub:mosquitto-clients mariadb:mariadb-client curl:curl python3:python3; do
    have "${pair%%:*}" || missing+=("${pair#*:}")
done
ENGINE=podman
if have docker && docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    ENGINE=docker
else
    for pair in podman:podman runc:runc podman-compose:podman-compose debootstrap:debootstrap; do
        have "${pair%%:*}" || missing+=("${pair#*:}")
    done
fi
# Exit 77: this machine cannot run the stack (CI reports it as skipped, not failed).
skip() {
    printf 'compose-test: SKIPPED: %s\n' "$*" >&2
    exit 77
}
if ((${#missing[@]})); then
    have apt-get || skip "missing ${missing[*]}, and apt-get is not available"
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null ||
        skip "cannot install ${missing[*]}"
fi
if [[ $ENGINE == podman ]]; then
    cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF
    export CONTAINERS_CONF=$WORK/containers.conf
    podman info >/dev/null 2>&1 || skip "podman cannot run here: $(podman info 2>&1 | tail -1)"
    say "engine: $(podman --version), podman-compose $(podman-compose version 2>/dev/null | awk '/podman-compose/ { print $NF; exit }' || true)"
else
    say "engine: $(docker --version), $(docker compose version)"
fi
engine() { "$ENGINE" "$@"; }

# ------------------------------------------------------------------ images --

BASE=localhost/mqtt-ingest-standin-base:bookworm

# The Debian 12 minbase root every stand-in starts from.
standin_base() {
    engine image exists "$BASE" 2>/dev/null && return 0
    local rootfs=$WORK/rootfs
    rm -rf "$rootfs"
    say "stand-in base: debootstrap (Debian 12 minbase)"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" \
        http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
        die "debootstrap failed: see $WORK/debootstrap.log"
    # The mirror may serve a snapshot whose Release file has expired.
    printf 'Acquire::Check-Valid-Until "false";\n' >"$rootfs/etc/apt/apt.conf.d/99no-valid-until"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | engine import - "$BASE" >/dev/null 2>&1
    rm -rf "$rootfs"
}

# The host's Rust toolchain and CA bundle, as the stand-in rust image's build context.
rust_context() {
    local ctx=$WORK/rust-context sysroot
    sysroot=$(rustc --print sysroot) || die "no Rust toolchain on this host"
    rm -rf "$ctx"
    mkdir -p "$ctx/toolchain"
    cp docker/standins/Containerfile.rust "$ctx/"
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/host-ca.crt"
    # bin and lib are the compiler and the standard library; share holds only documentation.
    cp -a "$sysroot/bin" "$sysroot/lib" "$ctx/toolchain/"
    [[ -d $sysroot/libexec ]] && cp -a "$sysroot/libexec" "$ctx/toolchain/"
    echo "$ctx"
}

# Pulls NAME from Docker Hub, or builds its stand-in; fails for one that has none.
image() {
    local name=$1 full=docker.io/library/$1
    [[ $name == */* ]] && full=docker.io/$name
    if engine image exists "$full" 2>/dev/null || engine image inspect "$full" >/dev/null 2>&1; then
        return 0
    fi
    if timeout 60 "$ENGINE" pull -q "$full" >/dev/null 2>&1; then
        say "pulled $full"
        return 0
    fi
    [[ $ENGINE == podman ]] || die "cannot pull $full"
    standin_base
    say "no registry answers: building the stand-in for $name"
    case $name in
        debian:bookworm-slim) engine tag "$BASE" "$full" ;;
        eclipse-mosquitto:2)
            engine build -q -f docker/standins/Containerfile.mosquitto -t "$full" docker/standins >>"$WORK/standins.log" 2>&1
            ;;
        mysql:8.0)
            engine build -q -f docker/standins/Containerfile.mysql -t "$full" docker/standins >>"$WORK/standins.log" 2>&1
            ;;
        prom/prometheus:v2.53.3)
            engine build -q -f docker/standins/Containerfile.prometheus -t "$full" docker/standins >>"$WORK/standins.log" 2>&1
            ;;
        rust:1.95-bookworm)
            local ctx
            ctx=$(rust_context)
            engine build -q -f "$ctx/Containerfile.rust" -t "$full" "$ctx" >>"$WORK/standins.log" 2>&1
            rm -rf "$ctx"
            ;;
        *) return 1 ;;
    esac
}

t=$(date +%s)
for name in debian:bookworm-slim rust:1.95-bookworm eclipse-mosquitto:2 mysql:8.0 prom/prometheus:v2.53.3; do
    image "$name"
done
# Grafana has no stand-in: it is in no Debian release, and no other registry answers here.
SERVICES=(mosquitto mysql mqtt-ingest prometheus)
GRAFANA=false
if image grafana/grafana-oss:11.3.0; then
    GRAFANA=true
    SERVICES+=(grafana)
else
    say "no grafana image can be pulled (and there is no stand-in): the stack runs without it"
fi
IMAGES_SECS=$(($(date +%s) - t))
say "base images ready (${IMAGES_SECS}s)"

IMAGE=localhost/mqtt-ingest:compose-test
t=$(date +%s)
say "building the service's image (docker/Dockerfile)"
engine build -q -f docker/Dockerfile -t "$IMAGE" . >"$WORK/build.log" 2>&1 ||
    {
        tail -30 "$WORK/build.log" >&2
        die "the image build failed: $WORK/build.log"
    }
BUILD_SECS=$(($(date +%s) - t))
# The builder stage is left as a dangling image each build (the cargo caches are kept apart).
engine image prune -f >/dev/null 2>&1 || true
SIZE=$(engine image inspect "$IMAGE" --format '{{.Size}}')
say "service image built in ${BUILD_SECS}s: $((SIZE / 1000000)) MB"

# ------------------------------------------------------------------- stack --

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PROJECT=mitest$$
export MQTT_PUBLISH_PORT DB_PUBLISH_PORT HTTP_PUBLISH_PORT PROMETHEUS_PUBLISH_PORT GRAFANA_PUBLISH_PORT
MQTT_PUBLISH_PORT=$(free_port)
DB_PUBLISH_PORT=$(free_port)
HTTP_PUBLISH_PORT=$(free_port)
PROMETHEUS_PUBLISH_PORT=$(free_port)
GRAFANA_PUBLISH_PORT=$(free_port)
export DB_PASSWORD="pw-$PROJECT-$RANDOM"
export DB_NAME=aiot_admin
export MQTT_INGEST_IMAGE=$IMAGE
export MQTT_INGEST_ENV_FILE=$WORK/stack.env
# The service's settings: docker/.env.example with the password, history on (the loss check
# counts its rows) and a short presence sweep out of the way.
sed -e "s/^DB_PASSWORD=.*/DB_PASSWORD=$DB_PASSWORD/" \
    -e "s/^HISTORY_ENABLED=.*/HISTORY_ENABLED=true/" \
    -e "s/^COMPOSE_PROJECT_NAME=.*/COMPOSE_PROJECT_NAME=$PROJECT/" \
    docker/.env.example >"$MQTT_INGEST_ENV_FILE"

compose() {
    if [[ $ENGINE == docker ]]; then
        docker compose -p "$PROJECT" -f docker/docker-compose.yml -f docker/monitoring.yml "$@"
    else
        podman-compose -p "$PROJECT" -f docker/docker-compose.yml -f docker/monitoring.yml "$@"
    fi
}

# What the stack leaves behind once down (podman-compose 1.0.3 leaves networks and volumes).
leftovers() {
    engine ps -a --format '{{.Names}}' | grep "^$PROJECT[_-]" || true
    engine volume ls --format '{{.Name}}' | grep "^$PROJECT[_-]" || true
    engine network ls --format '{{.Name}}' | grep "^$PROJECT[_-]" || true
}

down() {
    compose down -v >"$WORK/down.log" 2>&1 || true
    local left
    left=$(leftovers)
    if [[ -n $left ]]; then
        for c in $(engine ps -a --format '{{.Names}}' | grep "^$PROJECT[_-]" || true); do engine rm -f "$c" >/dev/null 2>&1 || true; done
        for v in $(engine volume ls --format '{{.Name}}' | grep "^$PROJECT[_-]" || true); do engine volume rm -f "$v" >/dev/null 2>&1 || true; done
        for n in $(engine network ls --format '{{.Name}}' | grep "^$PROJECT[_-]" || true); do engine network rm -f "$n" >/dev/null 2>&1 || true; done
        [[ $ENGINE == podman ]] && engine pod rm -f "pod_$PROJECT" >/dev/null 2>&1 || true
    fi
}

on_exit() {
    local code=$?
    if [[ ${COMPOSE_TEST_KEEP:-} == 1 ]]; then
        say "kept up: $ENGINE ps; take it down with: cd $ROOT && CONTAINERS_CONF=${CONTAINERS_CONF:-} $ENGINE-compose -p $PROJECT -f docker/docker-compose.yml down -v"
        return
    fi
    if ((code != 0)); then
        say "the service's log, last lines:"
        engine logs --tail 40 "$(service_container)" 2>&1 | sed 's/^/    /' >&2 || true
    fi
    down
}

service_container() {
    engine ps -a --format '{{.Names}}' | grep -E "^$PROJECT[_-]mqtt-ingest[_-]1$" | head -1
}

trap on_exit EXIT
t=$(date +%s)
say "up: project $PROJECT (${SERVICES[*]}), MQTT on $MQTT_PUBLISH_PORT, MySQL on 127.0.0.1:$DB_PUBLISH_PORT, HTTP on 127.0.0.1:$HTTP_PUBLISH_PORT, Prometheus on 127.0.0.1:$PROMETHEUS_PUBLISH_PORT"
compose up -d "${SERVICES[@]}" >"$WORK/up.log" 2>&1 || {
    tail -20 "$WORK/up.log" >&2
    die "compose up failed: $WORK/up.log"
}
UP_SECS=$(($(date +%s) - t))

# Polls CHECK (a command) every half second until it succeeds or LIMIT seconds pass: the stack's
# health checks are not run by podman-compose, so the test watches the published ports itself.
wait_for() {
    local what=$1 limit=$2 deadline
    shift 2
    deadline=$(($(date +%s) + limit))
    until "$@" >/dev/null 2>&1; do
        (($(date +%s) < deadline)) || die "$what: not within ${limit}s"
        sleep 0.5
    done
}

sql() {
    MYSQL_PWD=$DB_PASSWORD mariadb -h 127.0.0.1 -P "$DB_PUBLISH_PORT" -uroot --batch --skip-column-names "$DB_NAME" -e "$1"
}
readyz() { curl -fsS "http://127.0.0.1:$HTTP_PUBLISH_PORT/readyz"; }
metric() {
    curl -fsS "http://127.0.0.1:$HTTP_PUBLISH_PORT/metrics" | awk -v m="$1" '$1 == m { print $2 }'
}

wait_for "the database through 127.0.0.1:$DB_PUBLISH_PORT" 180 sql "SELECT 1"
DB_SECS=$(($(date +%s) - t))
wait_for "/readyz 200 through 127.0.0.1:$HTTP_PUBLISH_PORT" 120 readyz
READY_SECS=$(($(date +%s) - t))
say "database answers at ${DB_SECS}s, /readyz 200 at ${READY_SECS}s after up"

user=$(engine inspect "$(service_container)" --format '{{.Config.User}}')
readonly_root=$(engine inspect "$(service_container)" --format '{{.HostConfig.ReadonlyRootfs}}')
[[ $user == 10001:10001 ]] || die "the service runs as '$user', not 10001:10001"
[[ $readonly_root == true ]] || die "the service's root filesystem is not read-only"
say "the service runs as $user on a read-only root filesystem"

# ----------------------------------------------------------- the payloads --

BOARD=550e8400-e29b-41d4-a716-446655440001
RAIN=550e8400-e29b-41d4-a716-446655440002
SEED=550e8400-e29b-41d4-a716-446655440003
BEATS=550e8400-e29b-41d4-a716-446655440004
LOAD=(550e8400-e29b-41d4-a716-4466554400a1 550e8400-e29b-41d4-a716-4466554400a2 550e8400-e29b-41d4-a716-4466554400a3)
for uuid in $BOARD $RAIN $SEED $BEATS "${LOAD[@]}"; do
    sql "INSERT INTO device_main (device_id, uuid, name) VALUES ('dev-$uuid', '$uuid', 'Board $uuid')"
done

pub() { mosquitto_pub -h 127.0.0.1 -p "$MQTT_PUBLISH_PORT" -q 1 -t "devices/$1/$2" -m "$3"; }
# The firmware's format strings (CodeHubot-Fireware) …
pub $BOARD heartbeat '{"sequence":7,"timestamp":90512,"status":1}'
pub $BOARD data '{"device_id":"AIOT-ESP32-6E0067F6","sensor":"DHT11","temperature":24.3,"humidity":55.0,"timestamp":90}'
pub $BOARD data '{"device_id":"AIOT-ESP32-6E0067F6","sensor":"DS18B20","temperature":23.8,"timestamp":90}'
pub $BOARD status '{"device_id":"AIOT-ESP32-6E0067F6","uptime":90,"free_heap":168432,"wifi_connected":true,"mqtt_connected":true,"ble_connected":false,"timestamp":90}'
pub $RAIN data '{"device_id":"AIOT-ESP32-12345678","sensor":"RAIN_SENSOR","is_raining":true,"level":0,"timestamp":100}'
pub $BEATS heartbeat '{"sequence":1,"timestamp":1000,"status":1}'
# … and the seed README's examples.
pub $SEED data '{"sensors":[{"sensor_name":"temperature","value":25.5,"unit":"°C"},{"sensor_name":"humidity","value":60,"unit":"%"}],"status":{"ip_address":"192.168.1.100","rssi":-50},"timestamp":"2025-12-19T14:30:00+08:00"}'
pub $SEED data '{"temperature": 25.5, "humidity": 60, "light": 850}'
pub $SEED status '{"status": "online", "battery": 95, "signal": "good"}'
pub $SEED heartbeat '{"timestamp": "2025-12-19T14:30:00+08:00"}'
PUBLISHED=10

want() { # SQL EXPECTED: the query's output becomes EXPECTED
    [[ $(sql "$1") == "$2" ]]
}
wait_for "the readings in device_main" 30 want \
    "SELECT CONCAT_WS(' ', JSON_EXTRACT(last_report_data, '\$.sensors.temperature.value'), JSON_EXTRACT(last_report_data, '\$.sensors.humidity.value'), is_online) FROM device_main WHERE uuid = '$BOARD'" \
    "23.8 55.0 1"
wait_for "the rain board" 30 want \
    "SELECT JSON_EXTRACT(last_report_data, '\$.sensors.is_raining.value') FROM device_main WHERE uuid = '$RAIN'" "true"
wait_for "the seed's shapes" 30 want \
    "SELECT CONCAT_WS(' ', JSON_EXTRACT(last_report_data, '\$.sensors.light.value'), JSON_UNQUOTE(JSON_EXTRACT(last_report_data, '\$.status.signal')), device_status, last_heartbeat IS NOT NULL) FROM device_main WHERE uuid = '$SEED'" \
    "850 good online 1"
wait_for "the heartbeat" 30 want \
    "SELECT last_heartbeat IS NOT NULL AND is_online FROM device_main WHERE uuid = '$BEATS'" "1"
written() { [[ $(metric mqtt_ingest_messages_written_total) -ge $1 ]]; }
wait_for "/metrics: $PUBLISHED messages written" 30 written $PUBLISHED
say "the firmware's and the seed's payloads are in device_main; /metrics counts $(metric mqtt_ingest_messages_written_total) written"

# -------------------------------------------------------------- monitoring --

# A PromQL query's first value, through the published port.
promql() {
    curl -fsS --get --data-urlencode "query=$1" "http://127.0.0.1:$PROMETHEUS_PUBLISH_PORT/api/v1/query" |
        python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}
alerting_rules() {
    curl -fsS "http://127.0.0.1:$PROMETHEUS_PUBLISH_PORT/api/v1/rules?type=alert" |
        python3 -c 'import json, sys; print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))'
}
scraped() { [[ $(promql 'up{job="mqtt-ingest"}') == 1 && $(promql 'mqtt_ingest_messages_written_total') -ge $PUBLISHED ]]; }
wait_for "Prometheus scraping the service (job mqtt-ingest)" 90 scraped
RULES=$(grep -c '^ *- alert:' ops/prometheus/alerts.yml)
[[ $(alerting_rules) == "$RULES" ]] || die "Prometheus loaded $(alerting_rules) alert rules, ops/prometheus/alerts.yml has $RULES"
firing=$(curl -fsS "http://127.0.0.1:$PROMETHEUS_PUBLISH_PORT/api/v1/alerts" |
    python3 -c 'import json, sys; print(" ".join(a["labels"]["alertname"] for a in json.load(sys.stdin)["data"]["alerts"] if a["state"] == "firing") or "none")')
say "Prometheus scrapes the service (job mqtt-ingest up, $(promql mqtt_ingest_messages_written_total) written) with the $RULES alert rules loaded; firing: $firing"
if [[ $GRAFANA == true ]]; then
    grafana() { curl -fsS -u "admin:${GRAFANA_ADMIN_PASSWORD:-admin}" "http://127.0.0.1:$GRAFANA_PUBLISH_PORT$1"; }
    wait_for "Grafana's API" 90 grafana /api/health
    grafana "/api/search?query=mqtt-ingest" | grep -q '"type":"dash-db"' || die "the dashboard is not provisioned in Grafana"
    say "Grafana has the dashboard and the Prometheus data source"
fi

# ------------------------------------------------- SIGTERM while publishing --

N=800
# One publisher per device, about 400 messages a second each, every message dated by its own
# time (so each is one row of device_history) and numbered.
start_ms=$(($(date +%s%3N) - 3600000))
pids=()
for i in "${!LOAD[@]}"; do
    uuid=${LOAD[$i]}
    python3 - "$N" "$start_ms" <<'EOF' | mosquitto_pub -h 127.0.0.1 -p "$MQTT_PUBLISH_PORT" -q 1 -t "devices/$uuid/data" -l &
import sys, time, datetime
n, start = int(sys.argv[1]), int(sys.argv[2])
zone = datetime.timezone(datetime.timedelta(hours=8))
for seq in range(1, n + 1):
    at = datetime.datetime.fromtimestamp((start + seq) / 1000, zone).isoformat(timespec="milliseconds")
    print('{"seq": %d, "timestamp": "%s"}' % (seq, at), flush=True)
    time.sleep(0.0025)
EOF
    pids+=($!)
done
history() { sql "SELECT COUNT(*) FROM device_history WHERE sensor = 'seq' AND device_uuid IN ('${LOAD[0]}', '${LOAD[1]}', '${LOAD[2]}')"; }
some_written() { [[ $(history) -gt 0 ]]; }
wait_for "the first of the publishers' messages" 30 some_written
container=$(service_container)
t=$(date +%s)
# (podman, without systemd, logs that it cannot remove the health check's timer: harmless.)
engine stop -t 45 "$container" >/dev/null 2>>"$WORK/engine.log"
STOP_SECS=$(($(date +%s) - t))
code=$(engine inspect "$container" --format '{{.State.ExitCode}}')
[[ $code == 0 ]] || die "the service exited $code after SIGTERM"
engine logs --tail 5 "$container" 2>&1 | grep -q "stopped" || die "no 'stopped' in the service's last lines"
say "SIGTERM during publishing: exit 0 in ${STOP_SECS}s with $(history) of $((3 * N)) rows written; starting it again"
engine start "$container" >/dev/null 2>>"$WORK/engine.log"
for pid in "${pids[@]}"; do wait "$pid" || die "a publisher failed"; done
all_written() { [[ $(history) -eq $((3 * N)) ]]; }
wait_for "every message published across the stop in device_history" 60 all_written
for uuid in "${LOAD[@]}"; do
    want "SELECT COUNT(DISTINCT value), MIN(value), MAX(value) FROM device_history WHERE device_uuid = '$uuid' AND sensor = 'seq'" \
        "$N	1	$N" || die "$uuid: device_history lacks messages"
    want "SELECT JSON_EXTRACT(last_report_data, '\$.sensors.seq.value') FROM device_main WHERE uuid = '$uuid'" "$N" ||
        die "$uuid: device_main does not hold the last message"
done
wait_for "/readyz 200 after the restart" 60 readyz
say "nothing lost: $((3 * N)) of $((3 * N)) messages in device_history, each device at its last"

# -------------------------------------------------------------------- down --

t=$(date +%s)
trap - EXIT
if [[ ${COMPOSE_TEST_KEEP:-} == 1 ]]; then
    on_exit
    exit 0
fi
down
DOWN_SECS=$(($(date +%s) - t))
[[ -z $(leftovers) ]] || die "left behind after down: $(leftovers | tr '\n' ' ')"
say "down in ${DOWN_SECS}s, nothing left behind"
say "timings: base images ${IMAGES_SECS}s, service image ${BUILD_SECS}s ($((SIZE / 1000000)) MB), up ${UP_SECS}s, database ${DB_SECS}s, ready ${READY_SECS}s, SIGTERM stop ${STOP_SECS}s, down ${DOWN_SECS}s; total $(($(date +%s) - T0))s"
echo "compose-test: passed"
