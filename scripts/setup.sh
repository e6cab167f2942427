#!/usr/bin/env bash
# Makes this machine ready to build, run and test mqtt-ingest:
#   - installs MariaDB and Mosquitto (server + clients) when they are missing,
#   - starts them when they are not answering (running services are left alone),
#   - lets the configured DB user log in over TCP and creates the database,
#   - checks that a Rust toolchain is present.
# Idempotent: running it again on a ready machine changes nothing.
#
# Settings: DB_* and MQTT_* from the environment, else from ./.env, else defaults.
# Local services are only touched when DB_HOST / MQTT_BROKER point at this machine.
# root's login is never changed, and an existing user is left as it is: a missing DB_USER is
# created with DB_PASSWORD and the least-privilege grant of docs/operations.md (Security).
#
#   scripts/setup.sh               for the service (scripts/run.sh)
#   scripts/setup.sh --for-tests   for the tests (scripts/test.sh): instead of DB_USER, an account
#                                  that may create and drop the tests' databases, written to
#                                  target/test-db.env as TEST_DB_USER / TEST_DB_PASSWORD
set -euo pipefail

cd "$(dirname "$0")/.."
REPO_ROOT=$(pwd)
FOR_TESTS=false
[[ ${1:-} == --for-tests ]] && FOR_TESTS=true

say() { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: WARNING: %s\n' "$*" >&2; }
die() {
    printf 'setup: ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- settings --

# Reads KEY=VALUE lines for DB_* and MQTT_* from a dotenv file. A variable that
# is already in the environment (even empty) wins over the file.
load_dotenv() {
    local file=$1 line key val
    [[ -f $file ]] || return 0
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=[[:space:]]*(.*)$ ]] || continue
        key=${BASH_REMATCH[2]}
        val=${BASH_REMATCH[3]}
        case $key in
            DB_* | MQTT_*) ;;
            *) continue ;;
        esac
        [[ -n ${!key+x} ]] && continue
        if [[ $val =~ ^\"(.*)\"[[:space:]]*$ ]]; then
            val=${BASH_REMATCH[1]}
        elif [[ $val =~ ^\'(.*)\'[[:space:]]*$ ]]; then
            val=${BASH_REMATCH[1]}
        else
            # unquoted: drop an inline " # comment" and trailing blanks
            val=${val%%[[:space:]]#*}
            val=${val%"${val##*[![:space:]]}"}
        fi
        printf -v "$key" '%s' "$val"
        export "${key?}"
    done <"$file"
}

if [[ -f $REPO_ROOT/.env ]]; then
    say "reading settings from the environment, then .env"
    load_dotenv "$REPO_ROOT/.env"
else
    say "reading settings from the environment (no .env; defaults for the rest)"
fi

DB_HOST=${DB_HOST:-127.0.0.1}
DB_PORT=${DB_PORT:-3306}
DB_USER=${DB_USER:-root}
DB_PASSWORD=${DB_PASSWORD:-}
DB_NAME=${DB_NAME:-aiot_admin}
# The broker settings also go by the Python service's names (as the service reads them).
MQTT_BROKER=${MQTT_BROKER:-${MQTT_SERVICE_BROKER:-${MQTT_BROKER_HOST:-127.0.0.1}}}
MQTT_PORT=${MQTT_PORT:-${MQTT_SERVICE_PORT:-${MQTT_BROKER_PORT:-1883}}}
MQTT_USERNAME=${MQTT_USERNAME:-${MQTT_SERVICE_USERNAME:-}}
MQTT_PASSWORD=${MQTT_PASSWORD:-${MQTT_SERVICE_PASSWORD:-}}

is_local() {
    case $1 in
        localhost | 127.* | ::1 | '[::1]') return 0 ;;
        *) return 1 ;;
    esac
}

# A list (the nodes of a cluster: "a,b:3307") is not managed here (scripts/cluster.sh starts a
# local one): the probes below look at its first node.
DB_LIST=false
MQTT_LIST=false
first_of_list() { # NAME_OF_HOST_VAR NAME_OF_PORT_VAR
    local -n host_var=$1 port_var=$2
    local first=${host_var%%,*}
    first=${first// /}
    if [[ $first =~ ^\[(.*)\]:([0-9]+)$ || $first =~ ^([^:]+):([0-9]+)$ ]]; then
        host_var=${BASH_REMATCH[1]}
        port_var=${BASH_REMATCH[2]}
    else
        host_var=$first
    fi
}
if [[ $DB_HOST == *,* ]]; then
    DB_LIST=true
    first_of_list DB_HOST DB_PORT
fi
if [[ $MQTT_BROKER == *,* ]]; then
    MQTT_LIST=true
    first_of_list MQTT_BROKER MQTT_PORT
fi

DB_LOCAL=false
MQTT_LOCAL=false
[[ $DB_LIST == false ]] && is_local "$DB_HOST" && DB_LOCAL=true
[[ $MQTT_LIST == false ]] && is_local "$MQTT_BROKER" && MQTT_LOCAL=true

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "not root and sudo is missing; run this script as root"
    SUDO=(sudo)
fi

have() { command -v "$1" >/dev/null 2>&1; }

# The server binaries live in sbin, which is not always on a user's PATH.
find_sbin() {
    local name=$1 dir
    if have "$name"; then
        command -v "$name"
        return 0
    fi
    for dir in /usr/sbin /sbin /usr/local/sbin; do
        if [[ -x $dir/$name ]]; then
            printf '%s\n' "$dir/$name"
            return 0
        fi
    done
    return 1
}

systemd_is_pid1() { [[ -d /run/systemd/system ]]; }

# TCP probe without extra tools: bash's /dev/tcp under a short timeout.
tcp_open() {
    local host=${1#[}
    host=${host%]}
    # shellcheck disable=SC2016 # $0/$1 expand in the inner shell
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$2" 2>/dev/null
}

# ---------------------------------------------------------------- packages --

packages=()
if [[ $DB_LOCAL == true ]] && ! find_sbin mariadbd >/dev/null; then
    packages+=(mariadb-server)
fi
if [[ $MQTT_LOCAL == true ]] && ! find_sbin mosquitto >/dev/null; then
    packages+=(mosquitto)
fi
# The clients are used by the probes below and by the tests, wherever the broker runs.
if ! have mosquitto_pub || ! have mosquitto_sub; then
    packages+=(mosquitto-clients)
fi
if [[ $DB_LOCAL == true ]] && ! have mariadb && ! have mysql; then
    packages+=(mariadb-client)
fi
# The tests make certificates for the TLS tests with the openssl command.
if [[ $FOR_TESTS == true ]] && ! have openssl; then
    packages+=(openssl)
fi
# The Galera tests (tests/it/galera.rs) run a two-node MariaDB Galera cluster of private servers:
# the wsrep provider, and rsync for the state transfer that a joining node receives.
if [[ $FOR_TESTS == true ]]; then
    [[ -e /usr/lib/galera/libgalera_smm.so || -e /usr/lib/libgalera_smm.so ]] || packages+=(galera-4)
    have rsync || packages+=(rsync)
    # The status page's test renders it in a real headless browser (tests/it/status_page.rs).
    have chromium || [[ -x /usr/bin/chromium ]] || packages+=(chromium)
fi
# promtool checks the alert rules (tests/it/alerting.rs); it is taken out of Debian's prometheus
# package below, so that no Prometheus server is installed or started for the tests.
NEED_PROMTOOL=false
if [[ $FOR_TESTS == true ]] && ! have promtool && [[ ! -x $REPO_ROOT/target/tools/promtool ]]; then
    NEED_PROMTOOL=true
fi
# The build needs a C compiler and linker: crates such as ring compile C, and rustc links with cc.
if ! have cc; then
    say "no C compiler (cc): the build needs one (ring's C code, and linking); adding gcc and libc6-dev"
    packages+=(gcc libc6-dev)
fi

if ((${#packages[@]} > 0)); then
    have apt-get || die "missing ${packages[*]}, and apt-get is not available: install them by hand"
    say "installing ${packages[*]} (apt-get)"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
else
    say "packages: nothing to install"
fi

if [[ $NEED_PROMTOOL == true ]]; then
    have apt-get || die "promtool is missing and apt-get is not available: put promtool on PATH"
    say "promtool: taking it out of Debian's prometheus package into target/tools (no server is installed)"
    tmp=$(mktemp -d)
    chmod 0755 "$tmp" # apt's download sandbox user must write there
    if ! (cd "$tmp" && apt-get download -q prometheus >/dev/null 2>&1); then
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        (cd "$tmp" && apt-get download -q prometheus) || die "apt-get download prometheus failed"
    fi
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
    install -D -m 0755 "$tmp/root/usr/bin/promtool" "$REPO_ROOT/target/tools/promtool"
    rm -rf "$tmp"
fi

# --------------------------------------------------------------- mosquitto --

mqtt_probe() {
    local args=(-h "$MQTT_BROKER" -p "$MQTT_PORT" -t setup/probe -n -q 0 -i "setup-probe-$$")
    [[ -n $MQTT_USERNAME ]] && args+=(-u "$MQTT_USERNAME")
    [[ -n $MQTT_PASSWORD ]] && args+=(-P "$MQTT_PASSWORD")
    timeout 5 mosquitto_pub "${args[@]}" >/dev/null 2>&1
}

start_mosquitto() {
    if systemd_is_pid1; then
        say "mosquitto: systemctl start mosquitto"
        "${SUDO[@]}" systemctl start mosquitto
    else
        local bin
        bin=$(find_sbin mosquitto) || die "mosquitto binary not found"
        say "mosquitto: starting by hand ($bin -d -c /etc/mosquitto/mosquitto.conf)"
        "${SUDO[@]}" install -d -o mosquitto -g mosquitto -m 0755 /run/mosquitto
        "${SUDO[@]}" "$bin" -d -c /etc/mosquitto/mosquitto.conf
    fi
    local i
    for ((i = 0; i < 30; i++)); do
        tcp_open "$MQTT_BROKER" "$MQTT_PORT" && return 0
        sleep 0.5
    done
    die "mosquitto did not start listening on $MQTT_BROKER:$MQTT_PORT within 15 s (see /var/log/mosquitto/)"
}

if [[ $MQTT_LOCAL == true ]]; then
    if tcp_open "$MQTT_BROKER" "$MQTT_PORT"; then
        say "mosquitto: already answering on $MQTT_BROKER:$MQTT_PORT, left alone"
    else
        [[ $MQTT_PORT == 1883 ]] || warn "MQTT_PORT=$MQTT_PORT: the stock config listens on 1883"
        start_mosquitto
        say "mosquitto: listening on $MQTT_BROKER:$MQTT_PORT"
    fi
else
    if [[ $MQTT_LIST == true ]]; then
        say "mosquitto: MQTT_BROKER lists several brokers (a cluster), not managed here; probing the first, $MQTT_BROKER:$MQTT_PORT"
    else
        say "mosquitto: MQTT_BROKER=$MQTT_BROKER is remote, not managed here"
    fi
fi
if mqtt_probe; then
    say "mosquitto: test publish to $MQTT_BROKER:$MQTT_PORT ok"
else
    warn "mosquitto: cannot publish to $MQTT_BROKER:$MQTT_PORT (down, or MQTT_USERNAME/MQTT_PASSWORD refused)"
fi

# ----------------------------------------------------------------- mariadb --

if have mariadb; then
    SQL_CLI=mariadb
    ADMIN_CLI=mariadb-admin
else
    SQL_CLI=mysql
    ADMIN_CLI=mysqladmin
fi

# Runs SQL over TCP as the configured user. The password goes through
# MYSQL_PWD so that it never shows on a command line.
sql_tcp() {
    MYSQL_PWD=$DB_PASSWORD "$SQL_CLI" --protocol=tcp -h "$DB_HOST" -P "$DB_PORT" -u "$DB_USER" \
        --connect-timeout=5 -N -B "$@"
}

# Runs SQL as root over the local socket (Debian's unix_socket authentication).
sql_socket() {
    "${SUDO[@]}" env -u MYSQL_PWD "$SQL_CLI" --protocol=socket -uroot -N -B "$@"
}

db_answering() { tcp_open "$DB_HOST" "$DB_PORT"; }

# A local server that answers on its socket (it may not listen on DB_PORT).
db_socket_answering() { "${SUDO[@]}" "$ADMIN_CLI" --connect-timeout=2 ping >/dev/null 2>&1; }

# Where a MariaDB started by hand (no init system) logs.
MARIADB_LOG=/var/log/mysql/error.log

start_mariadb() {
    if systemd_is_pid1; then
        say "mariadb: systemctl start mariadb"
        "${SUDO[@]}" systemctl start mariadb
    else
        local bin
        bin=$(find_sbin mariadbd) || die "mariadbd binary not found"
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            say "mariadb: no system tables in /var/lib/mysql, running mariadb-install-db"
            "${SUDO[@]}" mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
        fi
        # As the mysql user (mariadbd refuses to run as root), its log kept where the error
        # below says to look: with no init system there is no journal to read it from.
        say "mariadb: starting by hand ($bin --user=mysql --log-error=$MARIADB_LOG)"
        "${SUDO[@]}" install -d -o mysql -g mysql -m 0755 /run/mysqld "${MARIADB_LOG%/*}"
        "${SUDO[@]}" start-stop-daemon --start --oknodo --background --exec "$bin" -- \
            --user=mysql --log-error="$MARIADB_LOG"
    fi
    local i
    for ((i = 0; i < 60; i++)); do
        db_answering && return 0
        sleep 1
    done
    if systemd_is_pid1; then
        die "mariadb did not answer within 60 s (see: journalctl -u mariadb)"
    fi
    die "mariadb did not answer within 60 s (see: tail $MARIADB_LOG)"
}

sql_string() {
    # quotes a value as an SQL string literal
    local s=${1//\\/\\\\}
    s=${s//\'/\'\'}
    printf "'%s'" "$s"
}

sql_ident() {
    local s=${1//\`/\`\`}
    # shellcheck disable=SC2016 # literal backticks
    printf '`%s`' "$s"
}

# True when root's socket login reaches the server that listens on DB_PORT
# (and not some other local instance).
socket_is_db_port() {
    local port
    port=$(sql_socket -e 'SELECT @@port' 2>/dev/null) || return 1
    [[ $port == "$DB_PORT" ]]
}

# root's socket login, checked to reach the server on DB_PORT.
need_socket_root() {
    sql_socket -e 'SELECT 1' >/dev/null 2>&1 ||
        die "mariadb: $1, and root's socket login failed too (run this as root, or fix it by hand)"
    socket_is_db_port ||
        die "mariadb: $1, and root's socket login reaches a server that is not the one on port $DB_PORT"
}

# Creates DB_USER (absent) with DB_PASSWORD and the least-privilege grant of docs/operations.md (Security) on DB_NAME,
# using root's socket login. root's own login is never changed and an existing user is left as
# it is: both stop with a line that says what to fix.
fix_tcp_login() {
    local why="$DB_USER cannot log in over TCP at $DB_HOST:$DB_PORT with DB_PASSWORD"
    [[ $DB_USER == root ]] &&
        die "mariadb: $why; this set-up does not change root's login: set DB_USER to a user of its own in .env (scripts/run.sh makes one on first use), or give root a password and set DB_PASSWORD"
    need_socket_root "$why"
    local user pw db host
    user=$(sql_string "$DB_USER")
    pw=$(sql_string "$DB_PASSWORD")
    db=$(sql_ident "$DB_NAME")
    [[ $(sql_socket -e "SELECT COUNT(*) FROM mysql.user WHERE User = $user") == 0 ]] ||
        die "mariadb: $why; the user exists and is left as it is: fix DB_PASSWORD in .env (or DB_USER)"
    for host in localhost 127.0.0.1; do
        say "mariadb: CREATE USER $DB_USER@$host (DB_PASSWORD), GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX ON $DB_NAME.*"
        sql_socket -e "CREATE USER $user@'$host' IDENTIFIED BY $pw;
            GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX ON $db.* TO $user@'$host'"
    done
}

# The account the tests log in with (they create and drop databases mi_* and bench_*, and users
# with grants on their own databases): root over TCP where that works without a password (as on
# the CI machines), else a user of the tests' own, mqtt_ingest_test, whose password is made anew
# on every run.
prepare_test_account() {
    local file=$REPO_ROOT/target/test-db.env user=root password=''
    mkdir -p "${file%/*}"
    if ! MYSQL_PWD='' "$SQL_CLI" --protocol=tcp -h "$DB_HOST" -P "$DB_PORT" -u root \
        --connect-timeout=5 -N -B -e 'SELECT 1' >/dev/null 2>&1; then
        need_socket_root "root cannot log in over TCP without a password (and is not changed here)"
        user=mqtt_ingest_test
        password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
        local host pw
        pw=$(sql_string "$password")
        for host in localhost 127.0.0.1; do
            sql_socket -e "CREATE USER IF NOT EXISTS '$user'@'$host' IDENTIFIED BY $pw;
                ALTER USER '$user'@'$host' IDENTIFIED BY $pw;
                GRANT ALL PRIVILEGES ON \`mi\\_%\`.* TO '$user'@'$host' WITH GRANT OPTION;
                GRANT ALL PRIVILEGES ON \`bench\\_%\`.* TO '$user'@'$host';
                GRANT CREATE USER ON *.* TO '$user'@'$host'"
        done
        say "mariadb: the tests log in as $user (its own password, in target/test-db.env)"
    else
        say "mariadb: the tests log in as root over TCP (no password)"
    fi
    (
        umask 077
        printf 'TEST_DB_HOST=%s\nTEST_DB_PORT=%s\nTEST_DB_USER=%s\nTEST_DB_PASSWORD=%s\n' \
            "$DB_HOST" "$DB_PORT" "$user" "$password" >"$file"
    )
}

if [[ $DB_LOCAL == true ]]; then
    if db_answering; then
        say "mariadb: already answering on $DB_HOST:$DB_PORT, left alone"
    elif db_socket_answering; then
        die "mariadb: a local server is running but not listening on $DB_HOST:$DB_PORT (check DB_PORT, port, bind-address, skip-networking)"
    else
        [[ $DB_PORT == 3306 ]] || warn "DB_PORT=$DB_PORT: the stock config listens on 3306"
        start_mariadb
        say "mariadb: answering on $DB_HOST:$DB_PORT"
    fi

    if [[ $FOR_TESTS == true ]]; then
        prepare_test_account
    elif sql_tcp -e 'SELECT 1' >/dev/null 2>&1; then
        say "mariadb: $DB_USER can log in over TCP at $DB_HOST:$DB_PORT"
    else
        say "mariadb: $DB_USER cannot log in over TCP at $DB_HOST:$DB_PORT, fixing via root's socket login"
        fix_tcp_login
        sql_tcp -e 'SELECT 1' >/dev/null 2>&1 ||
            die "mariadb: $DB_USER still cannot log in over TCP at $DB_HOST:$DB_PORT"
        say "mariadb: $DB_USER can now log in over TCP"
    fi

    exists=$(sql_tcp -e "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = $(sql_string "$DB_NAME")" 2>/dev/null || true)
    if [[ $FOR_TESTS == true ]]; then
        : # the tests make databases of their own
    elif [[ $exists == 1 ]]; then
        say "mariadb: database $DB_NAME exists"
    else
        create="CREATE DATABASE IF NOT EXISTS $(sql_ident "$DB_NAME") CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        if ! sql_tcp -e "$create" 2>/dev/null; then
            socket_is_db_port ||
                die "mariadb: $DB_USER may not create database $DB_NAME; create it, or grant the right"
            sql_socket -e "$create"
        fi
        say "mariadb: database $DB_NAME created"
    fi
else
    if [[ $DB_LIST == true ]]; then
        say "mariadb: DB_HOST lists several nodes (a cluster), not managed here; probing the first, $DB_HOST:$DB_PORT"
    else
        say "mariadb: DB_HOST=$DB_HOST is remote, not managed here"
    fi
    if tcp_open "$DB_HOST" "$DB_PORT"; then
        say "mariadb: $DB_HOST:$DB_PORT is reachable"
    else
        warn "mariadb: $DB_HOST:$DB_PORT is not reachable"
    fi
fi

# -------------------------------------------------------------------- rust --

if ! have cargo; then
    if [[ -x $HOME/.cargo/bin/cargo ]]; then
        # shellcheck disable=SC2016 # printed for the user to run
        printf 'setup: ERROR: Rust is installed but not on PATH. Run:  . "$HOME/.cargo/env"\n' >&2
    else
        cat >&2 <<'MSG'
setup: ERROR: cargo is missing. Install Rust with rustup, then open a new shell (or run . "$HOME/.cargo/env"):
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
MSG
    fi
    exit 1
fi
# Cargo.toml asks for rust-version 1.94 (sqlx 0.9).
rustc_version=$(rustc --version 2>/dev/null | awk '{print $2}')
if [[ $rustc_version =~ ^1\.([0-9]+)\. ]] && ((BASH_REMATCH[1] < 94)); then
    die "rustc $rustc_version is too old (need 1.94 or later): run  rustup update stable"
fi
say "rust: $(cargo --version)"
say "ready"
