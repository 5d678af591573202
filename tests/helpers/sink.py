"""Helpers for the sink tests: events of numbered calls, the sink with its broker connection,
reading a queue back, and the delivery check (nothing missing, duplicates identical, each
call's events in the order they were sent)."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import structlog
from prometheus_client import CollectorRegistry

from bridge import topology
from bridge.amqp import Broker, Publisher
from bridge.config import AmqpSettings, Settings
from bridge.sink import EventSink, SpoolFull, SpoolMetrics
from bridge.translate import OutgoingEvent

AUDIT_QUEUE = "audit"


def make_event(call: str, n: int, *, source: str = "simotel") -> OutgoingEvent:
    body = orjson.dumps({"event_name": "NewState", "unique_id": call, "n": n})
    return OutgoingEvent(
        exchange="simotel.events",
        routing_key=f"{source}.NewState",
        body=body,
        message_id=f"{call}/{n}",
        event="NewState",
        source=source,
        call_id=call,
        timestamp=1_700_000_000.0 + n,
        headers={"source": source, "event": "NewState", "call_id": call},
    )


@dataclass
class Stack:
    broker: Broker
    publisher: Publisher
    sink: EventSink
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def close(self, drain_timeout: float = 0.0) -> None:
        await self.sink.close(drain_timeout)
        await self.publisher.close()
        await self.broker.close()


async def open_stack(
    settings: Settings,
    *,
    connect: bool = True,
    registry: CollectorRegistry | None = None,
    **sink_args: Any,
) -> Stack:
    """Broker connection (unless `connect` is False: a broker that never came up), publisher
    and a started sink on `settings.spool`."""
    broker = Broker(settings.amqp, name="sink-test")
    publisher = Publisher(broker)
    if connect:
        await broker.connect()
        await publisher.start()
    registry = registry or CollectorRegistry()
    sink_args.setdefault("backoff", (0.05, 0.5))
    sink = await EventSink.open(settings, publisher, SpoolMetrics(registry), **sink_args)
    return Stack(broker, publisher, sink, registry)


async def declare_audit(url: str, queue: str = AUDIT_QUEUE) -> None:
    """A durable queue taking every event (it survives broker restarts, like a consumer's)."""
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        await topology.declare(ch, AmqpSettings())
        q = await ch.declare_queue(queue, durable=True)
        await q.bind("simotel.events", routing_key="#")
    finally:
        await conn.close()


async def read_queue(url: str, queue: str = AUDIT_QUEUE, timeout: float = 30.0) -> list[Any]:
    """Every message now in `queue`, acknowledged; bounded by `timeout`."""
    conn = await aio_pika.connect(url)
    out = []
    try:
        async with asyncio.timeout(timeout):
            ch = await conn.channel()
            q = await ch.get_queue(queue, ensure=False)
            while (msg := await q.get(fail=False, no_ack=True)) is not None:
                out.append(msg)
    finally:
        await conn.close()
    return out


@dataclass
class Delivery:
    missing: set[str] = field(default_factory=set)
    duplicates: int = 0
    bad_duplicates: set[str] = field(default_factory=set)
    # call -> (first position that differs, ids expected from there, ids arrived from there)
    out_of_order: dict[str, tuple[int, list[str], list[str]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.bad_duplicates or self.out_of_order)


def check_delivery(sent: dict[str, list[str]], messages: list[Any]) -> Delivery:
    """`sent`: call -> message ids in the order they were answered 2xx. `messages`: what the
    queue holds. Missing ids, duplicates (must carry the same body), per-call first-arrival
    order."""
    result = Delivery()
    bodies: dict[str, bytes] = {}
    counts: Counter[str] = Counter()
    first_order: dict[str, list[str]] = {}
    for m in messages:
        mid = m.message_id
        counts[mid] += 1
        if mid in bodies:
            if bodies[mid] != m.body:
                result.bad_duplicates.add(mid)
            continue
        bodies[mid] = m.body
        call = m.headers.get("call_id")
        first_order.setdefault(str(call), []).append(mid)
    result.duplicates = sum(c - 1 for c in counts.values())
    for call, ids in sent.items():
        result.missing |= set(ids) - bodies.keys()
        arrived = [i for i in first_order.get(call, []) if i in set(ids)]
        expected = [i for i in ids if i in bodies]
        if arrived != expected:
            at = next(i for i, (a, b) in enumerate(zip(arrived, expected, strict=True)) if a != b)
            result.out_of_order[call] = (at, expected[at : at + 5], arrived[at : at + 5])
    return result


# Sends event n of a call; returns (outcome, message_id if it was answered 2xx).
Send = Callable[[str, int], Awaitable[tuple[str, str | None]]]


def sink_sender(sink: EventSink) -> Send:
    async def send(call: str, n: int) -> tuple[str, str | None]:
        event = make_event(call, n)
        try:
            return await sink.accept(event), event.message_id
        except SpoolFull:
            return "refused", None

    return send


@dataclass
class Traffic:
    """Webhooks at a steady rate: each call sends its events one after another (the next once
    the previous was answered), the calls run side by side."""

    send: Send
    calls: int
    rate_per_call: float
    sent: dict[str, list[str]] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _call(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        ids = self.sent.setdefault(name, [])
        interval = 1.0 / self.rate_per_call
        due = loop.time()
        n = 0
        while not self._stop.is_set():
            started = loop.time()
            outcome, message_id = await self.send(name, n)
            self.latencies.append(loop.time() - started)
            if message_id is not None:
                ids.append(message_id)
            n += 1
            async with self._changed:
                self.outcomes[outcome] += 1
                self._changed.notify_all()
            due += interval
            await asyncio.sleep(max(0.0, due - loop.time()))  # pacing, not waiting

    async def wait_for(self, outcome: str, count: int, timeout: float) -> None:
        """Wait until `count` more events have had `outcome`; fail after `timeout`."""
        target = self.outcomes[outcome] + count
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.outcomes[outcome] >= target)

    async def __aenter__(self) -> Traffic:
        self._tasks = [
            asyncio.create_task(self._call(f"call{i}"), name=f"call{i}") for i in range(self.calls)
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=10)
        for t in pending:
            t.cancel()
        for t in done:
            t.result()  # a failure of the traffic itself fails the test
        assert not pending, "traffic did not stop within 10 s"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


async def child_main(url: str, workdir: str) -> None:
    """A bridge process for the SIGKILL test: connects, says `ready`, waits for a line on
    stdin, then accepts events forever, printing each message id once accept() returned."""
    from tests.helpers.env import make_settings

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: ids
    settings = make_settings(url, Path(workdir), amqp={"url": url, "publish_timeout": 1.0})
    stack = await open_stack(settings)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    n = 0
    while True:
        for c in range(5):
            event = make_event(f"k{c}", n)
            outcome = await stack.sink.accept(event)
            print(event.message_id, outcome, flush=True)
        n += 1
