"""Metrics of the history stream, refreshed once a minute by the ingress role.

Over AMQP 0-9-1 a stream tells little about itself (a passive declare reports 0 messages on
RabbitMQ 3.10), so what is cheap is exported: two one-message reads, at the `first` and the
`last` offset, give
  - simotel_bridge_history_oldest_event_age_seconds: now minus the oldest kept event's receive
    time (how much history there really is, against `history.max_age`);
  - simotel_bridge_history_events: offsets from the first message to the start of the last
    chunk, so a lower bound, short by less than one chunk.
The stream's size in bytes is not obtainable without the management plugin or `rabbitmqctl`
(`rabbitmqctl list_queues name messages` or the `rabbitmq_prometheus` plugin's queue metrics);
it is not exported here. docs/history.md gives the disk per event.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import aio_pika.exceptions
import structlog
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from bridge.amqp import Broker
from bridge.client.history import HISTORY_STREAM, event_time, stream_offset
from bridge.metrics import HistoryMetrics

log = structlog.get_logger("bridge.historystats")

__all__ = ["HistoryMetrics", "peek", "refresh", "watch"]

INTERVAL = 60.0


async def peek(
    connection: AbstractConnection, stream: str, offset: str, timeout: float
) -> AbstractIncomingMessage | None:
    """The first message delivered from `offset` (`first`, `last`), or None when none comes
    within `timeout` (an empty stream)."""
    channel = await connection.channel()
    try:
        await channel.set_qos(prefetch_count=1)
        queue = await channel.get_queue(stream, ensure=False)
        got: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

        async def on_message(message: AbstractIncomingMessage) -> None:
            if not got.done():
                got.set_result(message)

        await queue.consume(on_message, arguments={"x-stream-offset": offset})
        try:
            async with asyncio.timeout(timeout):
                return await got
        except TimeoutError:
            return None
    finally:
        with contextlib.suppress(aio_pika.exceptions.AMQPError):
            await channel.close()


async def refresh(
    connection: AbstractConnection,
    metrics: HistoryMetrics,
    stream: str = HISTORY_STREAM,
    timeout: float = 5.0,
) -> None:
    first = await peek(connection, stream, "first", timeout)
    if first is None:
        metrics.events.set(0)
        metrics.oldest_age.set(0)
        return
    last = await peek(connection, stream, "last", timeout)
    start, end = stream_offset(first), stream_offset(last) if last is not None else None
    if start is not None and end is not None:
        metrics.events.set(end - start + 1)
    when = event_time(first)
    if when is not None:
        metrics.oldest_age.set(max(0.0, (datetime.now(UTC) - when).total_seconds()))


async def watch(
    broker: Broker, metrics: HistoryMetrics, stop: asyncio.Event, interval: float = INTERVAL
) -> None:
    """Refresh the metrics every `interval` seconds until `stop`; a failed refresh is logged
    and tried again next time. Never raises (but is cancellable)."""
    await broker.connected_unless(stop)
    while not stop.is_set():
        if broker.ready:
            try:
                await refresh(broker.connection, metrics)
            except Exception as exc:  # the next round tries again
                log.warning("reading the history stream's metrics failed", error=repr(exc))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
