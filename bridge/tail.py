"""`simotel-bridge tail [PATTERN]`: follow what flows on `simotel.events` and `simotel.results`.

Tail binds a queue of its own (server-named, exclusive, auto-delete, length-bounded) to both
exchanges with the routing-key pattern, so it takes nothing from other consumers and leaves
nothing behind. On a terminal it prints one readable, coloured line per message; piped, one
JSON object per line (`exchange`, `routing_key`, properties, `headers`, `body`).
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from bridge import topology
from bridge.amqp import connect_first
from bridge.config import Settings

_MAX_BACKLOG = 10_000  # a slow terminal drops the oldest messages instead of filling the broker
_WINDOW = 256  # messages handed to this process before it has printed them
_RESET, _DIM, _BOLD = "\x1b[0m", "\x1b[2m", "\x1b[1m"
_COLOURS = {"event": "\x1b[36m", "ok": "\x1b[32m", "failed": "\x1b[33m", "bad": "\x1b[31m"}


def _plain(value: Any) -> Any:
    """Header and property values as JSON-friendly values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _body(message: AbstractIncomingMessage) -> tuple[Any, bool]:
    """(the decoded JSON body, True) or (a description of a non-JSON body, False)."""
    if (message.content_type or "application/json").startswith("application/json"):
        try:
            return orjson.loads(message.body), True
        except orjson.JSONDecodeError:
            pass
    return {"content_type": message.content_type, "size": len(message.body)}, False


def render_json(exchange: str, message: AbstractIncomingMessage) -> str:
    body, _ = _body(message)
    timestamp = message.timestamp
    record = {
        "exchange": exchange,
        "routing_key": message.routing_key,
        "type": message.type,
        "message_id": message.message_id,
        "correlation_id": message.correlation_id,
        "timestamp": timestamp.astimezone(UTC).isoformat() if timestamp else None,
        "headers": _plain(dict(message.headers or {})),
        "body": body,
    }
    return orjson.dumps(record, default=str).decode()


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Body keys a console line leaves out: the event name is in the key, a recovered event's raw
# record is long.
_HIDDEN = ("event_name", "simotel_record")


def render_text(exchange: str, message: AbstractIncomingMessage, colour: bool) -> str:
    """`12:01:02 event  simotel.NewState  exten=101 state=Ringing ...` (results: status first)."""

    def paint(kind: str, text: str) -> str:
        return f"{_COLOURS.get(kind, _BOLD)}{text}{_RESET}" if colour else text

    when = (message.timestamp or datetime.now(UTC)).astimezone().strftime("%H:%M:%S")
    body, is_json = _body(message)
    if exchange.endswith("results") and is_json and isinstance(body, dict):
        status = str(body.get("status", "?"))
        kind = "ok" if status == "ok" else "failed" if status == "failed" else "bad"
        details = [
            f"http={body.get('http_status')}",
            f"{body.get('duration_ms')}ms",
            f"attempts={body.get('attempts')}",
        ]
        if body.get("error"):
            details.append(f"error={_short(body['error'])}")
        if body.get("response") is not None:
            details.append(f"response={_short(body['response'], 100)}")
        head = f"{paint(kind, 'result')} {paint(kind, f'{status:<8}')}"
    else:
        head = paint("event", "event ") + " " * 9
        if isinstance(body, dict) and is_json:
            details = [f"{k}={_short(v)}" for k, v in body.items() if k not in _HIDDEN]
        else:
            details = [_short(body)]
        origin = (message.headers or {}).get("origin")
        if origin == "reconciled":  # recovered from Simotel's reports (docs/reconcile.md)
            details.insert(0, paint("bad", "origin=reconciled"))
    stamp = f"{_DIM}{when}{_RESET}" if colour else when
    key = paint("key", message.routing_key or "")
    return f"{stamp} {head} {key}  " + " ".join(details)


async def tail(
    settings: Settings,
    pattern: str = "#",
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
    limit: int | None = None,
    *,
    ready: asyncio.Event | None = None,
) -> int:
    """Print messages matching `pattern` until `stop` is set or `limit` messages were printed;
    returns how many were printed. `ready` is set once the queue is bound (nothing published
    after that is missed)."""
    names = settings.amqp.exchanges
    wanted = (names.events, names.results)
    is_tty = out.isatty() if hasattr(out, "isatty") else False
    colour = is_tty and not os.environ.get("NO_COLOR")
    inbox: asyncio.Queue[tuple[str, AbstractIncomingMessage]] = asyncio.Queue()
    connection = await connect_first(
        settings.amqp.endpoints(),
        robust=True,
        client_properties={"connection_name": "simotel-bridge tail"},
    )
    printed = 0
    async with connection:
        channel = await connection.channel()
        # Acked once printed, with a bounded window: a slow terminal leaves the backlog in the
        # broker, where the queue's length bound drops the oldest, instead of in this process.
        await channel.set_qos(prefetch_count=_WINDOW)
        queue = await _own_queue(channel, settings)
        for exchange in wanted:
            await queue.bind(exchange, routing_key=pattern)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await inbox.put((message.exchange or "", message))

        await queue.consume(on_message)
        if ready is not None:
            ready.set()
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        getter: asyncio.Future[tuple[str, AbstractIncomingMessage]] | None = None
        try:
            while limit is None or printed < limit:
                getter = asyncio.ensure_future(inbox.get())
                waiting = {getter} if stopper is None else {getter, stopper}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                exchange, message = getter.result()
                _print(out, exchange, message, is_tty, colour)
                await message.ack()
                printed += 1
        finally:
            for pending in (getter, stopper):
                if pending is not None:
                    pending.cancel()
    return printed


