#!/usr/bin/env python3
"""Runs mqtt-ingest against the brokers a user might run and prints the compatibility matrix of
docs/brokers.md: for each broker and MQTT version, does the service connect, write the seed's
examples, keep its session across its own restart and across a broker restart, get through a
5,000-message burst with nothing lost and no reconnect storm, and work through `$share`.

Installs the brokers from the package registries into target/broker-matrix/ (rumqttd with cargo,
aedes with npm, amqtt with pip in a venv, ejabberd with apt), starts each as a private instance on
a free port of 127.0.0.1, and uses the release binary (built if missing) and the tests' MariaDB
account (target/test-db.env, written by `scripts/setup.sh --for-tests`). Slow (about 10 minutes
per broker): not part of the test suite. Usage:

    scripts/broker-matrix.sh [mosquitto rumqttd aedes amqtt ejabberd]
    scripts/broker-matrix.sh --one-in-flight OTHER_BINARY   (ejabberd's window of one, side by side)
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "target" / "broker-matrix"
SERVICE = ROOT / "target" / "release" / "mqtt-ingest"
DEVICES = 100
SEQS = 50


def log(msg):
    print(f"matrix: {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


# --- the database ---------------------------------------------------------------------------

DB = {
    "host": os.environ.get("TEST_DB_HOST", "127.0.0.1"),
    "port": os.environ.get("TEST_DB_PORT", "3306"),
    "user": os.environ.get("TEST_DB_USER", "root"),
    "password": os.environ.get("TEST_DB_PASSWORD", ""),
}


def sql(query, db=None):
    cmd = ["mariadb", "-h", DB["host"], "-P", DB["port"], "-u", DB["user"], "-N", "-B"]
    if DB["password"]:
        cmd.append(f"-p{DB['password']}")
    if db:
        cmd.append(db)
    out = subprocess.run(cmd + ["-e", query], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def fresh_database(name):
    sql(f"DROP DATABASE IF EXISTS `{name}`; CREATE DATABASE `{name}`")
    # The service's own migration creates device_main; the rows are registered once it exists.


def register(db, uuids):
    values = ", ".join(f"('{u}', '{u}', '{u}')" for u in uuids)
    sql(f"INSERT IGNORE INTO device_main (device_id, uuid, name) VALUES {values}", db)


def count(db, where):
    return int(sql(f"SELECT COUNT(*) FROM device_main WHERE {where}", db) or 0)


def wait_count(db, where, n, timeout):
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        got = count(db, where)
        if got >= n:
            return got
        time.sleep(0.5)
    return got


# --- brokers ----------------------------------------------------------------------------------


class Broker:
    name = ""
    protocols = ("3.1.1", "5")
    login = ("", "")

    def __init__(self):
        self.dir = WORK / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = None
        self.port = free_port()
        self.ports = {"3.1.1": self.port, "5": self.port}

    def install(self):
        pass

    def reset(self):
        """Forgets every session and queued message: each check starts from an empty broker."""

    def command(self):
        raise NotImplementedError

    def start(self):
        out = open(self.dir / "broker.log", "ab")
        self.proc = subprocess.Popen(
            self.command(), cwd=self.dir, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=self.env())
        if not all(wait_port(p) for p in set(self.ports.values())):
            raise RuntimeError(f"{self.name} did not listen; see {self.dir / 'broker.log'}")

    def env(self):
        return os.environ.copy()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


class Mosquitto(Broker):
    name = "mosquitto"

    def reset(self):
        for f in self.dir.glob("*.db*"):
            f.unlink()

    def command(self):
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {self.dir}/\nautosave_interval 1\n"
            "max_queued_messages 0\nmax_inflight_messages 1000\n")
        # Started as root, Mosquitto drops to its own user: the snapshot must be writable to it.
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "mosquitto", str(self.dir)], check=False)
        return ["mosquitto", "-c", str(conf)]


class Rumqttd(Broker):
    name = "rumqttd"

    def __init__(self):
        super().__init__()
        self.ports = {"3.1.1": self.port, "5": free_port()}

    def install(self):
        if not (WORK / "tools" / "bin" / "rumqttd").exists():
            log("installing rumqttd 0.20.0 with cargo (a few minutes)")
            run(["cargo", "install", "--locked", "--quiet", "--root", str(WORK / "tools"),
                 "rumqttd", "--version", "0.20.0"])

    def command(self):
        def listener(version, port):
            return (f"[{version}.1]\nname = \"{version}\"\nlisten = \"127.0.0.1:{port}\"\n"
                    "next_connection_delay_ms = 1\n"
                    f"[{version}.1.connections]\nconnection_timeout_ms = 60000\n"
                    "max_payload_size = 1048576\nmax_inflight_count = 100\n"
                    "dynamic_filters = true\n")
        conf = self.dir / "rumqttd.toml"
        conf.write_text(
            "id = 0\n[router]\nmax_connections = 1000\nmax_outgoing_packet_count = 200\n"
            "max_segment_size = 104857600\nmax_segment_count = 10\n"
            + listener("v4", self.ports["3.1.1"]) + listener("v5", self.ports["5"]))
        return [str(WORK / "tools" / "bin" / "rumqttd"), "--config", str(conf)]


class Aedes(Broker):
    name = "aedes"
    protocols = ("3.1.1", "5")

    def install(self):
        if not (self.dir / "node_modules" / "aedes").exists():
            log("installing aedes 1 with npm")
            run(["npm", "install", "--silent", "--prefix", str(self.dir), "aedes@1"])

    def command(self):
        # aedes 1.x is an ES module with an async constructor.
        (self.dir / "server.mjs").write_text(
            "import { Aedes } from 'aedes';\nimport { createServer } from 'node:net';\n"
            "const broker = await Aedes.createBroker();\n"
            f"createServer(broker.handle).listen({self.port}, '127.0.0.1');\n")
        return ["node", str(self.dir / "server.mjs")]


class Amqtt(Broker):
    name = "amqtt"
    login = ("ingest", "ingest-secret")

    def install(self):
        venv = self.dir / "venv"
        if not (venv / "bin" / "amqtt").exists():
            log("installing amqtt 0.12 with pip in a venv")
            run([sys.executable, "-m", "venv", str(venv)])
            run([str(venv / "bin" / "pip"), "install", "--quiet", "amqtt==0.12.*"])

    def command(self):
        conf = self.dir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n")
        return [str(self.dir / "venv" / "bin" / "amqtt"), "-c", str(conf)]


class Ejabberd(Broker):
    name = "ejabberd"
    login = ("ingest@localhost", "any")

    def install(self):
        if shutil.which("ejabberdctl") is None:
            log("installing ejabberd with apt-get (without starting Debian's own instance)")
            policy = Path("/usr/sbin/policy-rc.d")
            had_policy = policy.exists()
            if not had_policy:
                policy.write_text("#!/bin/sh\nexit 101\n")
                policy.chmod(0o755)
            try:
                env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
                run(["apt-get", "install", "-y", "-qq", "ejabberd"], env=env)
            finally:
                if not had_policy:
                    policy.unlink()

    def env(self):
        return dict(os.environ, HOME=str(self.dir))

    def command(self):
        # Debian's ejabberdctl runs ejabberd as its own user, reads /etc/ejabberd unless given
        # its own ejabberdctl.cfg, and starts from an empty spool (sessions live in RAM anyway).
        shutil.rmtree(self.dir / "spool", ignore_errors=True)
        for d in ("logs", "spool"):
            (self.dir / d).mkdir(exist_ok=True)
        (self.dir / "ejabberdctl.cfg").write_text("ERLANG_NODE=matrix@localhost\n")
        # Any login is taken (anonymous authentication in its "login" form): mod_mqtt refuses
        # a CONNECT without a user name.
        (self.dir / "ejabberd.yml").write_text(
            "hosts:\n  - localhost\nloglevel: info\n"
            "auth_method: [anonymous]\nanonymous_protocol: login_anon\n"
            "allow_multiple_connections: true\n"
            "listen:\n"
            f"  - port: {self.port}\n    ip: 127.0.0.1\n    module: mod_mqtt\n"
            "modules:\n  mod_mqtt: {}\n")
        run(["chown", "-R", "ejabberd:ejabberd", str(self.dir)])
        return ["ejabberdctl", "--config", str(self.dir / "ejabberd.yml"),
                "--ctl-config", str(self.dir / "ejabberdctl.cfg"),
                "--logs", str(self.dir / "logs"), "--spool", str(self.dir / "spool"),
                "foreground"]

    def stop(self):
        # The node runs under ejabberd's own user, outside our process group: ask it to stop.
        subprocess.run(["ejabberdctl", "--ctl-config", str(self.dir / "ejabberdctl.cfg"), "stop"],
                       check=False, capture_output=True, env=self.env())
        if self.proc:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        super().stop()
        subprocess.run(["pkill", "-f", "matrix@localhost"], check=False)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and wait_port(self.port, 0.2):
            time.sleep(0.2)


BROKERS = {b.name: b for b in (Mosquitto, Rumqttd, Aedes, Amqtt, Ejabberd)}

# --- the service and the devices --------------------------------------------------------------


class Service:
    def __init__(self, broker, protocol, db, client_id, extra=None):
        self.log_path = WORK / f"{broker.name}-{protocol}-{client_id}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "DB_"))}
        env.update({
            "MQTT_BROKER": "127.0.0.1", "MQTT_PORT": str(broker.ports[protocol]),
            "MQTT_PROTOCOL": protocol, "MQTT_CLIENT_ID": client_id,
            "MQTT_USERNAME": broker.login[0], "MQTT_PASSWORD": broker.login[1],
            "MQTT_RECONNECT_MIN_SECS": "1", "MQTT_RECONNECT_MAX_SECS": "30",
            "DB_HOST": DB["host"], "DB_PORT": DB["port"], "DB_USER": DB["user"],
            "DB_PASSWORD": DB["password"], "DB_NAME": db, "HTTP_LISTEN": "",
            "LOG_FORMAT": "text", "LOG_LEVEL": "info", "STATS_INTERVAL_SECS": "0",
        })
        env.update(extra or {})
        # One log per check, appended to: this run's part starts here.
        self.offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            [str(SERVICE), "--env-file", "/dev/null"], env=env,
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT)

    def text(self):
        with open(self.log_path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def wait_log(self, needle, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return True
            if self.proc.poll() is not None:
                return needle in self.text()
            time.sleep(0.2)
        return False

    def connects(self):
        return self.text().count("connected to the MQTT broker")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def mosquitto_pub(broker, topic):
    """A device's publisher: MQTT 3.1.1 (what ESP32 boards speak), QoS 1."""
    cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.ports["3.1.1"]), "-q", "1",
           "-t", topic]
    if broker.login[0]:
        cmd += ["-u", broker.login[0], "-P", broker.login[1]]
    return cmd


