#!/usr/bin/env bash
# Installs mqtt-ingest as a systemd service.
#
#   sudo bash systemd/install.sh                 # builds target/release/mqtt-ingest if needed
#   sudo bash systemd/install.sh path/to/binary  # installs a binary built elsewhere
#
# Puts the binary in /usr/local/bin, the settings in /etc/mqtt-ingest/env
# (only when that file does not exist yet: an existing one is never
# overwritten), the unit in /etc/systemd/system, then enables and starts it.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO_ROOT=$(pwd)

BIN_DEST=/usr/local/bin/mqtt-ingest
ENV_DIR=/etc/mqtt-ingest
ENV_FILE=$ENV_DIR/env
UNIT_DEST=/etc/systemd/system/mqtt-ingest.service

say() { printf 'install: %s\n' "$*"; }
die() {
    printf 'install: ERROR: %s\n' "$*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "run as root: sudo bash systemd/install.sh [path/to/mqtt-ingest]"
(($# <= 1)) || die "usage: install.sh [path/to/mqtt-ingest]"

# ---- the binary ----
if (($# == 1)); then
    BIN_SRC=$1
    [[ -f $BIN_SRC && -x $BIN_SRC ]] || die "$BIN_SRC is not an executable file"
else
    BIN_SRC=$REPO_ROOT/target/release/mqtt-ingest
    if [[ ! -x $BIN_SRC ]]; then
        say "building the release binary (cargo build --release --locked)"
        if command -v cargo >/dev/null 2>&1; then
            cargo build --release --locked --bin mqtt-ingest
        elif [[ -n ${SUDO_USER:-} && $SUDO_USER != root ]]; then
            # Under sudo, root usually has no Rust toolchain: build as the calling user.
            user_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
            [[ -x $user_home/.cargo/bin/cargo ]] ||
                die "cargo not found (install Rust with rustup, or pass a prebuilt binary)"
            runuser -u "$SUDO_USER" -- env PATH="$user_home/.cargo/bin:$PATH" \
                cargo build --release --locked --bin mqtt-ingest
        else
            die "cargo not found (install Rust with rustup, or pass a prebuilt binary)"
        fi
    fi
fi
# Copy next to the destination and rename, so a running binary is replaced, not overwritten.
install -m 0755 "$BIN_SRC" "$BIN_DEST.new"
mv -f "$BIN_DEST.new" "$BIN_DEST"
say "installed $BIN_DEST"

# ---- the settings ----
install -d -m 0755 "$ENV_DIR"
if [[ -e $ENV_FILE ]]; then
    say "$ENV_FILE exists, left as it is"
else
    # Prefer the checkout's .env (the one you edited), else the documented defaults.
    if [[ -f $REPO_ROOT/.env ]]; then
        env_src=$REPO_ROOT/.env
    else
        env_src=$REPO_ROOT/.env.example
    fi
    install -m 0600 -o root -g root "$env_src" "$ENV_FILE"
    say "created $ENV_FILE from ${env_src#"$REPO_ROOT"/} (mode 0600): review it"
fi

# ---- the unit ----
install -m 0644 "$REPO_ROOT/systemd/mqtt-ingest.service" "$UNIT_DEST"
say "installed $UNIT_DEST"

if [[ -d /run/systemd/system ]]; then
    was_active=false
    systemctl is-active --quiet mqtt-ingest && was_active=true
    systemctl daemon-reload
    systemctl enable --now mqtt-ingest
    if [[ $was_active == true ]]; then
        # It was already running the old binary and unit.
        systemctl restart mqtt-ingest
    fi
    say "mqtt-ingest enabled and running"
    say "status: systemctl status mqtt-ingest    logs: journalctl -u mqtt-ingest -f"
else
    say "systemd is not running as PID 1 here: skipped daemon-reload and enable --now"
    say "on a systemd host run: systemctl daemon-reload && systemctl enable --now mqtt-ingest"
fi
