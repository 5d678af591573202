"""Reading the event history: the `simotel.history` stream (docs/history.md).

The bridge binds a RabbitMQ stream to the events exchange, so every event it publishes is also
kept there, with its original properties, for `history.max_age` / `history.max_bytes`. This
module reads a time window of it:

    async for message in history_window(url, since=parse_when("2h")):
        ...  # an aio-pika IncomingMessage: body, message_id, headers as published

It imports only aio-pika, orjson and the standard library, so a consumer service can use it
without the bridge's server dependencies.

How a window is read, exactly and deterministically:
- the consumer attaches with the `x-stream-offset` *timestamp* `since - skew` (the broker starts
  at the chunk holding that time, so a little more is read than the window), and every message is
  filtered on its own receive time (header `received_at`, else the `timestamp` property) and its
  routing key, so exactly the window is yielded, in stream (publish) order;
- the end of the stream is found with an end marker: before attaching, the reader appends a tiny
  message of its own to the stream (type `MARKER_TYPE`, routed by the default exchange, so no
  events consumer sees it). Everything that was in the stream before the reader started comes
  before that marker; reading stops there (or, when following, goes on live after it). Readers
  of the stream skip every marker. The reader's user therefore needs `write` permission on the
  stream as well as `read`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncGenerator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aio_pika.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from bridge.errors import HistoryError as HistoryError  # re-exported: defined in bridge.errors
from bridge.wire import HISTORY_STREAM as HISTORY_STREAM  # re-exported: defined in bridge.wire

# The `type` of the end markers readers append to the stream; never an event.
MARKER_TYPE = "simotel-bridge.history-marker"
# The broker's chunk timestamps come from its clock, receive times from the bridge's: the stream
# is entered this much earlier than `since`, so clocks that differ by less lose nothing.
DEFAULT_SKEW = timedelta(minutes=5)
DEFAULT_PREFETCH = 500

_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_RELATIVE = re.compile(r"^(?:\d{1,7}[wdhms])+$")
_PART = re.compile(r"(\d{1,7})([wdhms])")
_MAX_TEXT = 64


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """A point in time from the command line: `now`; relative to now (`90s`, `10m`, `2h`, `7d`,
    `1w`, or combined, `1h30m`); or absolute ISO 8601 (`2026-12-01`, `2026-12-01T09:30`,
    `2026-12-01T09:30:00+03:30`, `...Z`). An absolute time without a zone is local time.
    Returns an aware UTC datetime; raises ValueError."""
    now = now or datetime.now(UTC)
    value = text.strip()
    if len(value) > _MAX_TEXT or not value:
        raise ValueError("a time must be `now`, relative like 2h or 1h30m, or ISO 8601")
    if value.lower() == "now":
        return now.astimezone(UTC)
    if _RELATIVE.match(value.lower()):
        seconds = sum(int(n) * _UNITS[u] for n, u in _PART.findall(value.lower()))
        return (now - timedelta(seconds=seconds)).astimezone(UTC)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not `now`, a relative time like 2h or 1h30m, or ISO 8601"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return when.astimezone(UTC)


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: `*` is exactly one word, `#` zero or more (`a.#` matches `a`)."""
    words, parts = key.split("."), pattern.split(".")
    # reachable[j]: the first i pattern words can match the first j key words
    reachable = [True] + [False] * len(words)
    for part in parts:
        if part == "#":
            for j in range(1, len(words) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            for j in range(len(words), 0, -1):
                reachable[j] = reachable[j - 1] and (part == "*" or part == words[j - 1])
            reachable[0] = False
    return reachable[len(words)]


def event_time(message: AbstractIncomingMessage) -> datetime | None:
    """When the bridge received the event: its `received_at` header (microseconds), else its
    `timestamp` property (seconds), else None."""
    received = (message.headers or {}).get("received_at")
    if isinstance(received, bytes):
        received = received.decode("ascii", "replace")
    if isinstance(received, str) and len(received) <= _MAX_TEXT:
        try:
            when = datetime.fromisoformat(received)
        except ValueError:
            when = None
        if when is not None:
            return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    stamp = message.timestamp
    if isinstance(stamp, datetime):
        return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)
    return None


def in_window(
    key: str, when: datetime | None, since: datetime, until: datetime | None, pattern: str
) -> bool:
    """The window is `since <= when < until` (no `until`: no upper bound) on routing keys that
    match `pattern`. An event without a time is in no window."""
    if when is None or when < since or (until is not None and when >= until):
        return False
    return topic_matches(pattern, key)


def is_marker(message: AbstractIncomingMessage) -> bool:
    return message.type == MARKER_TYPE


def stream_offset(message: AbstractIncomingMessage) -> int | None:
    """The message's offset in the stream (the broker's `x-stream-offset` header)."""
    offset = (message.headers or {}).get("x-stream-offset")
    return offset if isinstance(offset, int) else None


