"""Round results to the controller: chunked weights, and the MQTT sink against a real broker."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fedsky.controller.security.pki import Pki
from fedsky.shared.flower.sink import FileSink, MqttSink, SinkError, read_file_sink
from fedsky.shared.flower.transfer import (
    AggregatorFeed,
    RoundReady,
    RunEnded,
    TransferError,
    WeightsAssembler,
    split_weights,
)
from fedsky.shared.messages import (
    MAX_PAYLOAD_BYTES,
    WEIGHTS_CHUNK_BYTES,
    ClassFigures,
    PayloadError,
    RoundMetrics,
    RunFinished,
    SiteContribution,
    decode_aggregator,
)
from fedsky.shared.modelfile import make_example, parse_model_bytes

from tests.support import MqttBroker


def _metrics(job_id: str = "job-1", rnd: int = 1) -> RoundMetrics:
    now = datetime.now(UTC)
    return RoundMetrics(
        job_id=job_id,
        round=rnd,
        num_rounds=2,
        accuracy=0.5,
        loss=0.7,
        f1=0.4,
        recall=0.5,
        precision=0.3,
        per_class=[
            ClassFigures(label=i, precision=0.3, recall=0.5, f1=0.4, support=2, predicted=2)
            for i in range(2)
        ],
        confusion_matrix=[[1, 1], [1, 1]],
        participants=[SiteContribution(site="hospital-a", train_examples=10, eval_examples=4)],
        started_at=now,
        finished_at=now,
        duration_s=1.5,
    )


def test_split_and_assemble_in_any_order_with_duplicates() -> None:
    data = bytes(range(256)) * 9000  # 2.3 MB: five chunks
    ref, chunks = split_weights(job_id="job-1", round=3, data=data)
    assert ref.size == len(data)
    assert ref.chunks == len(chunks) == 5
    assert all(len(c.encode()) < MAX_PAYLOAD_BYTES for c in chunks)
    asm = WeightsAssembler()
    order = [chunks[i] for i in (4, 0, 2, 2, 1)]
    assert all(asm.add(c, sender="agg-job-1") is None for c in order)
    assert asm.pending_bytes == len(data) - WEIGHTS_CHUNK_BYTES  # all but chunk 3
    done = asm.add(chunks[3], sender="agg-job-1")
    assert done is not None
    assert done.data == data
    assert done.round == 3
    assert asm.pending_bytes == 0
    empty_ref, empty = split_weights(job_id="job-1", round=1, data=b"")
    assert empty_ref.chunks == 1
    assert asm.add(empty[0]) is not None


def test_assembler_refuses_bad_chunks_and_stays_bounded() -> None:
    data = b"x" * (WEIGHTS_CHUNK_BYTES * 2 + 10)
    _, chunks = split_weights(job_id="job-1", round=1, data=data)
    asm = WeightsAssembler(max_bytes=WEIGHTS_CHUNK_BYTES * 3, max_transfers=2, stale_s=60)
    wrong = chunks[2].model_copy(update={"data": base64.b64encode(b"y" * 10).decode()})
    asm.add(chunks[0])
    asm.add(chunks[1])
    with pytest.raises(TransferError, match="SHA-256"):
        asm.add(wrong)
    with pytest.raises(TransferError, match="not base64"):
        asm.add(chunks[0].model_copy(update={"data": "***"}))
    asm.add(chunks[0])
    with pytest.raises(TransferError, match="count changed"):
        asm.add(chunks[1].model_copy(update={"count": 7}))
    # Three transfers at once with room for two: the oldest goes.
    for rnd in (1, 2, 3):
        _, cs = split_weights(job_id="job-1", round=rnd, data=data)
        asm.add(cs[0], now=float(rnd))
    assert asm.pending_bytes <= WEIGHTS_CHUNK_BYTES * 3
    # Idle transfers expire.
    asm.add(split_weights(job_id="job-2", round=1, data=data)[1][0], now=1000.0)
    assert asm.pending_bytes == WEIGHTS_CHUNK_BYTES


def test_feed_pairs_rounds_with_their_weights() -> None:
    feed = AggregatorFeed(wait_for_weights_s=30)
    blob = b"w" * (WEIGHTS_CHUNK_BYTES + 5)
    ref, chunks = split_weights(job_id="job-1", round=1, data=blob)
    m1 = _metrics(rnd=1).model_copy(update={"weights": ref})
    # Metrics first, then the chunks (the order the aggregator sends them).
    assert feed.feed("agg-job-1", m1.encode(), now=0) == []
    assert feed.feed("agg-job-1", chunks[0].encode(), now=1) == []
    (ready,) = feed.feed("agg-job-1", chunks[1].encode(), now=2)
    assert isinstance(ready, RoundReady)
    assert ready.weights == blob
    assert ready.metrics == m1
    # Chunks that overtake their metrics wait for them.
    ref2, chunks2 = split_weights(job_id="job-1", round=2, data=b"v" * 10)
    assert feed.feed("agg-job-1", chunks2[0].encode(), now=3) == []
    (ready2,) = feed.feed(
        "agg-job-1", _metrics(rnd=2).model_copy(update={"weights": ref2}).encode(), now=4
    )
    assert isinstance(ready2, RoundReady)
    assert ready2.weights == b"v" * 10
    # A round without weights goes at once; one whose weights never come goes at the run's end
    # (or on expiry) without them.
    (bare,) = feed.feed("agg-job-1", _metrics(rnd=3).encode(), now=5)
    assert isinstance(bare, RoundReady)
    assert bare.weights is None
    ref4, _ = split_weights(job_id="job-1", round=4, data=b"lost")
    assert (
        feed.feed("agg-job-1", _metrics(rnd=4).model_copy(update={"weights": ref4}).encode(), now=6)
        == []
    )
    end = RunFinished(job_id="job-1", status="completed", rounds_completed=4, num_rounds=4)
    flushed, ended = feed.feed("agg-job-1", end.encode(), now=7)
    assert isinstance(flushed, RoundReady)
    assert flushed.metrics.round == 4
    assert flushed.weights is None
    assert isinstance(ended, RunEnded)
    assert (
        feed.feed("agg-job-1", _metrics(rnd=5).model_copy(update={"weights": ref4}).encode(), now=8)
        == []
    )
    (late,) = feed.expire(now=100)
    assert late.metrics.round == 5
    # An aggregator reports only on its own job.
    with pytest.raises(PayloadError) as err:
        feed.feed("agg-job-2", m1.encode())
    assert err.value.reason == "wrong_sender"


def test_decode_aggregator_messages() -> None:
    m = _metrics()
    assert decode_aggregator(m.encode()) == m
    end = RunFinished(job_id="job-1", status="failed", rounds_completed=1, num_rounds=2, reason="x")
    assert decode_aggregator(end.encode()) == end
    with pytest.raises(PayloadError) as err:
        decode_aggregator(b'{"kind": "round_metrics", "job_id": "job-1"}')
    assert err.value.reason == "invalid"
    with pytest.raises(PayloadError):
        decode_aggregator(b'{"kind": "weights_chunk", "schema": "2.0"}')
    with pytest.raises(ValueError, match="square"):
        RoundMetrics.model_validate({**m.model_dump(), "confusion_matrix": [[1, 2], [3]]})


def test_file_sink(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "out")
    sink.round_finished(_metrics(rnd=1), b"weights-1")
    sink.round_finished(_metrics(rnd=2), None)
    sink.run_finished(
        RunFinished(job_id="job-1", status="completed", rounds_completed=2, num_rounds=2)
    )
    rounds, end = read_file_sink(tmp_path / "out")
    assert [r.round for r in rounds] == [1, 2]
    assert (tmp_path / "out" / "round-0001.safetensors").read_bytes() == b"weights-1"
    assert end is not None
    assert end.status == "completed"


async def test_mqtt_sink_delivers_a_26_mb_model(
    tmp_path: Path, pki: Pki, mqtt_broker: MqttBroker
) -> None:
    job_id = "j26mb"
    agg = mqtt_broker.client_context_for(f"agg-{job_id}", kind="aggregator")
    ctl = mqtt_broker.client_context_for("controller", kind="controller")
    model = tmp_path / "xray.safetensors"
    make_example("xray", model)
    blob = model.read_bytes()
    topic = mqtt_broker.topics.aggregator_metrics(f"agg-{job_id}")

    def publish() -> None:
        sink = MqttSink(
            job_id=job_id,
            host=mqtt_broker.host,
            port=mqtt_broker.port,
            ca_file=agg.ca_file,
            cert_file=agg.cert_file,
            key_file=agg.key_file,
            prefix=mqtt_broker.prefix,
        )
        try:
            sink.round_finished(_metrics(job_id=job_id, rnd=1), blob)
            sink.run_finished(
                RunFinished(job_id=job_id, status="completed", rounds_completed=1, num_rounds=1)
            )
        finally:
            sink.close()

    feed = AggregatorFeed()
    got: list[RoundReady | RunEnded] = []
    async with mqtt_broker.client(ctl) as client:
        await client.subscribe(mqtt_broker.topics.all_aggregators_up, qos=1)
        task = asyncio.create_task(asyncio.to_thread(publish))
        async with asyncio.timeout(60):
            async for message in client.messages:
                assert str(message.topic) == topic
                assert isinstance(message.payload, bytes)
                assert len(message.payload) <= MAX_PAYLOAD_BYTES
                parsed = mqtt_broker.topics.parse_up(str(message.topic))
                assert parsed is not None
                got += feed.feed(parsed.sender, message.payload)
                if got and isinstance(got[-1], RunEnded):
                    break
        await task
    ready, ended = got
    assert isinstance(ready, RoundReady)
    assert isinstance(ended, RunEnded)
    metrics, weights = ready.metrics, ready.weights
    assert metrics.weights is not None
    assert weights == blob
    assert metrics.weights.size == len(blob)
    assert metrics.weights.chunks == len(blob) // WEIGHTS_CHUNK_BYTES + 1
    parse_model_bytes(weights)


async def test_mqtt_sink_fails_clearly(tmp_path: Path, pki: Pki, mqtt_broker: MqttBroker) -> None:
    agg = mqtt_broker.client_context_for("agg-j2", kind="aggregator")
    with pytest.raises(SinkError, match="cannot load"):
        MqttSink(
            job_id="j2",
            host=mqtt_broker.host,
            port=mqtt_broker.port,
            ca_file=tmp_path / "none.crt",
            cert_file=agg.cert_file,
            key_file=agg.key_file,
            prefix=mqtt_broker.prefix,
        )
    mqtt_broker.stop()

    def unreachable() -> None:
        MqttSink(
            job_id="j2",
            host=mqtt_broker.host,
            port=mqtt_broker.port,
            ca_file=agg.ca_file,
            cert_file=agg.cert_file,
            key_file=agg.key_file,
            prefix=mqtt_broker.prefix,
            connect_timeout_s=2.0,
        )

    with pytest.raises(SinkError, match="cannot reach the bus"):
        await asyncio.to_thread(unreachable)
