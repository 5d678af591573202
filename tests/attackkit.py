"""The whole ingress as `simotel-bridge ingress` builds it (one broker connection shared by the
event sink with its spool and the component RPC), driven in-process over ASGI, plus a watch on
that shared connection: a broker that closes it (a frame it refuses) shows up as a loss."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from bridge.amqp import Broker, Publisher
from bridge.components import ComponentMetrics, ComponentRpc
from bridge.config import Settings
from bridge.ingress import create_app
from bridge.metrics import Metrics
from bridge.sink import EventSink, SpoolMetrics
from tests.conftest import make_settings

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
