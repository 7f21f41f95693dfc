"""A real single-node Apache Kafka broker (KRaft, broker+controller) for tests and benchmarks.

No Docker: the jars come from Maven Central via ``scripts/kafka_fetch.sh`` and the broker runs
as a plain ``java`` subprocess on two free loopback ports, with its data in a temp dir.

    with KafkaBroker() as kafka:
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)

``python -m lambdalake.testing.kafka`` starts one and waits for Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import base64
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lambdalake.kafka_security import PLAINTEXT, KafkaSecurity
from lambdalake.resources import run_script
from lambdalake.testing import free_ports

LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
"""

# A node killed with -9 is fenced (its partitions led elsewhere, its replicas out of the ISR)
# once it misses heartbeats this long, so acks=all requests wait out a failover within the
# ingest function's timeout (20 s) instead of failing. The defaults take 9 s; when the node
# was also the active KRaft controller, the quorum's fetch timeout (2 s) and an election
# come first, and the new controller waits a whole session timeout of its own (8.5 s in all
# at load 25).
CLUSTER_FAILOVER = {
    "broker.heartbeat.interval.ms": 500,
    "broker.session.timeout.ms": 3000,
    "replica.lag.time.max.ms": 10_000,
}


def _cluster_id() -> str:
    """A random Kafka Uuid: 16 bytes, URL-safe base64 without padding, not starting with '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _broker_count(port: int, timeout: float = 2.0) -> int:
    """Send a raw Metadata v4 request (all topics); return how many live brokers it lists."""
    client = b"lambdalake"
    header = struct.pack(">hhih", 3, 4, 7, len(client)) + client  # api_key, version, corr, id
    body = struct.pack(">ib", -1, 0)  # topics=null (all), allow_auto_topic_creation=false
    msg = header + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(struct.pack(">i", len(msg)) + msg)
        data = b""
        while len(data) < 16:  # size, correlation id, throttle_time_ms, brokers array length
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed")
            data += chunk
    _size, corr, _throttle, brokers = struct.unpack(">iiii", data[:16])
    if corr != 7:
        raise ConnectionError(f"unexpected correlation id {corr}")
    return brokers


@dataclass(frozen=True)
class Quorum:
    """The nodes of one KRaft cluster: its id, and each node's (broker, controller) ports."""

    cluster_id: str
    ports: dict[int, tuple[int, int]]

    @classmethod
    def of(cls, size: int) -> Quorum:
        free = free_ports(2 * size)
        return cls(_cluster_id(), {n + 1: (free[2 * n], free[2 * n + 1]) for n in range(size)})

    @property
    def size(self) -> int:
        return len(self.ports)

    @property
    def voters(self) -> str:
        return ",".join(f"{node}@127.0.0.1:{c}" for node, (_, c) in self.ports.items())


