"""Reconciliation against the real broker and the simulator over real HTTP: every call in the
simulator's CDR table reaches the exchange as exactly one Cdr event, whether its webhook arrived
or not."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import aio_pika
import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from bridge import httpserver
from bridge.amqp import Broker, Publisher
from bridge.config import Settings
from bridge.ingress import create_app
from bridge.metrics import Metrics, ReconcileMetrics
from bridge.reconcile import Reconciler, SimotelCursors, run_once
from bridge.simulator import RunningSimulator, SimulatorOptions, simulator
from bridge.sink import EventSink, SpoolMetrics
from bridge.state import open_state_store
from tests.helpers.broker_node import free_port
from tests.helpers.env import make_settings
from tests.helpers.taps import Tap, tap

pytestmark = [pytest.mark.broker]

ANSWERS = {"SmartApi": {"ok": "1", "commands": "Exit('queue')"}}


def reconcile_settings(amqp_url: str, tmp_path: Path, api_url: str, **reconcile: Any) -> Settings:
    conf = {
        "enabled": True,
        "interval_s": 0.5,
        "grace_s": 0,
        "from": "beginning",
        **reconcile,
    }
    return make_settings(
        amqp_url,
        tmp_path,
        sources={
            "simotel": {
                "webhook": {"username": "simotel", "password": "secret"},
                "api": {
                    "base_url": api_url,
                    "username": "apiuser",
                    "password": "change-me",
                    "api_key": "change-me",
                    "retry_base_delay": 0.01,
                },
                "reconcile": conf,
            }
        },
    )


@dataclass
class IngressServer:
    """The bridge's ingress over real HTTP on a fixed port, so it can stop and come back."""

    settings: Settings
    port: int
    broker: Broker | None = None
    _stack: contextlib.AsyncExitStack | None = None

    async def start(self) -> None:
        stack = contextlib.AsyncExitStack()
        # Like the ingress in `run`: the Broker declares the seen queues with the topology.
        broker = Broker(self.settings.amqp, sources=self.settings.sources)
        await broker.connect()
        stack.push_async_callback(broker.close)
        publisher = Publisher(broker)
        await publisher.start()
        stack.push_async_callback(publisher.close)
        metrics = Metrics()
        sink = await EventSink.open(self.settings, publisher, SpoolMetrics(metrics.registry))
        stack.push_async_callback(sink.close, 5.0)
        app = create_app(self.settings, sink=sink, metrics=metrics, broker_ready=lambda: True)
        await stack.enter_async_context(httpserver.serve(app, "127.0.0.1", self.port))
        self._stack = stack

    async def stop(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None


@contextlib.asynccontextmanager
async def bridge_and_simulator(
    amqp_url: str, tmp_path: Path, **sim: Any
) -> AsyncIterator[tuple[IngressServer, RunningSimulator, Settings]]:
    port = free_port()
    options = SimulatorOptions(
        port=0,
        event_url=f"http://127.0.0.1:{port}/webhooks/simotel/events",
        webhook_username="simotel",
        webhook_password="secret",
        time_scale=0,
        seed=3,
        **sim,
    )
    async with simulator(options) as running:
        settings = reconcile_settings(amqp_url, tmp_path, running.api_url)
        ingress = IngressServer(settings, port)
        await ingress.start()
        try:
            yield ingress, running, settings
        finally:
            await ingress.stop()


async def place(sim: RunningSimulator, n: int) -> list[str]:
    """Calls one after another (each one's webhooks answered, or failed, before the next)."""
    names = ("inbound", "internal", "outbound")
    return [await sim.calls.call(names[i % 3]) for i in range(n)]


def cdrs_by_call(t: Tap) -> dict[str, list[aio_pika.abc.AbstractIncomingMessage]]:
    out: dict[str, list[aio_pika.abc.AbstractIncomingMessage]] = collections.defaultdict(list)
    for m in t.messages:
        if m.routing_key == "simotel.Cdr":
            out[orjson.loads(m.body)["unique_id"]].append(m)
    return out


def table_calls(sim: RunningSimulator) -> set[str]:
    return {str(r["cuid"]) for r in sim.state.table("cdr") if r.get("cuid")}


async def test_calls_made_while_the_bridge_was_stopped_are_recovered(
    amqp_url: str, amqp: aio_pika.abc.AbstractRobustConnection, tmp_path: Path
) -> None:
    async with (
        bridge_and_simulator(amqp_url, tmp_path) as (ingress, sim, settings),
        tap(amqp, "simotel.events", "simotel.Cdr", "simotel.CdrQueue") as t,
    ):
        before = await place(sim, 6)
        await ingress.stop()  # the bridge is down: these webhooks fail, Simotel never retries
        during = await place(sim, 10)
        await ingress.start()
        after = await place(sim, 6)
        calls = table_calls(sim)
        assert set(before + during + after) >= calls and len(calls) >= 18
        webhooks = {c for c, ms in cdrs_by_call(t).items() if ms}
        assert not webhooks & set(during) and webhooks
        queue_calls = {str(r["cuid"]) for r in sim.state.table("queue_stat")}
        queue_hooks = {
            orjson.loads(m.body)["unique_id"]
            for m in t.messages
            if m.routing_key == "simotel.CdrQueue"
        }
        stats = await run_once(settings, ["simotel"])
        lost = len(calls - webhooks) + len(queue_calls - queue_hooks)
        assert stats["simotel"].published == lost
        got = await t.wait_for(len(calls) + len(queue_calls), timeout=30)
        # Nothing twice: no message beyond one per call and event.
        assert len(got) == len(calls) + len(queue_calls)
        by_call = cdrs_by_call(t)
        assert set(by_call) == calls
        assert all(len(ms) == 1 for ms in by_call.values()), by_call
        for c in calls - webhooks:
            (m,) = by_call[c]
            assert m.headers["origin"] == "reconciled"
            assert str(m.message_id).startswith("reconciled.cdr.")
            body = orjson.loads(m.body)
            assert body["unique_id"] == c and body["simotel_record"]["cuid"] == c
        for c in webhooks:
            assert "origin" not in (by_call[c][0].headers or {})
        # A second pass finds nothing new.
        assert (await run_once(settings, ["simotel"]))["simotel"].published == 0


async def test_with_a_tenth_of_webhooks_dropped_every_call_is_on_the_exchange_once(
    amqp_url: str, amqp: aio_pika.abc.AbstractRobustConnection, tmp_path: Path
) -> None:
    async with (
        bridge_and_simulator(amqp_url, tmp_path, drop_webhooks=0.1) as (_, sim, settings),
        tap(amqp, "simotel.events", "simotel.Cdr", "simotel.CdrQueue") as t,
    ):
        await place(sim, 40)
        assert sim.calls.dropped > 0
        await run_once(settings, ["simotel"])
        calls = table_calls(sim)
        queue_calls = {str(r["cuid"]) for r in sim.state.table("queue_stat")}
        await t.wait_for(len(calls) + len(queue_calls), timeout=30)
        by_call = cdrs_by_call(t)
        assert set(by_call) == calls and all(len(ms) == 1 for ms in by_call.values())
        queue_events = collections.Counter(
            orjson.loads(m.body)["unique_id"]
            for m in t.messages
            if m.routing_key == "simotel.CdrQueue"
        )
        assert set(queue_events) == queue_calls and set(queue_events.values()) == {1}
        ids = [m.message_id for m in t.messages]
        assert len(ids) == len(set(ids))


async def test_a_webhook_arriving_late_inside_the_grace_is_not_published_twice(
    amqp_url: str, amqp: aio_pika.abc.AbstractRobustConnection, tmp_path: Path
) -> None:
    options = SimulatorOptions(port=0, event_url=None, time_scale=0, seed=4)
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(simulator(options))
        settings = reconcile_settings(amqp_url, tmp_path, sim.api_url, grace_s=120)
        broker = Broker(settings.amqp)
        await broker.connect()
        stack.push_async_callback(broker.close)
        t = await stack.enter_async_context(tap(amqp, "simotel.events", "simotel.Cdr"))
        publisher = Publisher(broker)
        store = await open_state_store(settings.worker, owner="test")
        stack.push_async_callback(store.aclose)
        api = SimotelCursors("simotel", settings.sources["simotel"].api)  # type: ignore[arg-type]
        clock = {"now": time.time()}
        reconciler = Reconciler(
            "simotel",
            settings,
            store,
            api,
            publisher,
            ReconcileMetrics(CollectorRegistry()),
            clock=lambda: clock["now"],
        )
        try:
            assert await reconciler.acquire()
            # Two calls end; their webhooks are still on the way.
            late, lost = await sim.calls.call("internal"), await sim.calls.call("internal")
            first = await reconciler.run_pass()
            assert first.published == 0  # both younger than the grace: left for their webhook
            # One webhook arrives late (the ingress publishes it), the other never does.
            message = aio_pika.Message(
                orjson.dumps({"event_name": "Cdr", "unique_id": late}),
                headers={"source": "simotel", "event": "Cdr", "call_id": late},
                message_id="webhook-1",
            )
            channel = await amqp.channel(publisher_confirms=True)
            await (await channel.get_exchange("simotel.events")).publish(message, "simotel.Cdr")
            clock["now"] += 300  # the grace has passed
            second = await reconciler.run_pass()
            assert second.published == 1 and second.seen >= 1
            await t.wait_for(2, timeout=10)
            by_call = cdrs_by_call(t)
            assert [m.message_id for m in by_call[late]] == ["webhook-1"]
            assert [m.headers["origin"] for m in by_call[lost]] == ["reconciled"]
        finally:
            await reconciler.close()
            await api.aclose()
            await publisher.close()


@pytest.mark.parametrize("roles", [{"ingress", "worker"}, {"reconcile"}], ids=["run", "reconcile"])
async def test_readyz_does_not_depend_on_simotel(
    amqp_url: str, tmp_path: Path, roles: set[str]
) -> None:
    """Reconciliation against an unreachable Simotel counts errors; the process stays ready
    (in `run` and in the `reconcile` role)."""
    from bridge.runtime import serve

    port = free_port()
    settings = reconcile_settings(amqp_url, tmp_path, f"http://127.0.0.1:{free_port()}/api/v4/")
    settings = settings.model_copy(update={"http": settings.http.model_copy(update={"port": port})})
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, frozenset(roles), stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(60):
                while True:
                    assert not task.done(), task
                    with contextlib.suppress(httpx.TransportError):
                        text = (await client.get("/metrics")).text
                        # The counter is there from the start, at 0: wait for a count.
                        api_errors = re.search(
                            r'^simotel_bridge_reconcile_errors_total\{kind="api",source="simotel"\}'
                            r" ([0-9.e+]+)$",
                            text,
                            re.M,
                        )
                        if api_errors and float(api_errors.group(1)) >= 1:
                            break
                    await asyncio.sleep(0.1)  # polling a server in this process
            assert (await client.get("/readyz")).status_code == 200
            assert 'simotel_bridge_reconcile_active{source="simotel"} 1.0' in text
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_tail_marks_recovered_events() -> None:
    from bridge.tail import render_text

    class _Msg:  # render_text reads only these attributes
        timestamp = None
        content_type = "application/json"
        routing_key = "simotel.Cdr"
        headers: ClassVar[dict[str, str]] = {"origin": "reconciled"}
        body = orjson.dumps({"event_name": "Cdr", "unique_id": "1.2", "simotel_record": {}})

    line = render_text("simotel.events", _Msg(), colour=False)  # type: ignore[arg-type]
    assert "origin=reconciled" in line and "unique_id=1.2" in line
    assert "simotel_record" not in line
    _Msg.headers = {}
    assert "origin" not in render_text("simotel.events", _Msg(), colour=False)  # type: ignore[arg-type]


async def test_one_lock_holder_per_source_and_take_over_when_it_goes(
    amqp_url: str, tmp_path: Path
) -> None:
    settings = reconcile_settings(amqp_url, tmp_path, "http://127.0.0.1:9/api/v4/")
    broker = Broker(settings.amqp)
    await broker.connect()
    publisher = Publisher(broker)
    store = await open_state_store(settings.worker, owner="test")
    api = SimotelCursors("simotel", settings.sources["simotel"].api)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    metrics = ReconcileMetrics(registry)
    first, second = (
        Reconciler("simotel", settings, store, api, publisher, metrics) for _ in range(2)
    )
    try:
        assert await first.acquire()
        assert not await second.acquire()
        assert await first.acquire()  # held: still held
        # The holder's connection goes (a crash, a partition): the lock goes with it.
        assert first.lock.connection is not None
        await first.lock.connection.close()
        assert not first.lock.held
        assert await second.acquire()
        assert not await first.acquire()
    finally:
        await first.close()
        await second.close()
        await api.aclose()
        await store.aclose()
        await broker.close()
