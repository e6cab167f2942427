#!/usr/bin/env bash
# A clustered topology on this machine, for docs/scale-out.md and the bench's cluster runner:
# three RMQTT broker nodes (raft cluster, shared subscriptions) and three MariaDB Galera nodes,
# each on free local ports, with their files under one directory.
#
#   scripts/cluster.sh up        install what is missing, start all six nodes, wait until the raft
#                                cluster has a leader and wsrep_cluster_size = 3, print the addresses
#   scripts/cluster.sh status    what runs, and the addresses
#   scripts/cluster.sh down      stop exactly what `up` started, remove its files
#   scripts/cluster.sh kill broker|db N     SIGKILL node N (1-3), for fault scenarios
#   scripts/cluster.sh start broker|db N    start node N again (a Galera node rejoins by IST from
#                                           its recovered position)
#   scripts/cluster.sh env       the addresses as MQTT_BROKER=… DB_HOST=… lines (for `source`)
#
# Settings (environment):
#   CLUSTER_DIR        where the nodes keep their files (default: target/cluster)
#   CLUSTER_STRATEGY   RMQTT's shared-subscription strategy: round_robin (default) or hash_topic
#                      (one device's messages always to the same instance)
#   CLUSTER_BROKERS_ONLY=1 / CLUSTER_DB_ONLY=1   start only one of the two clusters
#   RMQTTD             the rmqttd binary (default: on PATH or ~/.cargo/bin; installed with
#                      `cargo install --locked rmqttd --version 0.24.0` when missing, ~20 minutes
#                      on two cores, once: cargo keeps it)
set -euo pipefail

cd "$(dirname "$0")/.."
CLUSTER_DIR=$(realpath -m "${CLUSTER_DIR:-$PWD/target/cluster}")
CLUSTER_STRATEGY=${CLUSTER_STRATEGY:-round_robin}
RMQTT_VERSION=0.24.0
NODES=(1 2 3)

say() { printf 'cluster: %s\n' "$*"; }
die() {
    printf 'cluster: ERROR: %s\n' "$*" >&2
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

SUDO=()
[[ $(id -u) -ne 0 ]] && SUDO=(sudo)

ports_file() { printf '%s/ports' "$CLUSTER_DIR"; }

# ------------------------------------------------------------------ ports --

declare -A PORT
taken=" "
port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 20000))
        [[ $taken == *" $p "* ]] && continue
        port_free "$p" || continue
        taken+="$p "
        printf '%s' "$p"
        return
    done
}
assign_ports() {
    local n kind
    for n in "${NODES[@]}"; do
        for kind in mqtt rpc raft http sql gcomm ist sst; do
            PORT[$kind$n]=$(free_port)
        done
    done
    mkdir -p "$CLUSTER_DIR"
    : >"$(ports_file)"
    for kind in "${!PORT[@]}"; do
        printf '%s=%s\n' "$kind" "${PORT[$kind]}" >>"$(ports_file)"
    done
}
load_ports() {
    [[ -f $(ports_file) ]] || die "nothing is up (no $(ports_file)); run: scripts/cluster.sh up"
    local line
    while IFS='=' read -r k v; do PORT[$k]=$v; done <"$(ports_file)"
}

addresses() {
    local n brokers=() dbs=()
    for n in "${NODES[@]}"; do
        brokers+=("127.0.0.1:${PORT[mqtt$n]}")
        dbs+=("127.0.0.1:${PORT[sql$n]}")
    done
    local IFS=,
    printf 'MQTT_BROKER=%s\nDB_HOST=%s\n' "${brokers[*]}" "${dbs[*]}"
}

# --------------------------------------------------------------- install --

rmqttd_bin() {
    if [[ -n ${RMQTTD:-} ]]; then
        printf '%s' "$RMQTTD"
    elif have rmqttd; then
        command -v rmqttd
    elif [[ -x $HOME/.cargo/bin/rmqttd ]]; then
        printf '%s' "$HOME/.cargo/bin/rmqttd"
    else
        return 1
    fi
}

