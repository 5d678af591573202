"""`simotel-bridge replay`: re-publish a time window of the history stream to an exchange or a
queue that a consumer names (docs/history.md).

Each message goes out as it was first published (body, `message_id`, `type`, `timestamp`,
headers, original routing key when sent to an exchange) plus the header `replayed: true`, so a
consumer can tell and de-duplicate on `message_id`. Publishes are persistent, mandatory and
confirmed, a window of them in flight at once: a message counts as replayed once the broker has
confirmed it. Interrupted (`stop`), the replay stops taking new messages, waits for the confirms
of those in flight and reports how far it got: at-least-once, never a half-published state.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import aio_pika
import aio_pika.exceptions
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from bridge.amqp import connect_first
from bridge.client.history import DEFAULT_SKEW, HISTORY_STREAM, event_time, history_window
from bridge.errors import ReplayError as ReplayError  # re-exported: defined in bridge.errors

IN_FLIGHT = 256  # publishes awaiting their confirm at once
REPLAYED_HEADER = "replayed"
_BROKER_HEADERS = ("x-stream-offset",)


@dataclass(frozen=True)
class Target:
    """Where replayed messages go: an exchange (with their original routing keys) or a queue
    (through the default exchange)."""

    exchange: str | None = None
    queue: str | None = None

    def __post_init__(self) -> None:
        if (self.exchange is None) == (self.queue is None):
            raise ValueError("a replay goes to one exchange or one queue")

    def describe(self) -> str:
        return f"exchange {self.exchange}" if self.exchange is not None else f"queue {self.queue}"

    def routing_key(self, message: AbstractIncomingMessage) -> str:
        return self.queue if self.queue is not None else (message.routing_key or "")


def replayed(message: AbstractIncomingMessage) -> aio_pika.Message:
    """The message to publish again: the original properties and headers, the broker's own
    headers removed, `replayed: true` added. (`user_id` is left out: the broker checks it
    against the user publishing now.)"""
    headers: dict[str, Any] = {
        k: v for k, v in (message.headers or {}).items() if k not in _BROKER_HEADERS
    }
    headers[REPLAYED_HEADER] = True
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=message.delivery_mode or aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )


def dry_run_line(message: AbstractIncomingMessage, target: Target) -> str:
    when = event_time(message)
    return orjson.dumps(
        {
            "to": target.describe(),
            "routing_key": target.routing_key(message),
            "original_routing_key": message.routing_key,
            "message_id": message.message_id,
            "type": message.type,
            "received_at": when.isoformat() if when else None,
            "bytes": len(message.body),
        }
    ).decode()


@dataclass
class Summary:
    target: Target
    dry_run: bool = False
    matched: int = 0
    published: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    # Receive time of the last message confirmed, for resuming an interrupted replay.
    last_received: datetime | None = None

    def line(self) -> str:
        verb = "would be published" if self.dry_run else "published"
        done = self.matched if self.dry_run else self.published
        text = f"{self.matched} matched, {done} {verb} to {self.target.describe()}"
        text += f" in {self.seconds:.1f}s"
        if self.interrupted:
            text = "replay interrupted: " + text
            if self.last_received is not None and not self.dry_run:
                text += f"; to go on, replay again with --since {self.last_received.isoformat()}"
                text += " (consumers de-duplicate the overlap on message_id)"
        else:
            text = "replay done: " + text
        return text


class Progress:
    """One line on a terminal, redrawn at most ten times a second: a bar over the window's
    time span, with counts and rate. Silent when not given a terminal."""

    WIDTH = 24

    def __init__(self, out: TextIO | None, since: datetime, until: datetime) -> None:
        self.out = out if out is not None and out.isatty() else None
        self.since, self.until = since, until
        self.started = time.monotonic()
        self._drawn = 0.0
        self._when: datetime | None = None

    def update(self, summary: Summary, when: datetime | None, final: bool = False) -> None:
        """Redraw (throttled); `final` draws the last state and ends the line."""
        if self.out is None:
            return
        self._when = when or self._when
        now = time.monotonic()
        if not final and now - self._drawn < 0.1:
            return
        self._drawn = now
        span = (self.until - self.since).total_seconds() or 1.0
        at = self._when
        done = (at - self.since).total_seconds() / span if at is not None else 0.0
        if final and not summary.interrupted:
            done = 1.0
        done = min(max(done, 0.0), 1.0)
        filled = int(done * self.WIDTH)
        rate = summary.published / max(now - self.started, 1e-3)
        self.out.write(
            f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done:4.0%}  "
            f"matched {summary.matched:,}  published {summary.published:,}  {rate:,.0f}/s "
        )
        if final:
            self.out.write("\n")
        self.out.flush()


async def _check_target(channel: AbstractChannel, target: Target, events: str) -> None:
    if target.exchange == events:
        raise ReplayError(
            f"replaying into {events} would send the window to every consumer again and add it "
            "to the history a second time; name an exchange or queue of the consumer"
        )
    try:
        if target.exchange is not None:
            await channel.get_exchange(target.exchange, ensure=True)
        else:
            await channel.declare_queue(target.queue or "", passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity as exc:
        raise ReplayError(f"there is no {target.describe()} on the broker") from exc


async def replay(
    url: str | Sequence[str],
    since: datetime,
    until: datetime | None,
    pattern: str,
    target: Target,
    *,
    rate: float | None = None,
    dry_run: bool = False,
    stop: asyncio.Event | None = None,
    out: TextIO = sys.stdout,
    progress: TextIO | None = None,
    events_exchange: str = "simotel.events",
    stream: str = HISTORY_STREAM,
    publish_timeout: float = 30.0,
) -> Summary:
    """Replay the window; see the module docstring. Raises ReplayError or HistoryError."""
    summary = Summary(target, dry_run=dry_run)
    started = time.monotonic()
    end = until or datetime.now(UTC)
    bar = Progress(progress, since, end)
    connection = await connect_first(
        [url] if isinstance(url, str) else url,
        client_properties={"connection_name": "simotel-bridge replay"},
    )
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await _check_target(channel, target, events_exchange)
        exchange: AbstractExchange = (
            await channel.get_exchange(target.exchange, ensure=False)
            if target.exchange is not None
            else channel.default_exchange
        )
        pending: dict[asyncio.Task[Any], datetime | None] = {}
        failure: BaseException | None = None
        interval = 1.0 / rate if rate else 0.0
        next_at = asyncio.get_running_loop().time()

        async def settle(block: bool) -> None:
            """Count confirmed publishes; with `block`, wait for at least one (or all when
            nothing new will be sent)."""
            nonlocal failure
            if not pending:
                return
            done, _ = await asyncio.wait(
                pending,
                timeout=None if block else 0,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in done:
                when = pending.pop(task)
                if task.exception() is not None:
                    failure = failure or task.exception()
                    continue
                summary.published += 1
                if when is not None and (
                    summary.last_received is None or when > summary.last_received
                ):
                    summary.last_received = when

        async def publish(message: AbstractIncomingMessage) -> None:
            confirmed: Awaitable[Any] = exchange.publish(
                replayed(message), target.routing_key(message), mandatory=True
            )
            async with asyncio.timeout(publish_timeout):
                await confirmed

        try:
            async for message in history_window(
                connection, since, until, pattern, stream=stream, skew=DEFAULT_SKEW
            ):
                if stop is not None and stop.is_set():
                    summary.interrupted = True
                    break
                summary.matched += 1
                when = event_time(message)
                if dry_run:
                    out.write(dry_run_line(message, target) + "\n")
                else:
                    if interval:
                        loop_now = asyncio.get_running_loop().time()
                        next_at = max(next_at + interval, loop_now)
                        if next_at > loop_now:
                            await asyncio.sleep(next_at - loop_now)  # throttling, by design
                    task = asyncio.ensure_future(publish(message))
                    pending[task] = when
                    await settle(block=len(pending) >= IN_FLIGHT)
                    if failure is not None:
                        break
                bar.update(summary, when)
                if stop is not None and stop.is_set():
                    summary.interrupted = True
                    break
        finally:
            while pending:  # what is in flight is confirmed (or failed) before we report
                await settle(block=True)
        summary.seconds = time.monotonic() - started
        bar.update(summary, None, final=True)
        if failure is not None:
            reason = (
                "nothing is bound to take it (unroutable)"
                if isinstance(failure, aio_pika.exceptions.DeliveryError)
                else repr(failure)
            )
            raise ReplayError(
                f"a publish to {target.describe()} failed: {reason}; {summary.line()}"
            ) from failure
    return summary