def publish(broker, topic, payload):
    return subprocess.run(mosquitto_pub(broker, topic) + ["-m", payload], capture_output=True,
                          timeout=30).returncode == 0


def publish_lines(broker, topic, lines):
    return subprocess.run(mosquitto_pub(broker, topic) + ["-l"], input="\n".join(lines) + "\n",
                          text=True, capture_output=True, timeout=120).returncode == 0


SEED = [
    ("data", '{"sensors": [{"sensor_name": "temperature", "value": 25.5, "unit": "C"}, '
             '{"sensor_name": "humidity", "value": 60, "unit": "%"}], '
             '"status": {"ip_address": "192.168.1.100", "rssi": -50}, '
             '"timestamp": "2025-12-19T14:30:00+08:00"}'),
    ("data", '{"temperature": 25.5, "humidity": 60, "light": 850}'),
    ("status", '{"status": "online", "battery": 95, "signal": "good"}'),
    ("heartbeat", '{"timestamp": "2025-12-19T14:30:00+08:00"}'),
]


def has(sensor, value=None):
    path = f"'$.sensors.{sensor}.value'"
    if value is None:
        return f"JSON_EXTRACT(last_report_data, {path}) IS NOT NULL"
    return f"JSON_VALUE(last_report_data, {path}) = {value}"


