#!/usr/bin/env bash
# The first ten minutes on a fresh machine, as a test: a minimal Debian 12 root in a folder
# (debootstrap), in a network namespace of its own (its own loopback, so nothing answers on 3306
# or 1883; outbound access for apt and cargo through slirp4netns), with no init system (as in a
# container, WSL or a chroot), Rust from this machine's toolchain, and the host's CA certificates.
# Then the README's two commands and its Try-it steps, timed, and a line per step: PASS or FAIL.
#
#   sudo scripts/fresh-machine.sh            # cold: a new root (a quarter of an hour or more)
#   sudo scripts/fresh-machine.sh --warm     # again in the root left by the last run
#
# Not part of CI. Needs root, and installs debootstrap and slirp4netns on this machine when
# missing. The root lives in $FRESH_ROOT (default /var/tmp/mqtt-ingest-fresh); a cold run
# removes the old one first, and it is left afterwards for --warm (about 6 GB once the build
# and the tests ran: `sudo rm -rf /var/tmp/mqtt-ingest-fresh` frees it; the last line says so).
# Nothing else on this machine is touched: the services inside run in the namespace and end with it.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
ROOT=${FRESH_ROOT:-/var/tmp/mqtt-ingest-fresh}
MIRROR=${FRESH_MIRROR:-http://deb.debian.org/debian}
WARM=false
[[ ${1:-} == --warm ]] && WARM=true

say() { printf 'fresh: %s\n' "$*"; }
die() {
    printf 'fresh: ERROR: %s\n' "$*" >&2
    exit 1
}
[[ $(id -u) -eq 0 ]] || die "run as root: sudo scripts/fresh-machine.sh"
# Its logs go to target/, which a fresh clone does not have yet.
mkdir -p "$REPO/target"
command -v rustup >/dev/null 2>&1 || [[ -x $HOME/.cargo/bin/rustup ]] ||
    die "no rustup toolchain on this machine to lend to the fresh root"
RUSTUP_DIR=${RUSTUP_HOME:-$HOME/.rustup}
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
[[ -d $RUSTUP_DIR && -d $CARGO_BIN ]] || die "no $RUSTUP_DIR or $CARGO_BIN"

missing=()
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v slirp4netns >/dev/null 2>&1 || missing+=(slirp4netns)
if ((${#missing[@]} > 0)); then
    say "installing ${missing[*]} on this machine (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

results=()
step() { results+=("$(printf '%-4s %6ss  %s' "$1" "$2" "$3")"); }

# ---------------------------------------------------------------- the root --
if [[ $WARM == false || ! -x $ROOT/bin/bash ]]; then
    rm -rf "$ROOT"
    say "debootstrap --variant=minbase bookworm $ROOT (a minimal Debian 12)"
    t0=$SECONDS
    debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" >"$REPO/target/fresh-debootstrap.log" 2>&1 ||
        die "debootstrap failed (see target/fresh-debootstrap.log)"
    step PASS $((SECONDS - t0)) "debootstrap"
    # As in a container: package scripts may not start services (no init system).
    printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
    chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
fi
# The host's CA certificates (registries may be reached through a proxy the host trusts),
# slirp4netns's resolver, the project's files (not target/), Rust's mount points.
mkdir -p "$ROOT/etc/ssl/certs" "$ROOT/opt/rustup" "$ROOT/opt/cargo-bin" "$ROOT/root/mqtt-ingest"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
printf 'nameserver 10.0.2.3\n' >"$ROOT/etc/resolv.conf"
tar -C "$REPO" --exclude=./target --exclude=./.env -cf - . | tar -C "$ROOT/root/mqtt-ingest" -xf -

# Processes left in the root by an interrupted run would answer on its sockets: end them.
for proc in /proc/[0-9]*; do
    [[ $(readlink "$proc/root" 2>/dev/null) == "$ROOT" ]] && kill -KILL "${proc#/proc/}" 2>/dev/null
done

# ------------------------------------------------------- inside the namespace --
# What runs in the fresh root, as its user would: the README's commands, then its Try-it steps.
cat >"$ROOT/root/fresh-steps.sh" <<'STEPS'
#!/bin/bash
set -uo pipefail
export PATH=/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo HOME=/root
export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt CARGO_HTTP_CAINFO=/etc/ssl/certs/ca-certificates.crt
cd /root/mqtt-ingest
report() { printf 'STEP %s %s %s\n' "$1" "$2" "$3"; }
ok=true

t0=$SECONDS
setsid scripts/run.sh >/root/run.log 2>&1 &
run_pid=$!
up=false
for ((i = 0; i < 1800; i++)); do
    grep -q 'subscribed topic=devices/+/heartbeat' /root/run.log && { up=true; break; }
    kill -0 "$run_pid" 2>/dev/null || break
    sleep 1
done
if $up; then report PASS $((SECONDS - t0)) "scripts/run.sh: set-up, build, service subscribed"; else
    report FAIL $((SECONDS - t0)) "scripts/run.sh (tail /root/run.log):"; tail -20 /root/run.log; ok=false; fi

if $up; then
    t0=$SECONDS
    # Try it: register a device as the backend does, publish the seed's example, read the row.
    . <(grep -E '^DB_(USER|PASSWORD|NAME)=' .env)
    mariadb -uroot "$DB_NAME" -e "INSERT IGNORE INTO device_main (device_id, uuid, name) VALUES ('dev-001', 'test-device-uuid', 'Test device')"
    mosquitto_pub -h localhost -q 1 -t devices/test-device-uuid/data -m '{"temperature": 25.5, "humidity": 60, "light": 850}'
    seen=false
    for ((i = 0; i < 30; i++)); do
        v=$(MYSQL_PWD=$DB_PASSWORD mariadb --protocol=tcp -h 127.0.0.1 -u "$DB_USER" "$DB_NAME" -N -B \
            -e "SELECT JSON_VALUE(last_report_data, '$.sensors.light.value') FROM device_main WHERE uuid = 'test-device-uuid'" 2>/dev/null)
        [[ $v == 850 ]] && { seen=true; break; }
        sleep 1
    done
    if $seen; then report PASS $((SECONDS - t0)) "Try it: the seed's example reached device_main (as $DB_USER, not root)"; else
        report FAIL $((SECONDS - t0)) "Try it: the row did not change"; tail -20 /root/run.log; ok=false; fi
    kill -- -"$run_pid" 2>/dev/null; wait "$run_pid" 2>/dev/null
fi

t0=$SECONDS
if scripts/test.sh >/root/test.log 2>&1; then
    passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' /root/test.log | awk '{n += $4} END {print n + 0}')
    report PASS $((SECONDS - t0)) "scripts/test.sh: fmt, clippy, $passed tests passed (MQTT 3.1.1 and 5)"
else
    report FAIL $((SECONDS - t0)) "scripts/test.sh (tail /root/test.log):"; tail -30 /root/test.log; ok=false
fi
$ok
STEPS
chmod 0755 "$ROOT/root/fresh-steps.sh"

say "running the README's commands in the fresh root (own network namespace, no init system)"
# A process in new network, mount and PID namespaces holds them open; slirp4netns gives it a
# way out; nsenter runs the steps there, chrooted.
unshare --net --mount --pid --fork --mount-proc sleep infinity &
holder=$!
# Killing the namespace's first process ends every process in it (the servers started inside).
ns_pid=
cleanup() {
    [[ -n $ns_pid ]] && kill -KILL "$ns_pid" 2>/dev/null
    kill "$slirp" 2>/dev/null || true
    kill "$holder" 2>/dev/null || true
}
trap cleanup EXIT
for ((i = 0; i < 50; i++)); do
    ns_pid=$(pgrep -P "$holder" -x sleep || true)
    [[ -n $ns_pid ]] && break
    sleep 0.1
done
[[ -n $ns_pid ]] || die "the namespace did not start"
slirp4netns --configure --mtu=65520 --disable-host-loopback "$ns_pid" tap0 >"$REPO/target/fresh-slirp.log" 2>&1 &
slirp=$!
sleep 1
nsenter -t "$ns_pid" -n ip link set lo up
mounts="mount -t proc proc $ROOT/proc && mount --rbind /dev $ROOT/dev && mount -t sysfs sys $ROOT/sys \
    && mount --bind -o ro $RUSTUP_DIR $ROOT/opt/rustup && mount --bind -o ro $CARGO_BIN $ROOT/opt/cargo-bin"
t0=$SECONDS
set +e
nsenter -t "$ns_pid" -n -m -p bash -c "$mounts && chroot $ROOT /root/fresh-steps.sh" | tee "$REPO/target/fresh-steps.log"
status=${PIPESTATUS[0]}
set -e
while read -r _ verdict secs what; do
    step "$verdict" "$secs" "$what"
done < <(grep '^STEP ' "$REPO/target/fresh-steps.log")
echo
say "$([[ $WARM == true ]] && echo warm || echo cold) run, $((SECONDS - t0)) s inside the fresh root:"
printf '  %s\n' "${results[@]}"
say "the fresh root is left in $ROOT ($(du -sh "$ROOT" 2>/dev/null | cut -f1)) for --warm; sudo rm -rf $ROOT frees it"
exit "$status"
