"""The worker's outputs are safe whatever a command carries (issue 9), against the real RabbitMQ
and a fake Simotel over real HTTP: an over-long message_id is refused and settled (not handed
back up to the delivery limit), a secret never reaches a result or dead letter, an upload's
content type cannot write multipart headers, and a result the broker refuses is replaced by a
safe one and settled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from bridge.commands import parse_result
from bridge.config import Settings
from tests.helpers.worker import (
    WAIT,
    Bus,
    FakeSimotel,
    assembled_worker,
    header,
    ok,
    running_worker,
)

pytestmark = [pytest.mark.broker]


def with_api_key(settings: Settings, key: str) -> Settings:
    """`settings` with an API key as a careless secret file gives it (not validated again, as
    if it had slipped past the checks at load time)."""
    source = settings.sources["simotel"]
    assert source.api is not None
    api = source.api.model_copy(update={"api_key": SecretStr(key)})
    sources = {"simotel": source.model_copy(update={"api": api})}
    return settings.model_copy(update={"sources": sources})


async def test_an_over_long_message_id_is_rejected_and_settled_once(
    fake: FakeSimotel, cfg: Settings, bus: Bus
) -> None:
    """252-255 bytes: `{id}:dead` no longer fits a shortstr. The command is rejected with a
    cut id, its dead letter published, and it is not delivered again."""
    mid = "m" * 254
    async with running_worker(cfg):
        result = await bus.result(await bus.send("call/originate/act", {}, message_id=mid))
        dead = await bus.next_dead()
        assert (await bus.call("setting/ping/act")).status == "ok"
    left = await bus.queued_commands()
    assert (result.status, header(dead, "reason")) == ("rejected", "bad_message_id")
    assert len(result.command_id.encode()) <= 200 and result.command_id.startswith("m" * 150)
    assert dead.message_id == f"{result.command_id}:dead"
    assert left == [] and bus.dead.empty()
    assert fake.to("call/originate/act") == []


async def test_a_secret_with_a_newline_never_reaches_a_result(
    fake: FakeSimotel, cfg: Settings, bus: Bus
) -> None:
    secret = "the-secret-api-key\n"
    settings = with_api_key(cfg, secret)
    async with running_worker(settings):
        result = await bus.call("call/originate/act", {"caller": "1"}, message_id="k-1")
        dead = await bus.next_dead()
        ping_result = await bus.call("setting/ping/act")
    texts = [result.error or "", str(header(dead, "error")), ping_result.error or ""]
    assert all("the-secret-api-key" not in t for t in texts), texts
    assert (result.status, header(dead, "reason")) == ("error", "client")
    assert result.error == "client: invalid request header (LocalProtocolError)"
    assert ping_result.status == "error" and result.attempts == 1
    assert fake.requests == []
    state = Path(settings.worker.state_path)
    assert b"the-secret-api-key" not in b"".join(
        p.read_bytes() for p in state.parent.glob(state.name + "*")
    )


async def test_crlf_in_an_upload_content_type_is_rejected(
    fake: FakeSimotel, cfg: Settings, bus: Bus
) -> None:
    spec = {"filename": "a.wav", "content_base64": "AAAA", "content_type": "audio/wav\r\nX-A: 1"}
    async with running_worker(cfg):
        result = await bus.call("pbx/announcements/upload", {"file": spec}, message_id="u-1")
    assert (result.status, result.error) == (
        "rejected",
        "data.file.content_type is not a MIME type (type/subtype)",
    )
    assert fake.requests == []


async def test_a_result_the_broker_refuses_is_replaced_by_a_safe_one(
    fake: FakeSimotel, cfg: Settings, amqp: AbstractRobustConnection, bus: Bus
) -> None:
    """The reply queue nacks every message: the result is refused again and again. The worker
    publishes a safe result without the response and a dead letter, and settles the command
    (it is not handed back), well within its publish retry period."""
    channel = await amqp.channel()
    refusing = await channel.declare_queue(
        exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    fake.on("pbx/users/search", ok([{"user": "u" * 1000}]))
    registry = CollectorRegistry()
    async with assembled_worker(cfg, registry=registry):
        exchange = await bus.channel.get_exchange(cfg.amqp.exchanges.commands)
        await exchange.publish(
            aio_pika.Message(
                b'{"action": "pbx/users/search", "data": {}}',
                message_id="refused-1",
                reply_to=refusing.name,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            "simotel.pbx.users.search",
        )
        dead = await bus.next_dead(timeout=20)
        first = await asyncio.wait_for(bus.results.get(), WAIT)
        safe = await asyncio.wait_for(bus.results.get(), WAIT)
        assert (await bus.call("setting/ping/act")).status == "ok"
    left = await bus.queued_commands()
    got = [parse_result(m.body, m.content_type, dict(m.headers or {})) for m in (first, safe)]
    assert [r.command_id for r in got] == ["refused-1", "refused-1"]
    assert got[0].response is not None and got[1].response is None
    assert got[1].status == "ok" and (got[1].error or "").startswith(
        "the result could not be published"
    )
    assert header(dead, "reason") == "result_unpublishable"
    assert registry.get_sample_value("simotel_bridge_results_unpublishable_total") == 1
    assert registry.get_sample_value("simotel_bridge_commands_handed_back_total") == 0
    assert left == []