def _start(since: datetime, skew: timedelta) -> datetime:
    """Where to enter the stream: `skew` before `since`, never later than now minus `skew`
    (a future `since` would otherwise attach after this reader's own end marker). Whole
    seconds: the AMQP timestamp type has no finer unit, and truncating only reads more."""
    start = min(since, datetime.now(UTC)) - skew
    return start.replace(microsecond=0)


class _Reader:
    def __init__(self, channel: AbstractChannel, stream: str, prefetch: int) -> None:
        self.channel = channel
        self.stream = stream
        self.prefetch = prefetch
        self.marker_id = f"history-end-{uuid.uuid4().hex}"
        # Unacked deliveries are bounded by the prefetch, so this never holds more than that.
        self.inbox: asyncio.Queue[AbstractIncomingMessage | BaseException] = asyncio.Queue()
        self.tag: str | None = None
        self.unacked = 0
        self.ack_every = max(1, prefetch // 4)

    async def open(self, start: datetime) -> None:
        try:
            queue = await self.channel.declare_queue(self.stream, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            raise HistoryError(
                f"there is no stream {self.stream!r} (is history enabled in the bridge?)"
            ) from exc
        await self.channel.set_qos(prefetch_count=self.prefetch)
        self.channel.close_callbacks.add(self._on_close)
        marker = aio_pika.Message(
            b"",
            type=MARKER_TYPE,
            message_id=self.marker_id,
            app_id="simotel-bridge history",
            timestamp=datetime.now(UTC),
        )
        await self.channel.default_exchange.publish(marker, routing_key=self.stream)
        self.tag = await queue.consume(self._on_message, arguments={"x-stream-offset": start})

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        await self.inbox.put(message)

    def _on_close(self, _channel: Any, exc: BaseException | None = None) -> None:
        self.inbox.put_nowait(HistoryError(f"the channel to the broker closed: {exc!r}"))

    async def next(self) -> AbstractIncomingMessage:
        item = await self.inbox.get()
        if isinstance(item, BaseException):
            raise item
        # A stream keeps what is acked: the ack only lets the broker send more. One ack for
        # many (multiple=True) while deliveries are waiting, at once when none are.
        self.unacked += 1
        if self.unacked >= self.ack_every or self.inbox.empty():
            await item.ack(multiple=True)
            self.unacked = 0
        return item

    async def close(self) -> None:
        self.channel.close_callbacks.discard(self._on_close)
        if self.tag is not None and not self.channel.is_closed:
            queue = await self.channel.get_queue(self.stream, ensure=False)
            # the channel may go away meanwhile: then there is nothing left to cancel
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await queue.cancel(self.tag)


# Closing what a reader opened must never hang its caller (a generator left early is closed at
# the event loop's shutdown, where a broker that does not answer would stall the whole stop).
_CLOSE_TIMEOUT = 5.0


async def _bounded(closing: Awaitable[Any]) -> None:
    with contextlib.suppress(TimeoutError, aio_pika.exceptions.AMQPError, OSError):
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await closing


async def history_window(
    source: str | AbstractConnection | AbstractChannel,
    since: datetime,
    until: datetime | None = None,
    pattern: str = "#",
    *,
    follow: bool = False,
    stream: str = HISTORY_STREAM,
    prefetch: int = DEFAULT_PREFETCH,
    skew: timedelta = DEFAULT_SKEW,
    caught_up: asyncio.Event | None = None,
) -> AsyncGenerator[AbstractIncomingMessage, None]:
    """The events received in `since <= t < until` whose routing key matches `pattern`, in the
    order they were published, each exactly as the bridge published it (body, `message_id`,
    headers; plus the broker's `x-stream-offset` header).

    Without `follow`, it ends at what the stream held when it was called (no `until`: "up to
    now"). With `follow` (no `until` then), it goes on with new events as they come, and sets
    `caught_up` once the history part is read.

    `source` is an AMQP URL, a connection (a channel of its own is opened and closed) or a
    channel (its prefetch is set to `prefetch`; it stays open). Raises HistoryError."""
    if follow and until is not None:
        raise ValueError("follow reads on without end: it takes no `until`")
    since = since.astimezone(UTC)
    until = until.astimezone(UTC) if until is not None else None
    owned: list[AbstractConnection | AbstractChannel] = []
    try:
        if isinstance(source, str):
            connection = await aio_pika.connect(
                source, client_properties={"connection_name": "simotel-bridge history"}
            )
            owned.append(connection)
            channel = await connection.channel()
        elif isinstance(source, AbstractConnection):
            channel = await source.channel()
            owned.append(channel)
        else:
            channel = source
        reader = _Reader(channel, stream, prefetch)
        await reader.open(_start(since, skew))
        try:
            while True:
                message = await reader.next()
                if is_marker(message):
                    if message.message_id != reader.marker_id:
                        continue  # another reader's
                    if caught_up is not None:
                        caught_up.set()
                    if not follow:
                        return
                    continue
                if in_window(message.routing_key or "", event_time(message), since, until, pattern):
                    yield message
        finally:
            await _bounded(reader.close())
    finally:
        for resource in reversed(owned):
            await _bounded(resource.close())
