"""Send one command to the bridge's worker and wait for its result (docs/worker.md).

    from bridge.client import send_command

    result = await send_command(
        "amqp://guest:guest@127.0.0.1/", "call/originate/act", {...}, source="simotel"
    )
    print(result.status, result.response)

The command is published to the commands exchange (persistent, mandatory, confirmed) with a
`deadline` header equal to `timeout`, a `reply_to` queue of its own and a `correlation_id`;
the worker answers there as well as on the results exchange. Give `message_id` when a retry of
yours must not run the command twice (the worker de-duplicates on it).

Takes a broker URL (connected and closed here) or a connection the caller owns, and the names
(`source`, `exchange`): no bridge configuration is needed. `simotel-bridge send` (bridge.send)
is this function with the names taken from the bridge's configuration.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aio_pika.exceptions
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from bridge import wire
from bridge.catalog import lookup
from bridge.commands import Result, parse_result
from bridge.errors import InvalidCommand, PublishError, Unroutable
from bridge.wire import COMMANDS_EXCHANGE, command_key, json_message


def action_path(action: str) -> str:
    """The catalog's path for `action`; InvalidCommand when Simotel API v4 has no such action
    (checked before anything is sent)."""
    endpoint = lookup(action)
    if endpoint is None:
        raise InvalidCommand("unknown_action", f"{action!r} is not a Simotel API v4 action")
    return endpoint.path


async def send_command(
    broker: str | AbstractConnection,
    action: str,
    data: dict[str, Any],
    *,
    source: str,
    exchange: str = COMMANDS_EXCHANGE,
    timeout: float = 30.0,
    message_id: str | None = None,
    traceparent: str | None = None,
) -> Result:
    """Publish one command, wait for its result (at most `timeout` seconds, which is also the
    command's deadline) and return it. A download's bytes are in `Result.file`. A
    `traceparent` (W3C trace context) goes with the command, and the worker carries it on.
    Raises InvalidCommand (an action Simotel API v4 does not have), Unroutable (nothing bound:
    no worker topology on this vhost), PublishError, TimeoutError, ValueError (a malformed
    `traceparent`); aio-pika's own errors when the broker cannot be reached."""
    path = action_path(action)
    if traceparent is not None and wire.traceparent(traceparent) is None:
        raise ValueError("traceparent must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)")
    if isinstance(broker, str):
        connection: AbstractConnection = await aio_pika.connect(broker)
    else:
        connection = broker
    try:
        async with asyncio.timeout(timeout):
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            return await _exchange(
                channel, path, data, source, exchange, timeout, message_id, traceparent
            )
        finally:
            if not channel.is_closed:
                await channel.close()
    finally:
        if isinstance(broker, str):
            await connection.close()


async def _exchange(
    channel: aio_pika.abc.AbstractChannel,
    path: str,
    data: dict[str, Any],
    source: str,
    exchange: str,
    timeout: float,
    message_id: str | None,
    traceparent: str | None,
) -> Result:
    replies = await channel.declare_queue(exclusive=True, auto_delete=True)
    correlation_id = uuid.uuid4().hex
    answer: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

    async def on_reply(message: AbstractIncomingMessage) -> None:
        if message.correlation_id == correlation_id and not answer.done():
            answer.set_result(message)

    await replies.consume(on_reply, no_ack=True)
    deadline = datetime.now(UTC) + timedelta(seconds=timeout)
    message = json_message(
        orjson.dumps({"action": path, "data": data}),
        message_id=message_id or uuid.uuid4().hex,
        type=path,
        headers={
            wire.SOURCE: source,
            wire.DEADLINE: deadline.isoformat(),
            **({wire.TRACEPARENT: traceparent} if traceparent else {}),
        },
        timestamp=time.time(),
        correlation_id=correlation_id,
        reply_to=replies.name,
    )
    target = await channel.get_exchange(exchange, ensure=False)
    key = command_key(source, path)
    try:
        await target.publish(message, key, mandatory=True, timeout=timeout)
    except aio_pika.exceptions.PublishError as exc:  # the broker returned it
        raise Unroutable(f"no queue bound to {exchange}/{key}") from exc
    except aio_pika.exceptions.DeliveryError as exc:
        raise PublishError(f"broker refused the command: {exc!r}") from exc
    except TimeoutError as exc:
        raise PublishError(f"not confirmed within {timeout:.3g}s") from exc
    async with asyncio.timeout(timeout):
        reply = await answer
    return parse_result(reply.body, reply.content_type, dict(reply.headers or {}))