async def tail_since(
    settings: Settings,
    since: datetime,
    pattern: str = "#",
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
    limit: int | None = None,
    *,
    ready: asyncio.Event | None = None,
) -> int:
    """`tail --since`: the events of the history stream from `since` first, then on live
    (from the same stream, so nothing between the two is missed or printed twice); results,
    which the history does not keep, live from the start, printed once the history part is
    done. `ready` is set when the history part has been printed. Returns how many lines were
    printed."""
    from bridge.client.history import HISTORY_STREAM, history_window

    names = settings.amqp.exchanges
    is_tty = out.isatty() if hasattr(out, "isatty") else False
    colour = is_tty and not os.environ.get("NO_COLOR")
    inbox: asyncio.Queue[tuple[str, AbstractIncomingMessage] | None] = asyncio.Queue()
    results: asyncio.Queue[tuple[str, AbstractIncomingMessage]] = asyncio.Queue()
    caught_up = asyncio.Event()
    # A plain connection: a reconnect would attach the stream again at `since`, printing the
    # history a second time. A lost connection ends tail with an error instead.
    connection = await connect_first(
        settings.amqp.endpoints(),
        client_properties={"connection_name": "simotel-bridge tail --since"},
    )
    printed = 0
    tasks: list[asyncio.Future[Any]] = []
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=_WINDOW)
        queue = await _own_queue(channel, settings)
        await queue.bind(names.results, routing_key=pattern)

        async def on_result(message: AbstractIncomingMessage) -> None:
            await results.put((names.results, message))

        await queue.consume(on_result)

        async def read_history() -> None:
            async for message in history_window(
                connection, since, pattern=pattern, follow=True, caught_up=caught_up,
                stream=HISTORY_STREAM,
            ):  # fmt: skip
                await inbox.put((message.exchange or names.events, message))

        async def pass_results() -> None:
            await caught_up.wait()
            await inbox.put(None)  # where the history ends
            while True:
                await inbox.put(await results.get())

        tasks = [asyncio.ensure_future(read_history()), asyncio.ensure_future(pass_results())]
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            while limit is None or printed < limit:
                getter = asyncio.ensure_future(inbox.get())
                waiting = {getter, tasks[0]} | ({stopper} if stopper is not None else set())
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    if tasks[0] in done:
                        tasks[0].result()  # the history reader failed: say why
                    break
                item = getter.result()
                if item is None:
                    if is_tty:
                        out.write(_live_separator(colour) + "\n")
                        out.flush()
                    if ready is not None:
                        ready.set()
                    continue
                exchange, message = item
                _print(out, exchange, message, is_tty, colour)
                if exchange == names.results:
                    await message.ack()
                printed += 1
        finally:
            for pending in (*tasks, stopper):
                if pending is not None:
                    pending.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return printed


async def _own_queue(channel: AbstractChannel, settings: Settings) -> AbstractQueue:
    """Tail's own queue: server-named, exclusive, auto-delete, length-bounded. Only the
    exchanges tail binds to (and the events' alternate exchange) are declared, with the same
    arguments as every role uses."""
    names = settings.amqp.exchanges
    for e in topology.build(settings.amqp).exchanges:
        if e.name in (names.events, names.results, names.unrouted):
            await channel.declare_exchange(e.name, e.type, durable=True, arguments=e.arguments)
    return await channel.declare_queue(
        "",
        exclusive=True,
        auto_delete=True,
        arguments={"x-max-length": _MAX_BACKLOG, "x-overflow": "drop-head"},
    )


def _print(
    out: TextIO, exchange: str, message: AbstractIncomingMessage, is_tty: bool, colour: bool
) -> None:
    """One line: readable on a terminal, a JSON object otherwise."""
    line = render_text(exchange, message, colour) if is_tty else render_json(exchange, message)
    out.write(line + "\n")
    out.flush()


def _live_separator(colour: bool) -> str:
    text = "-- history above, live below --"
    return f"{_DIM}{text}{_RESET}" if colour else text
