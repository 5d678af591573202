"""The spool sink behind the real ingress app (`bridge.ingress.create_app`): what Simotel sees
(200 / 503), /readyz and /metrics, and webhooks over HTTP through a restart of a private
broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import orjson
import pytest

from bridge.config import Settings
from bridge.ingress import create_app
from bridge.metrics import Metrics
from tests.helpers import broker_node
from tests.helpers.broker_node import PrivateBroker
from tests.helpers.env import make_settings
from tests.helpers.sink import (
    Send,
    Stack,
    Traffic,
    check_delivery,
    declare_audit,
    open_stack,
    percentile,
    read_queue,
)

AUTH = ("simotel", "secret")
CLOSED_PORT_URL = "amqp://guest:guest@127.0.0.1:1/"

private_broker = broker_node.private_broker


@asynccontextmanager
async def ingress(settings: Settings, *, connect: bool = True) -> AsyncIterator[
    tuple[httpx.AsyncClient, Stack]
]:  # fmt: skip
    metrics = Metrics()
    stack = await open_stack(
        settings,
        connect=connect,
        registry=metrics.registry,
        confirm_latency=metrics.confirm_latency,
    )
    app = create_app(
        settings, sink=stack.sink, metrics=metrics, broker_ready=lambda: stack.broker.ready
    )
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge") as client:
            yield client, stack
    finally:
        await stack.close()


def webhook(call: str, n: int) -> bytes:
    return orjson.dumps({"event_name": "NewState", "unique_id": call, "n": n, "state": "Ring"})


def http_sender(client: httpx.AsyncClient) -> Send:
    async def send(call: str, n: int) -> tuple[str, str | None]:
        r = await client.post(
            "/webhooks/simotel/events",
            content=webhook(call, n),
            headers={"content-type": "application/json"},
            auth=AUTH,
        )
        if r.status_code == 200:
            return "200", str(r.json()["message_id"])
        return str(r.status_code), None

    return send


async def test_without_a_broker_webhooks_are_spooled_then_refused_when_full(
    tmp_path: Path,
) -> None:
    settings = make_settings(CLOSED_PORT_URL, tmp_path, spool={
        "path": str(tmp_path / "spool.sqlite3"), "max_messages": 2,
    })  # fmt: skip
    async with ingress(settings, connect=False) as (client, stack):
        send = http_sender(client)
        assert (await client.get("/readyz")).json()["mode"] == "spool"
        assert [(await send("c", n))[0] for n in range(2)] == ["200", "200"]
        ready = await client.get("/readyz")
        assert ready.json()["spool_depth"] == 2
        assert ready.json()["mode"] == "full"
        assert ready.status_code == 503
        assert await send("c", 2) == ("503", None)
        metrics = (await client.get("/metrics")).text
        assert "simotel_bridge_spool_depth 2.0" in metrics
        assert 'simotel_bridge_spool_full_total{reason="messages"} 1.0' in metrics
        assert (
            'simotel_bridge_webhooks_accepted_total{destination="spool",event="NewState",'
            'source="simotel"} 2.0' in metrics
        )
        assert stack.sink.depth == 2


@pytest.mark.disruptive
@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_webhooks_over_http_through_a_broker_crash(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    url = private_broker.url
    await declare_audit(url)
    settings = make_settings(url, tmp_path, amqp={"url": url, "publish_timeout": 1.0})
    async with ingress(settings) as (client, stack):
        async with Traffic(http_sender(client), calls=20, rate_per_call=10) as traffic:
            await traffic.wait_for("200", 200, timeout=10)
            await asyncio.to_thread(private_broker.stop, kill=True)
            await traffic.wait_for("200", 200, timeout=10)
            ready = await client.get("/readyz")  # a second into the outage
            await asyncio.to_thread(private_broker.start)
            await traffic.wait_for("200", 400, timeout=30)
        assert await stack.sink.wait_drained(30)
        assert (await client.get("/readyz")).json()["mode"] == "broker"
    assert ready.status_code == 200
    assert ready.json()["mode"] == "spool"
    got = await read_queue(url)
    delivery = check_delivery(traffic.sent, got)
    print(
        f"\nhttp: outcomes={dict(traffic.outcomes)} on_queue={len(got)} "
        f"duplicates={delivery.duplicates} p99={percentile(traffic.latencies, 99) * 1000:.1f}ms"
    )
    assert set(traffic.outcomes) == {"200"}
    assert delivery.ok, delivery
    assert stack.metric("simotel_bridge_spool_replayed_total") > 0
