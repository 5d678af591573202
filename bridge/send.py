"""`simotel-bridge send ACTION [JSON]`: publish one command, wait for its result."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage

from bridge.amqp import Broker, Publisher, json_message
from bridge.catalog import lookup
from bridge.commands import InvalidCommand, Result, parse_result
from bridge.config import Settings
from bridge.topology import command_key


async def send_command(
    settings: Settings,
    action: str,
    data: dict[str, Any],
    *,
    source: str | None = None,
    timeout: float = 30.0,
    message_id: str | None = None,
) -> Result:
    """Publish one command, wait for its result (at most `timeout` seconds, which is also the
    command's deadline) and return it. A download's bytes are in `Result.file`.
    Raises InvalidCommand (unknown action/source), PublishError, TimeoutError."""
    endpoint = lookup(action)
    if endpoint is None:
        raise InvalidCommand("unknown_action", f"{action!r} is not a Simotel API v4 action")
    if source is None:
        if len(settings.sources) != 1:
            raise InvalidCommand("unknown_source", "several sources are configured: name one")
        source = next(iter(settings.sources))
    elif source not in settings.sources:
        raise InvalidCommand("unknown_source", f"source {source!r} is not configured")
    broker = Broker(settings.amqp, name="simotel-bridge send")
    await broker.connect()
    try:
        channel = await broker.channel()
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        correlation_id = uuid.uuid4().hex
        answer: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

        async def on_reply(message: AbstractIncomingMessage) -> None:
            if message.correlation_id == correlation_id and not answer.done():
                answer.set_result(message)

        await replies.consume(on_reply, no_ack=True)
        deadline = datetime.now(UTC) + timedelta(seconds=timeout)
        message = json_message(
            orjson.dumps({"action": endpoint.path, "data": data}),
            message_id=message_id or uuid.uuid4().hex,
            type=endpoint.path,
            headers={"source": source, "deadline": deadline.isoformat()},
            timestamp=time.time(),
            correlation_id=correlation_id,
            reply_to=replies.name,
        )
        publisher = Publisher(broker)
        await publisher.start()
        await publisher.publish(
            settings.amqp.exchanges.commands, command_key(source, endpoint.path), message
        )
        async with asyncio.timeout(timeout):
            reply = await answer
        return parse_result(reply.body, reply.content_type, dict(reply.headers or {}))
    finally:
        await broker.close()