class KafkaBroker:
    """A throwaway Kafka broker (broker+controller); a context manager (``start()`` /
    ``stop()``). Alone by default; a node of a `KafkaCluster` when given its `quorum`."""

    def __init__(
        self,
        *,
        version: str | None = None,
        startup_timeout: float = 120.0,
        heap: str = "512m",
        partitions: int = 4,
        scram_users: dict[str, str] | None = None,
        quorum: Quorum | None = None,
        node_id: int = 1,
    ) -> None:
        """`scram_users`: name -> password of a second listener, SASL_PLAINTEXT with
        SCRAM-SHA-512 (`sasl_bootstrap`), as MSK and Confluent Cloud authenticate clients."""
        self.version = version
        self.scram_users = dict(scram_users or {})
        self.sasl_port = 0
        self.startup_timeout = startup_timeout
        self.heap = heap
        self.partitions = partitions
        self.quorum = quorum
        self.node_id = node_id
        self.port = 0
        self.controller_port = 0
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._jvm: list[str] = []

    @property
    def bootstrap(self) -> str:
        if not self.port:
            raise RuntimeError("KafkaBroker is not started")
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        if not self.sasl_port:
            raise RuntimeError("KafkaBroker has no SASL listener (give scram_users)")
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fetch(self) -> Path:
        """Run the bundled kafka_fetch.sh (a no-op once cached); return the libs dir."""
        pinned = {"KAFKA_VERSION": self.version} if self.version else {}
        return Path(run_script("kafka_fetch.sh", pinned))

    def start(self) -> KafkaBroker:
        try:
            self.launch()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> None:
        """Format the node's storage and start its JVM, without waiting for it to serve (the
        nodes of a cluster elect a controller only once a majority of them runs)."""
        if self._proc is not None:
            raise RuntimeError("KafkaBroker already started")
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("java not found on PATH (Kafka needs Java 17+)")
        classpath = str(self.fetch() / "*")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"lambdalake-kafka-{self.node_id}-"))
        if self.quorum is None:
            self.port, self.controller_port, sasl_port = free_ports(3)
            self.sasl_port = sasl_port if self.scram_users else 0
        else:
            self.port, self.controller_port = self.quorum.ports[self.node_id]
        props = self._write_config()
        self.log_path = self.workdir / "kafka.log"
        self._log = open(self.log_path, "ab")
        self._jvm = [java, f"-Xmx{self.heap}", "-Xms64m", "-XX:+UseSerialGC",
                     "-Djava.awt.headless=true",
                     f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
                     "-cp", classpath]
        cluster_id = self.quorum.cluster_id if self.quorum else _cluster_id()
        fmt = subprocess.run(
            [*self._jvm, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props),
             *(arg for name, password in self.scram_users.items()
               for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"))],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if fmt.returncode != 0:
            raise RuntimeError("Kafka storage format failed\n" + self.log_tail())
        self._spawn()

    def _spawn(self) -> None:
        assert self.workdir is not None
        self._proc = subprocess.Popen(
            [*self._jvm, "kafka.Kafka", str(self.workdir / "server.properties")],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def kill(self) -> None:
        """kill -9: the JVM dies at once; its data and ports stay for `restart()`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def restart(self) -> None:
        """Start the JVM again on the same data and ports (after `kill()`), and wait."""
        if self.running:
            raise RuntimeError("KafkaBroker is still running")
        self._spawn()
        self.wait_ready()

    def _write_config(self) -> Path:
        assert self.workdir is not None
        p, c = self.port, self.controller_port
        replicas = self.quorum.size if self.quorum else 1
        insync = min(2, replicas)
        config = {
            "process.roles": "broker,controller",
            "node.id": self.node_id,
            "controller.quorum.voters": self.quorum.voters if self.quorum else f"1@127.0.0.1:{c}",
            "listeners": f"PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{c}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{p}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": self.workdir / "data",
            "num.partitions": self.partitions,
            "auto.create.topics.enable": "false",
            "default.replication.factor": replicas,
            "min.insync.replicas": insync,
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": 4,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": insync,
            "transaction.state.log.num.partitions": 4,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": insync,
            "group.initial.rebalance.delay.ms": 0,
            "num.network.threads": 2,
            "num.io.threads": 2,
            "num.recovery.threads.per.data.dir": 1,
            "log.segment.bytes": 16 * 1024 * 1024,
            "log.cleaner.dedupe.buffer.size": 16 * 1024 * 1024,
        }
        if self.sasl_port:
            sasl = f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"
            config |= {
                "listeners": f"{config['listeners']},{sasl}",
                "advertised.listeners": f"{config['advertised.listeners']},{sasl}",
                "listener.security.protocol.map":
                    f"{config['listener.security.protocol.map']},SASL_PLAINTEXT:SASL_PLAINTEXT",
                "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            }
        if self.quorum:
            config |= CLUSTER_FAILOVER
        (self.workdir / "log4j2.properties").write_text(LOG4J2)
        props = self.workdir / "server.properties"
        props.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
        return props

    def wait_ready(self) -> None:
        """Until this node's metadata lists every broker of its cluster."""
        assert self._proc is not None
        brokers = self.quorum.size if self.quorum else 1
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Kafka exited with code {self._proc.returncode}\n" + self.log_tail()
                )
            try:
                if _broker_count(self.port) >= brokers:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Kafka not ready on {self.bootstrap} after "
                    f"{self.startup_timeout:.0f} s\n" + self.log_tail()
                )
            time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the broker's log (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last {len(tail)} lines of the Kafka log ---\n" + "\n".join(tail)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The broker frozen (SIGSTOP) for the block, as in a long GC pause or a network
        partition: connections stay open, nothing is answered; then it resumes as it was."""
        if self._proc is None:
            raise RuntimeError("KafkaBroker is not started")
        self._proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM the broker (SIGKILL after 10 s) and remove its temp dir. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        self.port = self.controller_port = self.sasl_port = 0


class KafkaCluster:
    """`size` Kafka nodes in one KRaft quorum, each a broker and a controller, on loopback
    ports: internal topics replicated on every node, `min.insync.replicas` 2. A context
    manager; `brokers[i].kill()` / `.restart()` take one down and bring it back.

    ``python -m lambdalake.testing.kafka --cluster 3`` starts one and waits for Ctrl-C."""

    def __init__(
        self, size: int = 3, *, heap: str = "384m", partitions: int = 4,
        version: str | None = None, startup_timeout: float = 180.0,
    ) -> None:
        self.quorum = Quorum.of(size)
        self.brokers = [
            KafkaBroker(version=version, heap=heap, partitions=partitions, quorum=self.quorum,
                        node_id=node, startup_timeout=startup_timeout)
            for node in self.quorum.ports
        ]

    @property
    def bootstrap(self) -> str:
        return ",".join(broker.bootstrap for broker in self.brokers)

    @property
    def running(self) -> bool:
        return all(broker.running for broker in self.brokers)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> KafkaCluster:
        try:
            for broker in self.brokers:
                broker.launch()
            for broker in self.brokers:
                broker.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for broker in self.brokers:
            broker.stop()

    def smallest_isr(self, topic: str) -> int:
        """The fewest in-sync replicas any partition of `topic` has now."""
        from confluent_kafka.admin import AdminClient

        live = ",".join(b.bootstrap for b in self.brokers if b.running)
        topics = AdminClient({"bootstrap.servers": live}).list_topics(topic, timeout=10).topics
        return min(len(p.isrs) for p in topics[topic].partitions.values())

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(broker.log_tail(lines) for broker in self.brokers)


def read_topic(bootstrap: str, topic: str, security: KafkaSecurity = PLAINTEXT) -> list[Any]:
    """Every record of `topic` now (confluent-kafka messages), in offset order per partition."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "enable.partition.eof": True, **security.librdkafka()})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    found, ended = [], set()
    while len(ended) < len(partitions):
        for message in consumer.consume(10_000, 1.0):
            if message.error() and message.error().code() == KafkaError._PARTITION_EOF:
                ended.add(message.partition())
            else:
                found.append(message)
    consumer.close()
    return sorted(found, key=lambda m: (m.partition(), m.offset()))


def main() -> None:
    """Start a broker (`--cluster N`: a cluster of N), print its bootstrap address (stdout),
    wait for Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stops the broker on the way out
    t0 = time.monotonic()
    size = int(sys.argv[2]) if sys.argv[1:2] == ["--cluster"] else 0
    kafka: KafkaBroker | KafkaCluster = KafkaCluster(size) if size else KafkaBroker()
    with kafka as broker:
        print(broker.bootstrap, flush=True)
        print(f"Kafka ready in {time.monotonic() - t0:.1f} s; Ctrl-C to stop", file=sys.stderr)
        try:
            while broker.running:
                time.sleep(1)
        except KeyboardInterrupt:
            return
        print("Kafka exited\n" + broker.log_tail(), file=sys.stderr)
    raise SystemExit(1)


if __name__ == "__main__":
    main()
