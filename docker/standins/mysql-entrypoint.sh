#!/bin/bash
# The stand-in mysql:8.0's entrypoint: on the first start (an empty data directory) creates the
# system tables, sets root's password for local and remote logins from MYSQL_ROOT_PASSWORD and
# creates MYSQL_DATABASE, as the real image does; then runs the server in the foreground.
set -euo pipefail
datadir=/var/lib/mysql
mkdir -p /run/mysqld
chown mysql:mysql /run/mysqld "$datadir"
if [[ ! -d $datadir/mysql ]]; then
    : "${MYSQL_ROOT_PASSWORD:?MYSQL_ROOT_PASSWORD must be set}"
    echo "entrypoint: initialising $datadir"
    mariadb-install-db --user=mysql --datadir="$datadir" --skip-test-db >/dev/null
    socket=/run/mysqld/init.sock
    mariadbd --user=mysql --datadir="$datadir" --skip-networking --socket="$socket" &
    pid=$!
    for _ in $(seq 1 120); do
        mariadb-admin --socket="$socket" ping >/dev/null 2>&1 && break
        sleep 0.5
    done
    quote() { printf "'%s'" "${1//\'/\'\'}"; }
    password=$(quote "$MYSQL_ROOT_PASSWORD")
    {
        echo "ALTER USER 'root'@'localhost' IDENTIFIED BY $password;"
        echo "CREATE USER 'root'@'%' IDENTIFIED BY $password;"
        echo "GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;"
        if [[ -n ${MYSQL_DATABASE:-} ]]; then
            echo "CREATE DATABASE IF NOT EXISTS \`${MYSQL_DATABASE//\`/\`\`}\`;"
        fi
    } | mariadb --socket="$socket" -uroot
    kill "$pid"
    wait "$pid" || true
    echo "entrypoint: initialised"
fi
exec mariadbd --user=mysql --datadir="$datadir" --bind-address=0.0.0.0 --port=3306 \
    --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci
