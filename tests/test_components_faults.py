"""Component RPC across a broker restart, on a private RabbitMQ node (never the shared one):
callers get the fallback within the deadline while the broker is gone, and answers again once
the bridge and the responder have reconnected (the reply-to consumer is re-established)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from bridge.amqp import Broker
from bridge.components import ComponentMetrics, ComponentRpc
from bridge.responder import Answer, ComponentRequest, ExtenApiAnswer, Responder
from tests.helpers import broker_node
from tests.helpers.broker_node import PrivateBroker
from tests.helpers.env import make_settings

pytestmark = [pytest.mark.disruptive, pytest.mark.broker, pytest.mark.timeout(150)]

private_broker = broker_node.private_broker

REQUEST = {"src": "09155441", "dst": "31041000", "data": "", "app_name": "x", "unique_id": "1"}
FALLBACK = {"ok": "1", "extension": "100"}


@pytest.mark.parametrize("how", ["graceful", "sigkill"])
async def test_component_calls_survive_a_broker_restart(
    private_broker: PrivateBroker, tmp_path: Path, how: str
) -> None:
    settings = make_settings(
        private_broker.url,
        tmp_path,
        amqp={"url": private_broker.url, "heartbeat": 2},
        sources={
            "simotel": {
                "webhook": {"allow_unauthenticated": True},
                "components": {"fallbacks": {"ExtenApi": FALLBACK}},
            }
        },
    )
    broker = Broker(settings.amqp)
    await broker.connect()
    registry = CollectorRegistry()
    rpc = ComponentRpc(broker, settings, ComponentMetrics(registry))
    await rpc.start()
    connection = await aio_pika.connect_robust(private_broker.url, reconnect_interval=0.5)
    bridge_back, responder_back = asyncio.Event(), asyncio.Event()
    broker.connection.reconnect_callbacks.add(lambda *_: bridge_back.set())
    connection.reconnect_callbacks.add(lambda *_: responder_back.set())

    async def route(req: ComponentRequest) -> Answer:
        return ExtenApiAnswer("120")

    try:
        async with Responder(connection) as responder:
            await responder.subscribe("ExtenApi", "*", route)
            assert await rpc.handle("simotel", "ExtenApi", REQUEST) == {
                "ok": "1",
                "extension": "120",
            }

            await asyncio.to_thread(private_broker.stop, kill=how == "sigkill")
            started = time.perf_counter()
            assert await rpc.handle("simotel", "ExtenApi", REQUEST) == FALLBACK
            assert time.perf_counter() - started < 0.8

            await asyncio.to_thread(private_broker.start)
            async with asyncio.timeout(60):
                await bridge_back.wait()
                await responder_back.wait()
                # The replies are consumed again in the background once the channel reopens.
                while not rpc.ready:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # no event to wait on: ready is a property
            answer = await rpc.handle("simotel", "ExtenApi", REQUEST)
            assert answer == {"ok": "1", "extension": "120"}
    finally:
        await rpc.close()
        await connection.close()
        await broker.close()
