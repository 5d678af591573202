"""The whole ingress as `simotel-bridge ingress` builds it (one broker connection shared by the
event sink with its spool and the component RPC), driven in-process over ASGI, plus a watch on
that shared connection: a broker that closes it (a frame it refuses) shows up as a loss."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import aio_pika
import httpx
from aio_pika.abc import AbstractIncomingMessage
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry

from bridge.amqp import Broker, Publisher
from bridge.components import ComponentMetrics, ComponentRpc
from bridge.config import Settings
from bridge.ingress import create_app
from bridge.metrics import Metrics
from bridge.sink import EventSink, SpoolMetrics
from tests.helpers.env import AMQP_HOST, make_settings, rabbitmqctl

T = TypeVar("T")
R = TypeVar("R")

AUTH = ("simotel", "secret")
NORMAL_EVENT = {"event_name": "NewState", "unique_id": "1610778618.378", "state": "Ringing"}


def full_settings(amqp_url: str, tmp_path: Path, **components: Any) -> Settings:
    return make_settings(
        amqp_url,
        tmp_path,
        sources={
            "simotel": {
                "webhook": {"username": "simotel", "password": "secret"},
                "components": components,
            }
        },
    )


@dataclass
class FullBridge:
    settings: Settings
    broker: Broker
    publisher: Publisher
    sink: EventSink
    rpc: ComponentRpc
    metrics: Metrics
    client: httpx.AsyncClient
    losses: list[str] = field(default_factory=list)
    _transport: object = None

    @classmethod
    async def start(cls, settings: Settings) -> FullBridge:
        broker = Broker(settings.amqp)
        await broker.connect()
        publisher = Publisher(broker)
        await publisher.start()
        metrics = Metrics(CollectorRegistry())
        sink = await EventSink.open(settings, publisher, SpoolMetrics(metrics.registry))
        rpc = ComponentRpc(broker, settings, ComponentMetrics(metrics.registry), events=sink)
        await rpc.start()
        app = create_app(
            settings,
            sink=sink,
            metrics=metrics,
            components=rpc,
            broker_ready=lambda: broker.ready,
        )
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 40000)),
            base_url="http://bridge",
            timeout=30,
        )
        fb = cls(settings, broker, publisher, sink, rpc, metrics, client)
        conn = broker.connection
        fb._transport = conn.transport
        conn.close_callbacks.add(lambda _c, exc=None: fb.losses.append(repr(exc)))
        return fb

    def connection_intact(self) -> bool:
        """The shared connection was never closed nor replaced since the start."""
        conn = self.broker.connection
        return not self.losses and conn.transport is self._transport and self.broker.ready

    async def event(self, fields: dict[str, Any] | None = None) -> httpx.Response:
        return await self.client.post(
            "/webhooks/simotel/events", json=fields or NORMAL_EVENT, auth=AUTH
        )

    async def component(
        self, component: str, fields: dict[str, Any]
    ) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        r = await self.client.post(
            f"/webhooks/simotel/components/{component}", json=fields, auth=AUTH
        )
        return r, time.perf_counter() - started

    def sample(self, name: str, labels: dict[str, str]) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.rpc.close()
        await self.sink.close()
        await self.publisher.close()
        await self.broker.close()


# --- the standing attack suite's harness ---------------------------------------------------

# Examples per property: small by default so the suite adds seconds to CI; raise it for a long
# run, e.g. SIMOTEL_BRIDGE_ATTACK_EXAMPLES=2000 .venv/bin/pytest tests/test_attack_*.py
ATTACK_EXAMPLES = int(os.environ.get("SIMOTEL_BRIDGE_ATTACK_EXAMPLES", "25"))


def attack(**overrides: Any) -> Callable[[T], T]:
    """Hypothesis settings for an attack property: the example budget above, no per-example
    deadline (the broker is real and the machine shared), the health checks that only say
    "examples are big or slow" silenced, which is the point here."""
    base: dict[str, Any] = {
        "max_examples": ATTACK_EXAMPLES,
        "deadline": None,
        "suppress_health_check": [
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
        "print_blob": True,
    }
    base.update(overrides)
    return cast(Callable[[T], T], settings(**base))


class EventTap:
    """Every message on `simotel.events` (bound `#`), in arrival order."""

    def __init__(self) -> None:
        self.messages: list[AbstractIncomingMessage] = []
        self._arrived = asyncio.Condition()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        async with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()

    async def wait_for(
        self, match: Callable[[AbstractIncomingMessage], bool], count: int, timeout: float = 15.0
    ) -> list[AbstractIncomingMessage]:
        """Wait until `count` messages held now match; return them (they stay held)."""

        def found() -> list[AbstractIncomingMessage]:
            return [m for m in self.messages if match(m)]

        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(found()) >= count)
            return found()

    async def take_until(
        self, message_id: str, timeout: float = 15.0
    ) -> list[AbstractIncomingMessage]:
        """Wait for the message `message_id`; return (and forget) everything that arrived
        before it, without it."""

        def seen() -> bool:
            return any(m.message_id == message_id for m in self.messages)

        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(seen)
            at = next(i for i, m in enumerate(self.messages) if m.message_id == message_id)
            before, self.messages = self.messages[:at], self.messages[at + 1 :]
        return before


class World:
    """One vhost, one whole ingress (one shared broker connection) and one tap for a test
    module, on an event loop of its own: Hypothesis drives it example by example."""

    def __init__(self, tmp_path: Path, **components: Any) -> None:
        self.vhost = f"attack-{uuid.uuid4().hex[:12]}"
        rabbitmqctl("add_vhost", self.vhost)
        rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        self.amqp_url = f"amqp://guest:guest@{AMQP_HOST}/{self.vhost}"
        self.runner = asyncio.Runner()
        self.tap = EventTap()
        self.settings = full_settings(self.amqp_url, tmp_path, **components)
        self.bridge: FullBridge = self.run(self._start())

    async def _start(self) -> FullBridge:
        self.connection = await aio_pika.connect_robust(self.amqp_url)
        channel = await self.connection.channel()
        queue = await channel.declare_queue("attack-tap", exclusive=True)
        fb = await FullBridge.start(self.settings)  # declares the topology
        await queue.bind("simotel.events", "#")
        await queue.consume(self.tap.on_message, no_ack=True)
        return fb

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        return self.runner.run(coro)

    async def published_before_next(self) -> list[AbstractIncomingMessage]:
        """Everything published to the events exchange since the last call: a normal webhook
        is sent (it must be served), and the events that arrived before it are returned.
        Events of one publisher channel reach a queue in order, so nothing published before it
        can arrive after it."""
        r = await self.bridge.event({**NORMAL_EVENT, "marker": uuid.uuid4().hex})
        assert r.status_code == 200, r.text
        return await self.tap.take_until(r.json()["message_id"])

    async def assert_healthy(self) -> None:
        """The app is alive, the shared connection was never closed, the next request is
        served (and its event published)."""
        r = await self.bridge.client.get("/healthz")
        assert r.status_code == 200
        assert self.bridge.connection_intact(), self.bridge.losses

    def close(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.runner.close()
            rabbitmqctl("delete_vhost", self.vhost)

    async def _stop(self) -> None:
        await self.bridge.aclose()
        await self.connection.close()
