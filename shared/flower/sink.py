"""Where the ServerApp hands each round's results: a directory, or the controller over MQTT.

A sink gets, after every round, the `RoundMetrics` and the global weights (a fedsky model file's
bytes), and at the end one `RunFinished`. It imports neither Flower nor torch.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Protocol

from fedsky.shared.ids import aggregator_id
from fedsky.shared.messages import MAX_PAYLOAD_BYTES, Message, RoundMetrics, RunFinished
from fedsky.shared.retry import Backoff
from fedsky.shared.topics import Topics

log = logging.getLogger(__name__)


class SinkError(RuntimeError):
    """Results could not be delivered; the run cannot report what it trains."""


class Sink(Protocol):
    def round_finished(self, metrics: RoundMetrics, weights: bytes | None) -> None: ...

    def run_finished(self, message: RunFinished) -> None: ...

    def close(self) -> None: ...


class NullSink:
    def round_finished(self, metrics: RoundMetrics, weights: bytes | None) -> None:
        log.info("round %s: accuracy %.4f f1 %.4f", metrics.round, metrics.accuracy, metrics.f1)

    def run_finished(self, message: RunFinished) -> None:
        log.info("run %s: %s %s", message.job_id, message.status, message.reason)

    def close(self) -> None:
        return None


class FileSink:
    """`round-NNNN.json` (the RoundMetrics), `round-NNNN.safetensors` (a model file with the
    round's global weights) and, at the end, `run.json` (the RunFinished)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / name)

    def round_finished(self, metrics: RoundMetrics, weights: bytes | None) -> None:
        if weights is not None:
            self._write(f"round-{metrics.round:04d}.safetensors", weights)
        self._write(f"round-{metrics.round:04d}.json", metrics.encode())

    def run_finished(self, message: RunFinished) -> None:
        self._write("run.json", message.encode())

    def close(self) -> None:
        return None


def read_file_sink(directory: str | Path) -> tuple[list[RoundMetrics], RunFinished | None]:
    """The rounds (in order) and the end of run a FileSink wrote."""
    directory = Path(directory)
    rounds = [
        RoundMetrics.model_validate(json.loads(p.read_bytes()))
        for p in sorted(directory.glob("round-*.json"))
    ]
    end = directory / "run.json"
    finished = RunFinished.model_validate(json.loads(end.read_bytes())) if end.exists() else None
    return rounds, finished


class MqttSink:
    """Publishes to `Topics(prefix).aggregator_metrics("agg-<job id>")` with the job's identity.

    QoS 1, MQTT 5, mutual TLS with the job's own certificate (never the operator's). Each round
    sends its RoundMetrics, then the weights in chunks (see fedsky.shared.flower.transfer).
    Every publish waits for the broker's acknowledgement up to `publish_timeout_s`; past that
    the sink raises SinkError and the run fails rather than train on without reporting.
    """

    def __init__(
        self,
        *,
        job_id: str,
        host: str,
        port: int,
        ca_file: Path,
        cert_file: Path,
        key_file: Path,
        prefix: str,
        publish_weights: bool = True,
        publish_timeout_s: float = 60.0,
        connect_timeout_s: float = 30.0,
    ) -> None:
        import paho.mqtt.client as mqtt
        from fedsky.shared.tls import client_context
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.job_id = job_id
        self.client_id = aggregator_id(job_id)
        self.topic = Topics(prefix).aggregator_metrics(self.client_id)
        self.publish_weights = publish_weights
        self.publish_timeout_s = publish_timeout_s
        self._connected = threading.Event()
        self._refused: str | None = None
        self._closing = False
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        try:
            client.tls_set_context(
                client_context(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
            )
        except (OSError, ValueError) as exc:
            raise SinkError(f"cannot load the aggregator's bus credentials: {exc}") from None
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self._client = client
        last: Exception | None = None
        for delay in Backoff(base_s=0.5, cap_s=5.0, max_total_s=connect_timeout_s).delays():
            try:
                client.connect(host, port, keepalive=30)
                break
            except OSError as exc:
                last = exc
                self._connected.wait(delay)
        else:
            raise SinkError(f"cannot reach the bus at {host}:{port}: {last}")
        client.loop_start()
        if not self._connected.wait(connect_timeout_s) or self._refused:
            client.loop_stop()
            raise SinkError(
                f"the bus at {host}:{port} did not accept {self.client_id}: {self._refused or 'timed out'}"
            )

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = str(reason)
        else:
            self._refused = None
        self._connected.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._connected.clear()
        if not self._closing:
            log.warning("aggregator %s lost the bus: %s", self.client_id, reason)

    def _publish_all(self, messages: list[Message]) -> None:
        infos = []
        for msg in messages:
            payload = msg.encode()
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise SinkError(
                    f"a {type(msg).__name__} of {len(payload)} bytes exceeds the bus limit"
                )
            infos.append(self._client.publish(self.topic, payload, qos=1))
        for info in infos:
            try:
                info.wait_for_publish(self.publish_timeout_s)
            except (RuntimeError, ValueError) as exc:
                raise SinkError(f"publishing results failed: {exc}") from None
            if not info.is_published():
                raise SinkError(
                    f"the bus did not acknowledge results within {self.publish_timeout_s:.0f} s"
                )

    def round_finished(self, metrics: RoundMetrics, weights: bytes | None) -> None:
        from fedsky.shared.flower.transfer import split_weights

        messages: list[Message] = []
        if weights is not None and self.publish_weights:
            ref, chunks = split_weights(job_id=self.job_id, round=metrics.round, data=weights)
            metrics = metrics.model_copy(update={"weights": ref})
            messages = [metrics, *chunks]
        else:
            messages = [metrics.model_copy(update={"weights": None})]
        self._publish_all(messages)

    def run_finished(self, message: RunFinished) -> None:
        self._publish_all([message])

    def close(self) -> None:
        self._closing = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