install_missing() {
    local packages=()
    if [[ ${CLUSTER_DB_ONLY:-} != 1 ]] && ! rmqttd_bin >/dev/null; then
        # rmqttd's build scripts: protoc for its gRPC plugin, cmake and a C++ compiler for the
        # Kafka bridge's librdkafka.
        have protoc || packages+=(protobuf-compiler)
        have cmake || packages+=(cmake)
        have g++ || packages+=(g++)
    fi
    if [[ ${CLUSTER_BROKERS_ONLY:-} != 1 ]]; then
        [[ -e /usr/lib/galera/libgalera_smm.so ]] || packages+=(galera-4)
        have mariadbd || [[ -x /usr/sbin/mariadbd ]] || packages+=(mariadb-server)
        have mariadb || packages+=(mariadb-client)
        have rsync || packages+=(rsync)
    fi
    have curl || packages+=(curl)
    if ((${#packages[@]} > 0)); then
        say "installing ${packages[*]} (apt-get)"
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
    fi
    if [[ ${CLUSTER_DB_ONLY:-} != 1 ]] && ! rmqttd_bin >/dev/null; then
        say "building rmqttd $RMQTT_VERSION (cargo install --locked; about 20 minutes on two cores, once)"
        cargo install --locked rmqttd --version "$RMQTT_VERSION"
    fi
}

# ---------------------------------------------------------------- brokers --

broker_dir() { printf '%s/rmqtt/%s' "$CLUSTER_DIR" "$1"; }

write_broker_config() {
    local n=$1 dir grpc=() peers=() m
    dir=$(broker_dir "$n")
    mkdir -p "$dir/plugins" "$dir/log"
    for m in "${NODES[@]}"; do
        grpc+=("\"$m@127.0.0.1:${PORT[rpc$m]}\"")
        peers+=("\"$m@127.0.0.1:${PORT[raft$m]}\"")
    done
    local IFS=,
    cat >"$dir/rmqtt.toml" <<EOF
# Written by scripts/cluster.sh; see docs/scale-out.md for each setting.
node.id = $n
# On by default: refuses connections while the machine's CPU is above 90 %, which a loaded
# two-core machine always is.
node.busy.check_enable = false
rpc.server_addr = "127.0.0.1:${PORT[rpc$n]}"
log.to = "file"
log.level = "info"
log.dir = "$dir/log"
log.file = "rmqtt.log"
plugins.dir = "$dir/plugins/"
# Without rmqtt-shared-subscription a \$share subscription is refused (MQTT 3.1.1: the
# connection is dropped). Started anyway: rmqtt-acl, rmqtt-counter, rmqtt-http-api.
plugins.default_startups = ["rmqtt-cluster-raft", "rmqtt-shared-subscription"]

listener.tcp.external.addr = "127.0.0.1:${PORT[mqtt$n]}"
listener.tcp.external.allow_anonymous = true
listener.tcp.external.max_packet_size = "1m"
listener.tcp.external.max_inflight = 128
# The defaults lose queued messages: 1000 per session (the oldest QoS 1 message dropped when
# full), expiry after 5 minutes. A session's queue must outlast an instance's restart.
listener.tcp.external.max_mqueue_len = 1000000
listener.tcp.external.message_expiry_interval = "0"
listener.tcp.external.session_expiry_interval = "24h"
listener.tcp.external.message_retry_interval = "20s"
listener.tcp.external.max_qos_allowed = 2
EOF
    cat >"$dir/plugins/rmqtt-cluster-raft.toml" <<EOF
node_grpc_addrs = [${grpc[*]}]
raft_peer_addrs = [${peers[*]}]
laddr = "127.0.0.1:${PORT[raft$n]}"
# With 0 (the default), nodes started together may each become their own leader.
leader_id = 1
try_lock_timeout = "8s"
# How long a node waits on another's answer (10 s by default): a client that reconnects with
# its client id after its node died waits for the takeover of its session there, and its
# connect times out first.
node_grpc_client_timeout = "2s"
compression = "zstd"
EOF
    cat >"$dir/plugins/rmqtt-http-api.toml" <<EOF
# Every node starts this API, on 6060 unless told otherwise.
http_laddr = "127.0.0.1:${PORT[http$n]}"
http_request_log = false
EOF
    cat >"$dir/plugins/rmqtt-shared-subscription.toml" <<EOF
# The same on every node. hash_topic: one topic (one device) always to the same member.
strategy = "$CLUSTER_STRATEGY"
EOF
}

start_broker() {
    local n=$1 dir bin
    dir=$(broker_dir "$n")
    bin=$(rmqttd_bin) || die "rmqttd is not installed"
    # rmqttd reads ./rmqtt.toml as well: start it in its own directory.
    (cd "$dir" && exec setsid "$bin" -f "$dir/rmqtt.toml" >"$dir/out.log" 2>&1 </dev/null) &
    echo $! >"$dir/pid"
}

broker_healthy() {
    local n=$1
    curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:${PORT[http$n]}/api/v1/health/check/$n" 2>/dev/null
}

wait_brokers() {
    local n i
    for n in "${NODES[@]}"; do
        for ((i = 0; i < 240; i++)); do
            broker_healthy "$n" && break
            node_alive "$(broker_dir "$n")" || die "rmqttd node $n exited; see $(broker_dir "$n")/out.log and log/"
            sleep 0.5
        done
        broker_healthy "$n" || die "rmqttd node $n has no leader after 120 s; see $(broker_dir "$n")/log/"
    done
    say "brokers: raft cluster of 3 with a leader (strategy $CLUSTER_STRATEGY)"
}

# ------------------------------------------------------------------ Galera --

db_dir() { printf '%s/galera/%s' "$CLUSTER_DIR" "$1"; }

galera_args() { # NODE BOOTSTRAP(true|false)
    local n=$1 dir others=() m
    dir=$(db_dir "$n")
    for m in "${NODES[@]}"; do
        others+=("127.0.0.1:${PORT[gcomm$m]}")
    done
    local IFS=,
    ARGS=(
        --no-defaults
        "--datadir=$dir/data" "--tmpdir=$dir/tmp"
        "--port=${PORT[sql$n]}" --bind-address=127.0.0.1
        "--socket=$dir/mariadbd.sock" "--pid-file=$dir/mariadbd.pid" "--log-error=$dir/mariadbd.err"
        --skip-name-resolve --innodb-buffer-pool-size=64M --innodb-log-file-size=32M
        --innodb-flush-log-at-trx-commit=2 --character-set-server=utf8mb4
        --collation-server=utf8mb4_general_ci --max-connections=500
        --wsrep-on=ON --wsrep-provider=/usr/lib/galera/libgalera_smm.so
        --wsrep-cluster-name=mqtt_ingest_cluster "--wsrep-node-name=node$n"
        "--wsrep-cluster-address=gcomm://${others[*]}"
        "--wsrep-node-address=127.0.0.1:${PORT[gcomm$n]}"
        "--wsrep-sst-receive-address=127.0.0.1:${PORT[sst$n]}" --wsrep-sst-method=rsync
        "--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:${PORT[gcomm$n]};ist.recv_addr=127.0.0.1:${PORT[ist$n]};gcache.size=256M"
        --binlog-format=ROW --innodb-autoinc-lock-mode=2 --default-storage-engine=InnoDB
    )
    [[ $(id -u) -eq 0 ]] && ARGS+=(--user=root)
    [[ $2 == true ]] && ARGS+=(--wsrep-new-cluster)
    return 0
}

install_db_node() { # NODE BOOTSTRAP
    local n=$1 dir
    dir=$(db_dir "$n")
    mkdir -p "$dir/tmp" "$dir/data"
    if [[ $2 == true ]]; then
        local args=(--no-defaults "--datadir=$dir/data" "--tmpdir=$dir/tmp"
            --auth-root-authentication-method=normal --skip-test-db)
        [[ $(id -u) -eq 0 ]] && args+=(--user=root)
        mariadb-install-db "${args[@]}" >"$dir/install.log" 2>&1 || die "mariadb-install-db failed; see $dir/install.log"
    fi
    # A joiner starts empty and receives the whole state through an rsync daemon that, started
    # by root, runs as nobody (wsrep_sst_rsync names no user): it must be able to write there.
    chmod 0755 "$CLUSTER_DIR" "$CLUSTER_DIR/galera" "$dir"
    chmod 0777 "$dir/data" "$dir/tmp"
}

mariadbd_bin() { command -v mariadbd || printf '/usr/sbin/mariadbd'; }

start_db() { # NODE BOOTSTRAP [START_POSITION]
    local n=$1 dir
    dir=$(db_dir "$n")
    galera_args "$n" "$2"
    [[ -n ${3:-} ]] && ARGS+=("--wsrep-start-position=$3")
    setsid "$(mariadbd_bin)" "${ARGS[@]}" >"$dir/out.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
}

db_status() { # NODE VARIABLE
    mariadb --protocol=tcp -h 127.0.0.1 -P "${PORT[sql$1]}" -uroot -N -B \
        -e "SHOW STATUS LIKE '$2'" 2>/dev/null | cut -f2
}

wait_db() { # NODE SIZE
    local n=$1 size=$2 i
    for ((i = 0; i < 480; i++)); do
        if [[ $(db_status "$n" wsrep_local_state_comment) == Synced &&
            $(db_status "$n" wsrep_cluster_size) -ge $size ]]; then
            return 0
        fi
        node_alive "$(db_dir "$n")" || die "Galera node $n exited; see $(db_dir "$n")/mariadbd.err"
        sleep 0.25
    done
    die "Galera node $n not synced in a cluster of $size after 120 s; see $(db_dir "$n")/mariadbd.err"
}

# The position a killed node recovers from its own data, so that it rejoins by IST.
recovered_position() {
    local n=$1 dir log
    dir=$(db_dir "$n")
    log="$dir/recover.err"
    galera_args "$n" false
    local args=("${ARGS[@]}")
    args=("${args[@]/--log-error=*/--log-error=$log}")
    "$(mariadbd_bin)" "${args[@]}" --wsrep-recover >/dev/null 2>&1 || true
    sed -n 's/.*WSREP: Recovered position: *\([0-9a-f-]*:-\{0,1\}[0-9]*\).*/\1/p' "$log" | tail -1
}

# -------------------------------------------------------------- processes --

node_alive() {
    local pid
    pid=$(cat "$1/pid" 2>/dev/null) || return 1
    kill -0 "$pid" 2>/dev/null
}

kill_node() { # DIR SIGNAL
    local pid
    pid=$(cat "$1/pid" 2>/dev/null) || return 0
    kill "-$2" "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 240; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$1/pid"
}

# ------------------------------------------------------------------ verbs --

cmd_up() {
    if [[ -f $(ports_file) ]]; then
        die "already up (see scripts/cluster.sh status); scripts/cluster.sh down first"
    fi
    install_missing
    assign_ports
    local n started=$SECONDS
    if [[ ${CLUSTER_DB_ONLY:-} != 1 ]]; then
        for n in "${NODES[@]}"; do
            write_broker_config "$n"
            start_broker "$n"
        done
    fi
    if [[ ${CLUSTER_BROKERS_ONLY:-} != 1 ]]; then
        install_db_node 1 true
        install_db_node 2 false
        install_db_node 3 false
        start_db 1 true
        wait_db 1 1
        for n in 2 3; do
            start_db "$n" false
            wait_db "$n" "$n"
        done
        say "databases: Galera cluster of 3, synced"
    fi
    [[ ${CLUSTER_DB_ONLY:-} == 1 ]] || wait_brokers
    say "up in $((SECONDS - started)) s; files in $CLUSTER_DIR"
    addresses
}

cmd_status() {
    load_ports
    local n
    for n in "${NODES[@]}"; do
        if node_alive "$(broker_dir "$n")"; then
            if broker_healthy "$n"; then
                say "broker $n: running, 127.0.0.1:${PORT[mqtt$n]} (API ${PORT[http$n]}), has a leader"
            else
                say "broker $n: running, 127.0.0.1:${PORT[mqtt$n]}, NO LEADER"
            fi
        else
            say "broker $n: not running"
        fi
    done
    for n in "${NODES[@]}"; do
        if node_alive "$(db_dir "$n")"; then
            say "db $n: running, 127.0.0.1:${PORT[sql$n]}, $(db_status "$n" wsrep_local_state_comment), cluster size $(db_status "$n" wsrep_cluster_size)"
        else
            say "db $n: not running"
        fi
    done
    addresses
}

cmd_down() {
    if [[ ! -f $(ports_file) ]]; then
        say "nothing is up"
        return
    fi
    local n
    for n in "${NODES[@]}"; do
        kill_node "$(broker_dir "$n")" TERM
        kill_node "$(db_dir "$n")" TERM
    done
    rm -rf "$CLUSTER_DIR"
    say "down; $CLUSTER_DIR removed"
}

cmd_kill() { # broker|db N
    load_ports
    case $1 in
        broker) kill_node "$(broker_dir "$2")" KILL ;;
        db) kill_node "$(db_dir "$2")" KILL ;;
        *) die "kill broker|db N" ;;
    esac
    say "$1 $2 killed"
}

cmd_start() { # broker|db N
    load_ports
    local n=$2
    case $1 in
        broker)
            node_alive "$(broker_dir "$n")" && die "broker $n is running"
            # Its raft and gRPC ports may sit in TIME-WAIT for a while after a kill.
            start_broker "$n"
            local i
            for ((i = 0; i < 240; i++)); do
                broker_healthy "$n" && break
                node_alive "$(broker_dir "$n")" || {
                    sleep 1
                    start_broker "$n"
                }
                sleep 0.5
            done
            broker_healthy "$n" || die "broker $n not back after 120 s"
            ;;
        db)
            node_alive "$(db_dir "$n")" && die "db $n is running"
            local pos
            pos=$(recovered_position "$n")
            start_db "$n" false "$pos"
            wait_db "$n" 3
            say "db $n rejoined from position ${pos:-unknown}"
            ;;
        *) die "start broker|db N" ;;
    esac
    say "$1 $n started"
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env)
        load_ports
        addresses
        ;;
    kill) cmd_kill "${2:-}" "${3:-}" ;;
    start) cmd_start "${2:-}" "${3:-}" ;;
    *)
        sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
