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


class KafkaBroker:
    """A throwaway single-node Kafka broker; a context manager (``start()`` / ``stop()``)."""

    def __init__(
        self,
        *,
        version: str | None = None,
        startup_timeout: float = 120.0,
        heap: str = "512m",
        partitions: int = 4,
        scram_users: dict[str, str] | None = None,
    ) -> None:
        """`scram_users`: name -> password of a second listener, SASL_PLAINTEXT with
        SCRAM-SHA-512 (`sasl_bootstrap`), as MSK and Confluent Cloud authenticate clients."""
        self.version = version
        self.scram_users = dict(scram_users or {})
        self.sasl_port = 0
        self.startup_timeout = startup_timeout
        self.heap = heap
        self.partitions = partitions
        self.port = 0
        self.controller_port = 0
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = None

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

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fetch(self) -> Path:
        """Run the bundled kafka_fetch.sh (a no-op once cached); return the libs dir."""
        pinned = {"KAFKA_VERSION": self.version} if self.version else {}
        return Path(run_script("kafka_fetch.sh", pinned))

    def start(self) -> KafkaBroker:
        if self._proc is not None:
            raise RuntimeError("KafkaBroker already started")
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("java not found on PATH (Kafka needs Java 17+)")
        classpath = str(self.fetch() / "*")
        self.workdir = Path(tempfile.mkdtemp(prefix="lambdalake-kafka-"))
        try:
            self.port, self.controller_port, sasl_port = free_ports(3)
            self.sasl_port = sasl_port if self.scram_users else 0
            props = self._write_config()
            self.log_path = self.workdir / "kafka.log"
            self._log = open(self.log_path, "ab")
            jvm = [
                java,
                f"-Xmx{self.heap}",
                "-Xms64m",
                "-XX:+UseSerialGC",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
                "-cp",
                classpath,
            ]
            fmt = subprocess.run(
                [*jvm, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props),
                 *(arg for name, password in self.scram_users.items()
                   for arg in ("--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"))],
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            if fmt.returncode != 0:
                raise RuntimeError("Kafka storage format failed\n" + self.log_tail())
            self._proc = subprocess.Popen(
                [*jvm, "kafka.Kafka", str(props)],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _write_config(self) -> Path:
        assert self.workdir is not None
        p, c = self.port, self.controller_port
        config = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.voters": f"1@127.0.0.1:{c}",
            "listeners": f"PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{c}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{p}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": self.workdir / "data",
            "num.partitions": self.partitions,
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 4,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 4,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
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
        (self.workdir / "log4j2.properties").write_text(LOG4J2)
        props = self.workdir / "server.properties"
        props.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
        return props

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Kafka exited with code {self._proc.returncode}\n" + self.log_tail()
                )
            try:
                if _broker_count(self.port) >= 1:
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
    """Start a broker, print its bootstrap address (stdout), wait for Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stops the broker on the way out
    t0 = time.monotonic()
    with KafkaBroker() as broker:
        print(broker.bootstrap, flush=True)
        print(
            f"Kafka ready in {time.monotonic() - t0:.1f} s (log: {broker.log_path}); "
            "Ctrl-C to stop",
            file=sys.stderr,
        )
        try:
            while broker.running:
                time.sleep(1)
        except KeyboardInterrupt:
            return
        print("Kafka exited\n" + broker.log_tail(), file=sys.stderr)
    raise SystemExit(1)


if __name__ == "__main__":
    main()
