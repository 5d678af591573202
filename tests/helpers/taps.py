"""Helpers for tests that read what reached the broker. Waiting is always on the thing itself
(a message arriving), bounded by a timeout; never a sleep."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection


@dataclass
class Tap:
    """An exclusive queue bound to an exchange, collecting what arrives."""

    queue_name: str
    messages: list[AbstractIncomingMessage] = field(default_factory=list)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        async with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[AbstractIncomingMessage]:
        """Wait until at least `count` messages have arrived; fail after `timeout`."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.messages) >= count)
        return list(self.messages)


@asynccontextmanager
async def tap(
    connection: AbstractRobustConnection,
    exchange: str,
    *patterns: str,
) -> AsyncIterator[Tap]:
    channel = await connection.channel()
    queue = await channel.declare_queue(f"tap-{uuid.uuid4().hex[:8]}", exclusive=True)
    for pattern in patterns:
        await queue.bind(exchange, routing_key=pattern)
    t = Tap(queue.name)
    await queue.consume(t._on_message, no_ack=True)
    try:
        yield t
    finally:
        await channel.close()


async def drain(
    connection: AbstractRobustConnection, queue_name: str
) -> list[AbstractIncomingMessage]:
    """Take every message now in a queue (acknowledging them)."""
    channel = await connection.channel()
    try:
        queue = await channel.get_queue(queue_name, ensure=False)
        out = []
        while (msg := await queue.get(fail=False, no_ack=True)) is not None:
            out.append(msg)
        return out
    finally:
        await channel.close()
