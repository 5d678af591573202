"""simotel.unrouted drops its oldest events when full (x-max-length, drop-head), as documented;
the bridge reads its depth, exports it and warns near and at the bound. Real RabbitMQ."""

from __future__ import annotations

from pathlib import Path

import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from bridge.amqp import Broker, Publisher
from bridge.translate import Payload, build_event
from bridge.unrouted import UnroutedWatch
from tests.helpers.env import make_settings
from tests.helpers.taps import drain

pytestmark = [pytest.mark.broker]


async def test_a_full_unrouted_queue_drops_its_oldest_and_is_reported(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(amqp_url, tmp_path, amqp={"url": amqp_url, "unrouted_max_length": 5})
    broker = Broker(settings.amqp)
    await broker.connect()
    publisher = Publisher(broker)
    await publisher.start()
    registry = CollectorRegistry()
    watch = UnroutedWatch(broker, settings.amqp, registry)
    sent = []

    async def publish(n: int) -> None:
        for _ in range(n):
            event = build_event("simotel.events", "simotel", "Nobody", Payload({}, "json"))
            await publisher.publish(event.exchange, event.routing_key, event.to_message())
            sent.append(event.message_id)

    try:
        with capture_logs() as logs:
            await publish(2)
            assert await watch.check_once() == 2
            await publish(2)
            assert await watch.check_once() == 4  # 80 %: near
            await publish(3)
            assert await watch.check_once() == 5  # full: the two oldest were dropped
            assert registry.get_sample_value("simotel_bridge_unrouted_full") == 1
            assert registry.get_sample_value("simotel_bridge_unrouted_depth") == 5
            assert await watch.check_once() == 5  # no second warning for the same state
    finally:
        await publisher.close()
        await broker.close()
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 2
    assert "near its bound" in warnings[0] and "oldest events are being dropped" in warnings[1]
    kept = await drain(amqp, "simotel.unrouted")
    assert [m.message_id for m in kept] == sent[2:]
