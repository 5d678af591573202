"""How the worker settles a command (`bridge.settle`) when publishing its result goes wrong,
against the real RabbitMQ (a fresh vhost per test) and a fake Simotel over real HTTP:

- every message published for a command has a stable message_id (`{command_id}`, and
  `{command_id}:dead` for the dead letter), so a result published twice can be de-duplicated;
- a result the broker does not confirm is published again with backoff instead of handing the
  command back at once (which burns the quorum queue's delivery limit);
- on the last delivery the queue allows, a command that would be handed back again is settled
  by the worker itself, with a `delivery_limit` result and a dead letter with reason/status.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry

from bridge.amqp import Broker, Publisher
from bridge.config import Settings
from bridge.errors import PublishError
from tests.helpers.worker import (
    WAIT,
    Bus,
    FakeSimotel,
    assembled_worker,
    header,
    held,
    ok,
    reply,
    running_worker,
    worker_settings,
)


class FlakyPublisher(Publisher):
    """The real publisher, after failing the first publishes the way a broker hiccup does:
    `PublishError` (confirm timeout, connection lost) or a `CancelledError` out of a confirm
    that aiormq cancelled when the connection dropped (the task itself is not cancelled)."""

    def __init__(self, broker: Broker, failures: list[BaseException]) -> None:
        super().__init__(broker)
        self.failures = failures

    async def publish(
        self, exchange: str, routing_key: str, message: aio_pika.Message, **kw: Any
    ) -> float:
        if self.failures:
            raise self.failures.pop(0)
        return await super().publish(exchange, routing_key, message, **kw)


async def test_result_message_ids_are_stable(fake: FakeSimotel, cfg: Settings, bus: Bus) -> None:
    """The same command answered twice (the second time from the state store, as after a
    hand-back and a redelivery) gives results and dead letters with the same message_id."""
    fake.on("pbx/users/add", reply(500, {"success": 0, "message": "boom"}))
    async with running_worker(cfg):
        first = await bus.reply(await bus.send("pbx/users/add", {"name": "x"}, message_id="a-7"))
        again = await bus.reply(await bus.send("pbx/users/add", {"name": "x"}, message_id="a-7"))
        published = [await asyncio.wait_for(bus.results.get(), WAIT) for _ in range(2)]
        letters = [await bus.next_dead() for _ in range(2)]
    assert len(fake.to("pbx/users/add")) == 1  # the second answer came from the store
    assert first.body == again.body
    assert [m.message_id for m in (first, again, *published)] == ["a-7"] * 4
    assert [m.message_id for m in letters] == ["a-7:dead"] * 2
    assert [header(m, "status") for m in letters] == ["error"] * 2


@pytest.mark.parametrize(
    "failures",
    [
        # more unconfirmed attempts than the delivery limit (5) allows hand-backs
        pytest.param(
            lambda: [PublishError("not confirmed within 5s") for _ in range(7)], id="nacks"
        ),
        pytest.param(lambda: [asyncio.CancelledError()], id="cancelled-confirm"),
        pytest.param(
            lambda: [PublishError("broker connection failed"), asyncio.CancelledError()] * 3,
            id="mixed",
        ),
    ],
)
async def test_unconfirmed_result_is_published_again(
    fake: FakeSimotel, cfg: Settings, bus: Bus, failures: Callable[[], list[BaseException]]
) -> None:
    fake.on("pbx/users/search", ok([{"number": "101"}]))
    injected = failures()
    registry = CollectorRegistry()
    async with assembled_worker(
        cfg,
        lambda broker: FlakyPublisher(broker, injected),
        registry=registry,
        publish_retry_delay=0.01,
    ):
        result = await bus.call("pbx/users/search", {"alike": "true"}, message_id="s-1")
    assert (result.status, result.response["data"]) == ("ok", [{"number": "101"}])
    assert injected == []  # every failure was met, then the real publish went through
    assert len(fake.to("pbx/users/search")) == 1
    assert registry.get_sample_value("simotel_bridge_commands_handed_back_total") == 0
    assert registry.get_sample_value("simotel_bridge_result_publish_failures_total") == len(
        failures()
    )
    assert bus.dead.empty()
    assert await bus.queued_commands() == []


async def test_retries_are_bounded_then_the_command_is_handed_back(
    fake: FakeSimotel, cfg: Settings, bus: Bus
) -> None:
    """Past `publish_retry_for` the command goes back to the queue; its redelivery is answered
    from the state store, not executed again."""
    fake.on("pbx/users/search", ok(["once"]))
    injected: list[BaseException] = [PublishError("not confirmed") for _ in range(3)]
    registry = CollectorRegistry()
    async with assembled_worker(
        cfg,
        lambda broker: FlakyPublisher(broker, injected),
        registry=registry,
        publish_retry_for=0.0,  # no retry: hand back at the first failure
    ):
        result = await bus.call("pbx/users/search", {"alike": "true"}, message_id="s-2")
    assert (result.status, result.response["data"]) == ("ok", ["once"])
    assert len(fake.to("pbx/users/search")) == 1
    assert registry.get_sample_value("simotel_bridge_commands_handed_back_total") == 3
    assert await bus.queued_commands() == []


async def test_last_delivery_is_settled_not_handed_back(
    fake: FakeSimotel, amqp: AbstractRobustConnection, amqp_url: str, tmp_path: Path
) -> None:
    """A command handed back over and over (each worker is stopped, past a tiny grace, in the
    middle of its request) gets a `delivery_limit` result and a dead letter with reason and
    status on its last delivery, instead of being dead-lettered by the broker without either."""
    limit = 2  # the queue delivers it 3 times: x-delivery-count absent/0, 1, 2
    settings = worker_settings(
        amqp_url,
        tmp_path,
        fake.url,
        worker={"shutdown_grace": 0.1},
        amqp={"commands_delivery_limit": limit},
    )
    fake.on("pbx/users/search", held(fake.gate()))  # never answers while a worker runs
    bus = await Bus(amqp, settings).start()
    cid = await bus.send("pbx/users/search", {"alike": "true"}, message_id="stuck-1")
    for delivery in range(1, limit + 2):
        async with running_worker(settings):
            await fake.wait_for("pbx/users/search", count=delivery)
    result = await bus.result(cid)
    letter = await bus.next_dead()
    assert (result.status, result.command_id, result.action) == (
        "error",
        "stuck-1",
        "pbx/users/search",
    )
    assert result.error is not None and "delivered 3 times" in result.error
    assert (header(letter, "status"), header(letter, "reason")) == ("error", "delivery_limit")
    assert letter.routing_key == "simotel.pbx.users.search"  # ours, not the broker's
    assert letter.message_id == "stuck-1:dead"
    assert len(fake.to("pbx/users/search")) == limit + 1
    assert await bus.queued_commands() == []
    assert bus.dead.empty()  # the broker dead-lettered nothing itself
