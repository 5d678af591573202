"""The AMQP layer's retry helpers: `Backoff`, the one schedule of every loop that waits for the
broker, and `keep_consuming`, which consumes again until the queue is there."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from bridge.amqp import Backoff, keep_consuming


def test_backoff_doubles_up_to_its_cap_and_starts_again_after_reset() -> None:
    pauses = Backoff(0.5, 3.0, rand=lambda: 0.0)
    assert [pauses.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    pauses.reset()
    assert pauses.next() == 0.5


def test_backoff_jitter_only_shortens_a_pause() -> None:
    pauses = Backoff(1.0, 1.0, jitter=0.2, rand=lambda: 1.0)
    assert pauses.next() == pytest.approx(0.8)
    assert Backoff(1.0, 1.0).next() <= 1.0
    assert Backoff(2.0, 1.0, rand=lambda: 0.0).next() == 2.0  # a cap below the base is the base


async def test_backoff_wait_ends_when_stop_is_set() -> None:
    stop = asyncio.Event()
    stop.set()
    started = time.monotonic()
    await Backoff(60.0, 60.0).wait(stop)
    assert time.monotonic() - started < 5  # not the 48-60 s pause


async def test_backoff_wait_is_bounded_by_at_most() -> None:
    started = time.monotonic()
    await Backoff(60.0, 60.0).wait(asyncio.Event(), at_most=0.01)
    assert time.monotonic() - started < 5


async def test_keep_consuming_retries_until_the_queue_is_there(
    amqp: AbstractRobustConnection,
) -> None:
    """A consumer on a queue that does not exist yet (a quorum queue still recovering) fails;
    it is tried again, on a fresh channel after each failure, until it works."""
    channels: list[aio_pika.abc.AbstractChannel] = []
    got: asyncio.Queue[bytes] = asyncio.Queue()
    failures = 0

    async def on_message(message: AbstractIncomingMessage) -> None:
        await got.put(message.body)

    async def consume() -> None:
        if failures >= 2:
            await declared.wait()
        if not channels:
            channels.append(await amqp.channel())
        queue = await channels[0].get_queue("appears-later", ensure=True)
        await queue.consume(on_message, no_ack=True)

    def on_failure() -> None:
        nonlocal failures
        failures += 1
        channels.clear()  # the broker closed the channel that looked the queue up
        if failures == 2:
            declaring.set()

    declaring, declared = asyncio.Event(), asyncio.Event()

    async def declare_later() -> None:
        await declaring.wait()
        async with amqp.channel() as ch:
            await ch.declare_queue("appears-later", durable=True)
        declared.set()

    declarer = asyncio.create_task(declare_later())
    async with asyncio.timeout(30):
        consumed = await keep_consuming(
            consume,
            what="test",
            stopped=lambda: False,
            on_failure=on_failure,
            backoff=Backoff(0.01, 0.05),
        )
        await declarer
    assert consumed and failures == 2
    async with amqp.channel() as ch:
        await ch.default_exchange.publish(aio_pika.Message(b"hello"), "appears-later")
    async with asyncio.timeout(10):
        assert await got.get() == b"hello"
    await channels[0].close()


async def test_keep_consuming_gives_up_when_stopped() -> None:
    async def consume() -> None:
        raise ConnectionError("no broker")

    stopped = False

    def on_failure() -> None:
        nonlocal stopped
        stopped = True

    async with asyncio.timeout(10):
        consumed = await keep_consuming(
            consume, what="test", stopped=lambda: stopped, on_failure=on_failure
        )
    assert not consumed