def check(broker, protocol):
    """One broker, one protocol version: the row of the matrix."""
    row = {}
    db = f"mi_matrix_{broker.name}_{protocol.replace('.', '')}"
    client = f"matrix-{broker.name}-{protocol.replace('.', '')}"
    fresh_database(db)
    broker.reset()
    broker.start()
    svc = Service(broker, protocol, db, client)
    if not svc.wait_log("subscribed topic=", 40):
        hint = "MQTT_PROTOCOL=3.1.1" in svc.text()
        row["connect"] = "no (hint: set MQTT_PROTOCOL=3.1.1)" if hint else "no"
        svc.stop()
        broker.stop()
        return row
    row["connect"] = "yes"
    register(db, ["seed"] + [f"s{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
             + [f"dev{i}" for i in range(DEVICES)] + ["shared"])
    for kind, payload in SEED:
        publish(broker, f"devices/seed/{kind}", payload)
    ok = wait_count(db, "uuid = 'seed' AND is_online = 1 AND last_heartbeat IS NOT NULL AND "
                    + has("light", 850) + " AND " + has("temperature"), 1, 20)
    row["seed examples"] = "yes" if ok else "no"

    # The service's own restart: what was published meanwhile waits in its session.
    svc.stop()
    for i in range(5):
        publish(broker, f"devices/s{i}/data", '{"during_restart": 1}')
    svc = Service(broker, protocol, db, client)
    svc.wait_log("subscribed topic=", 40)
    got = wait_count(db, "uuid LIKE 's_' AND " + has("during_restart"), 5, 20)
    row["service restart"] = f"{got}/5"

    # The broker's restart, with messages queued for the stopped service.
    svc.stop()
    for i in range(5):
        publish(broker, f"devices/b{i}/data", '{"during_broker_restart": 1}')
    broker.stop()
    broker.start()
    svc = Service(broker, protocol, db, client)
    svc.wait_log("subscribed topic=", 40)
    got = wait_count(db, "uuid LIKE 'b_' AND " + has("during_broker_restart"), 5, 20)
    lost = "session_present=false" in svc.text() and "no longer had" in svc.text()
    row["broker restart"] = f"{got}/5" + (" (session lost, warned)" if lost else "")

    # A burst: 5,000 messages from 100 devices, the last value of each must arrive.
    before = svc.connects()
    started = time.monotonic()
    for d in range(DEVICES):
        publish_lines(broker, f"devices/dev{d}/data",
                      [f'{{"seq": {s}}}' for s in range(SEQS)])
    got = wait_count(db, "uuid LIKE 'dev%' AND " + has("seq", SEQS - 1), DEVICES, 180)
    took = time.monotonic() - started
    reconnects = svc.connects() - before
    row["burst 5,000"] = (f"{got}/{DEVICES} devices at their last value, {took:.0f} s, "
                          f"{reconnects} reconnects")
    svc.stop()

    # A shared subscription.
    shared = Service(broker, protocol, db, client + "-shared", {"MQTT_SHARED_GROUP": "matrix"})
    if shared.wait_log("subscribed topic=", 30):
        publish(broker, "devices/shared/data", '{"shared": 1}')
        got = wait_count(db, "uuid = 'shared' AND " + has("shared"), 1, 15)
        row["$share"] = "yes" if got else "subscribed, delivers nothing"
    elif "no shared subscriptions" in shared.text():
        row["$share"] = "no (the service stops with a clear line)"
    else:
        reconnecting = shared.text().count("closed the connection soon after")
        row["$share"] = f"no (refused; {reconnecting} growing-backoff retries)"
    shared.stop()
    broker.stop()
    return row


def one_in_flight(other_binary, devices=50, seqs=40, rounds=2):
    """ejabberd keeps one message in flight: the drain of a queued backlog shows whether the
    service waits out a batch deadline per message. This binary against `other_binary`, same
    broker, alternating."""
    global SERVICE
    mine = SERVICE
    broker = Ejabberd()
    broker.install()
    broker.start()
    try:
        for r in range(rounds):
            for label, binary in (("this", mine), ("other", Path(other_binary))):
                SERVICE = binary
                db = f"mi_matrix_drain_{label}"
                fresh_database(db)
                client = f"matrix-drain-{label}-{r}"
                svc = Service(broker, "3.1.1", db, client)
                svc.wait_log("subscribed topic=", 40)
                register(db, [f"dev{i}" for i in range(devices)])
                svc.stop()
                for d in range(devices):
                    publish_lines(broker, f"devices/dev{d}/data",
                                  [f'{{"seq": {s}}}' for s in range(seqs)])
                started = time.monotonic()
                svc = Service(broker, "3.1.1", db, client)
                got = wait_count(db, "uuid LIKE 'dev%' AND " + has("seq", seqs - 1), devices, 300)
                took = time.monotonic() - started
                svc.stop()
                n = devices * seqs
                print(f"{label} ({binary}): {got}/{devices} devices, {n} queued messages in "
                      f"{took:.1f} s = {n / took:.0f} msg/s, start-up included", flush=True)
    finally:
        SERVICE = mine
        broker.stop()


COLUMNS = ["connect", "seed examples", "service restart", "broker restart", "burst 5,000",
           "$share"]


def main():
    if sys.argv[1:2] == ["--one-in-flight"]:
        one_in_flight(sys.argv[2])
        return
    names = sys.argv[1:] or list(BROKERS)
    WORK.mkdir(parents=True, exist_ok=True)
    if not SERVICE.exists():
        run(["cargo", "build", "--release", "--bin", "mqtt-ingest"], cwd=ROOT)
    rows = []
    for name in names:
        broker = BROKERS[name]()
        try:
            broker.install()
        except Exception as e:  # noqa: BLE001 - a broker that cannot be installed is a row
            rows.append((name, "-", {"connect": f"not installed: {e}"}))
            continue
        for protocol in broker.protocols:
            log(f"{name} with MQTT {protocol}")
            try:
                rows.append((name, protocol, check(broker, protocol)))
            except Exception as e:  # noqa: BLE001
                broker.stop()
                rows.append((name, protocol, {"connect": f"error: {e}"}))
    print("| broker | MQTT | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for name, protocol, row in rows:
        cells = [row.get(c, "-") for c in COLUMNS]
        print(f"| {name} | {protocol} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
