"""The command worker (docs/contract.md §3, §4): consumes `simotel.commands`, calls Simotel,
publishes the result, and only then acknowledges the command.

    delivery -> _handle -> _process (validate, de-duplicate, deadline, lane, execute)
             -> Settler.settle (bridge.settle: publish result + reply + dead letter, wait for
                                confirms, ack; or hand back)

This module holds the consumer lifecycle (start, consume again after a reconnect, ordered
shutdown) and what happens before settlement: de-duplication by message_id (one execution per
message_id in this process, at most once across workers through the state store) and lanes.
The result constructors are in `bridge.commands`, settlement and its retries in `bridge.settle`.

Lanes: report searches (Endpoint.lane == "slow") run in their own pool of
`worker.report_prefetch`, everything else in a pool of `worker.prefetch`, so slow searches never
hold up click-to-call or agent commands. The consumer window is `2 * prefetch +
report_prefetch`: room for the fast pool, the slow pool and `prefetch` commands waiting for a
slot.

Run it alone with `simotel-bridge worker -c config.yaml`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Mapping
from datetime import UTC
from typing import Any

import aio_pika.exceptions
import httpx
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    ConsumerTag,
)
from prometheus_client import CollectorRegistry

from bridge.amqp import Broker, Publisher, close_quietly, on_reopen
from bridge.commands import (
    Command,
    Envelope,
    InvalidCommand,
    Result,
    build_request,
    describe_invalid,
    is_expired,
    make_expired,
    make_rejected,
    make_result,
    make_unknown,
    parse_command,
    safe_id,
)
from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.metrics import WorkerMetrics
from bridge.settle import PUBLISH_RETRY_DELAY, PUBLISH_RETRY_FOR, Settler
from bridge.simotel import SimotelClient
from bridge.state import StateStore, open_state_store

__all__ = ["Worker", "WorkerMetrics", "envelope_of", "make_clients", "run_worker"]

log = structlog.get_logger("bridge.worker")

_PURGE_EVERY = 3600.0


def envelope_of(message: AbstractIncomingMessage, received_at: float) -> Envelope:
    ts = message.timestamp
    if ts is not None and ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    expiration = message.expiration
    return Envelope(
        body=message.body,
        routing_key=message.routing_key or "",
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        headers=dict(message.headers or {}),
        expiration=float(expiration) if isinstance(expiration, int | float) else None,
        timestamp=ts.timestamp() if ts is not None else None,
        redelivered=bool(message.redelivered),
        received_at=received_at,
    )


class Worker:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        publisher: Publisher,
        clients: Mapping[str, SimotelClient],
        store: StateStore,
        metrics: WorkerMetrics,
        *,
        publish_retry_for: float = PUBLISH_RETRY_FOR,
        publish_retry_delay: float = PUBLISH_RETRY_DELAY,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.publisher = publisher
        self.clients = clients
        self.store = store
        self.metrics = metrics
        w = settings.worker
        self._lanes = {
            "fast": asyncio.Semaphore(w.prefetch),
            "slow": asyncio.Semaphore(w.report_prefetch),
        }
        self._tasks: set[asyncio.Task[None]] = set()
        self._parked: set[asyncio.Task[Any]] = set()
        self._inflight: dict[str, asyncio.Future[Result | None]] = {}
        self._stopping = False
        self._stopped = asyncio.Event()  # set with _stopping: wakes publish retries up
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: ConsumerTag | None = None
        self._purged_at = 0.0
        self.settler = Settler(
            settings,
            publisher,
            store,
            metrics,
            clients.keys(),
            self._stopped,
            publish_retry_for=publish_retry_for,
            publish_retry_delay=publish_retry_delay,
        )

    @property
    def window(self) -> int:
        w = self.settings.worker
        return 2 * w.prefetch + w.report_prefetch

    async def start(self) -> None:
        await self._purge()
        self._channel = await self._open_channel()
        await self._consume()

    async def _open_channel(self) -> AbstractChannel:
        channel = await self.broker.channel(prefetch=self.window, confirms=False)
        # aio-pika does not restore this consumer (the queue is looked up, not declared, so a
        # quorum queue that is still recovering after a broker crash cannot hold up the whole
        # reconnection): consume again, in the background, whenever the channel reopens.
        on_reopen(
            channel,
            self._consume_again,
            self._parked,
            what="commands",
            stopped=lambda: self._stopping,
            on_failure=self._drop_channel,
        )
        return channel

    async def _consume(self) -> None:
        assert self._channel is not None
        self._queue = await self._channel.get_queue(
            self.settings.amqp.queues.commands, ensure=False
        )
        self._tag = await self._queue.consume(self._on_message)
        log.info("worker consuming", queue=self._queue.name, window=self.window)

    async def _consume_again(self) -> None:
        if self._channel is None:
            self._channel = await self._open_channel()
        await self._consume()

    def _drop_channel(self) -> None:
        """aiormq closes a channel whose consume RPC timed out, while the robust wrapper still
        looks open: the next attempt gets a channel of its own."""
        old, self._channel = self._channel, None
        if old is not None:
            closing = asyncio.create_task(close_quietly(old))
            self._parked.add(closing)
            closing.add_done_callback(self._parked.discard)

    async def shutdown(self) -> None:
        """Stop consuming, hand back what has not started, let the rest finish within
        `shutdown_grace`, cancel what is left (handed back), close the channel."""
        self._stopping = True
        self._stopped.set()
        if self._queue is not None and self._tag is not None:
            try:
                async with asyncio.timeout(5):
                    await self._queue.cancel(self._tag)
            except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
                log.warning("cannot cancel the consumer", error=repr(exc))
        for task in list(self._parked):
            task.cancel()
        if self._tasks:
            grace = self.settings.worker.shutdown_grace
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            if pending:
                log.warning("shutdown grace over, handing back commands", count=len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5)
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()  # anything still unacked goes back to the queue
        log.info("worker stopped")

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        structlog.contextvars.clear_contextvars()
        env = envelope_of(message, time.time())
        structlog.contextvars.bind_contextvars(message_id=env.message_id)
        try:
            result = await self._process(env)
        except asyncio.CancelledError:
            log.info("command handed back", why="shutdown")
            await self._settle(message, env, None)
            raise
        except Exception:
            log.exception("command handling failed, handing back")
            result = None
        await self._settle(message, env, result)

    async def _process(self, env: Envelope) -> Result | None:
        fallback = uuid.uuid4().hex
        sources = self.clients.keys()
        try:
            cmd = parse_command(env, sources, fallback_id=fallback)
        except InvalidCommand as exc:
            action, source = describe_invalid(env, sources)
            return Result(
                command_id=safe_id(env.message_id) if env.message_id else fallback,
                action=action,
                source=source,
                status="rejected",
                error=exc.detail,
                reason=exc.reason,
            )
        structlog.contextvars.bind_contextvars(source=cmd.source, action=cmd.action)
        mid = cmd.message_id
        if mid is None:
            return await self._execute(cmd)
        first = self._inflight.get(mid)
        if first is not None:  # the same message_id is being executed here right now
            self.metrics.duplicates.inc()
            return await asyncio.shield(first)
        future: asyncio.Future[Result | None] = asyncio.get_running_loop().create_future()
        self._inflight[mid] = future
        result: Result | None = None
        try:
            result = await self._once(cmd, mid)
        finally:
            del self._inflight[mid]
            future.set_result(result)
        return result

    async def _once(self, cmd: Command, mid: str) -> Result | None:
        """At most once per message_id: the stored result, `unknown`, or a fresh execution."""
        record = await self.store.get(mid)
        if record is not None:
            if (record.source, record.action) != (cmd.source, cmd.action):
                return make_rejected(cmd, "message_id_reused", "message_id used by another command")
            if record.state == "done" and record.result is not None:
                self.metrics.duplicates.inc()
                log.info("duplicate message_id: answering with the first result")
                return Result.from_json(record.result)
            if not cmd.retry_safe:
                unknown = make_unknown(cmd)
                await self.store.finish(mid, cmd.source, cmd.action, unknown.to_json())
                return unknown
        result = await self._execute(cmd)
        if result is not None and not cmd.endpoint.is_download:
            await self.store.finish(
                mid, cmd.source, cmd.action, result.to_json(), durable=not cmd.retry_safe
            )
        return result

    async def _execute(self, cmd: Command) -> Result | None:
        """Run the command in its lane; None when it must be handed back (shutdown)."""
        started = time.perf_counter()
        if is_expired(cmd.deadline, time.time()):
            return make_expired(cmd)
        lane = self._lanes[cmd.endpoint.lane]
        task = asyncio.current_task()
        assert task is not None
        self._parked.add(task)
        try:
            await lane.acquire()
        finally:
            self._parked.discard(task)
        try:
            if self._stopping:
                return None
            if not cmd.retry_safe:
                assert cmd.message_id is not None  # parse_command requires it
                if not await self.store.start(cmd.message_id, cmd.source, cmd.action):
                    return make_unknown(cmd)  # another worker claimed it meanwhile
            gauge = self.metrics.in_flight.labels(lane=cmd.endpoint.lane)
            gauge.inc()
            try:
                client = self.clients[cmd.source]
                execution = await client.execute(
                    cmd.endpoint, build_request(cmd), deadline=cmd.deadline
                )
            finally:
                gauge.dec()
        finally:
            lane.release()
        duration_ms = round((time.perf_counter() - started) * 1000)
        return make_result(cmd, execution.outcome, execution.attempts, duration_ms)

    async def _settle(
        self, message: AbstractIncomingMessage, env: Envelope, result: Result | None
    ) -> None:
        await self.settler.settle(message, env, result)
        await self._purge()

    async def _purge(self) -> None:
        now = time.time()
        if now - self._purged_at >= _PURGE_EVERY:
            self._purged_at = now
            try:
                removed = await self.store.purge(now)
            except Exception:
                log.exception("cannot purge the state store")
                return
            if removed:
                log.info("state store purged", removed=removed)


def make_clients(
    settings: Settings,
    metrics: WorkerMetrics,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, SimotelClient]:
    """One client per source with API settings, sized for both lanes."""
    size = settings.worker.prefetch + settings.worker.report_prefetch
    clients: dict[str, SimotelClient] = {}
    for name, source in settings.sources.items():
        if source.api is None:
            continue

        def observe(kind: str, seconds: float, name: str = name) -> None:
            metrics.simotel_latency.labels(source=name, kind=kind).observe(seconds)

        clients[name] = SimotelClient(
            name, source.api, max_connections=size, transport=transport, observe=observe
        )
    return clients


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    broker: Broker | None = None,
    metrics: WorkerMetrics | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """Run the worker until `stop` is set, then shut down gracefully. A given `broker` (shared
    with the other roles of `run`) is used and left open; otherwise one is made and closed."""
    if not any(s.api is not None for s in settings.sources.values()):
        raise ConfigError([("sources", "no source has api settings: the worker cannot call one")])
    own_broker = broker is None
    if broker is None:
        broker = Broker(settings.amqp, name="simotel-bridge worker")
        await broker.connect()
    metrics = metrics or WorkerMetrics(CollectorRegistry())
    publisher = Publisher(broker)
    clients = make_clients(settings, metrics, transport)
    metrics.show_sources(clients)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    store = await open_state_store(settings.worker, owner=owner)
    worker = Worker(settings, broker, publisher, clients, store, metrics)
    try:
        await publisher.start()
        await worker.start()
        await stop.wait()
    finally:
        await worker.shutdown()
        for client in clients.values():
            await client.aclose()
        await store.aclose()
        await publisher.close()
        if own_broker:
            await broker.close()
