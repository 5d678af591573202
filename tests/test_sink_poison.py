"""Poison never blocks the spool's line (issue 9), against the real (shared) RabbitMQ: a row that
cannot be decoded, that the client cannot encode, or that the broker refuses (a channel closed on
an unknown exchange, a connection closed on a frame over frame_max) goes to the quarantine with a
copy on `simotel.dead`; every other event is published, each call's in order. A broker that
refuses everything is not a reason to quarantine anything."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from bridge.config import Settings
from bridge.spool import Spool
from bridge.translate import OutgoingEvent
from tests.helpers.env import make_settings
from tests.helpers.sink import (
    Stack,
    check_delivery,
    declare_audit,
    make_event,
    open_stack,
    read_queue,
)

pytestmark = [pytest.mark.broker]


def spool_file(settings: Settings, events: list[OutgoingEvent]) -> list[int]:
    """A spool left behind by an earlier run holding `events`, in this order."""
    spool = Spool(settings.spool.path, max_messages=10_000, max_bytes=1 << 30)
    seqs = [spool.append(e) for e in events]
    spool.close()
    return seqs


def traffic(calls: int, per_call: int) -> tuple[list[OutgoingEvent], dict[str, list[str]]]:
    """The events of several calls, interleaved, and call -> ids in order."""
    events = [make_event(f"c{c}", n) for n in range(per_call) for c in range(calls)]
    sent: dict[str, list[str]] = {}
    for e in events:
        sent.setdefault(str(e.call_id), []).append(e.message_id)
    return events, sent


async def dead_letters(url: str, count: int, timeout: float = 30.0) -> list[Any]:
    """The first `count` messages on `simotel.dead`, waited for with a bound, acknowledged."""
    conn = await aio_pika.connect(url)
    out = []
    try:
        ch = await conn.channel()
        q = await ch.get_queue("simotel.dead", ensure=False)
        async with asyncio.timeout(timeout), q.iterator() as messages:
            async for m in messages:
                await m.ack()
                out.append(m)
                if len(out) == count:
                    break
    finally:
        await conn.close()
    return out


async def drained(stack: Stack, timeout: float = 60.0) -> None:
    assert await stack.sink.wait_drained(timeout), stack.sink.status()


async def test_undecodable_and_unencodable_rows_are_quarantined_and_the_rest_flows(
    amqp_url: str, tmp_path: Path
) -> None:
    settings = make_settings(amqp_url, tmp_path)
    await declare_audit(amqp_url)
    events, sent = traffic(calls=3, per_call=4)
    bad_key = replace(make_event("bad", 0), routing_key="simotel." + "k" * 300)
    events.insert(2, bad_key)
    seqs = spool_file(settings, events)
    db = sqlite3.connect(settings.spool.path)
    db.execute("UPDATE spool SET headers = ? WHERE seq = ?", (b"\xffdamaged", seqs[5]))
    db.commit()
    db.close()
    damaged = events[5]
    sent[str(damaged.call_id)].remove(damaged.message_id)
    stack = await open_stack(settings)
    try:
        await drained(stack)
        status = stack.sink.status()
        assert status["quarantined"] == 2 and status["mode"] == "broker"
        assert stack.metric("simotel_bridge_spool_quarantined_total", reason="undecodable") == 1
        assert stack.metric("simotel_bridge_spool_quarantined_total", reason="unpublishable") == 1
        assert stack.metric("simotel_bridge_spool_quarantine_depth") == 2
        dead = await dead_letters(amqp_url, 2)
    finally:
        await stack.close()
    got = await read_queue(amqp_url)
    delivery = check_delivery(sent, got)
    assert delivery.ok, delivery  # duplicates allowed: rows confirmed after a failure
    by_id = {m.message_id: m for m in dead}
    undecodable = by_id[damaged.message_id]
    assert undecodable.headers["reason"].startswith("undecodable: ")
    assert undecodable.headers["headers_dropped"] is True
    assert undecodable.body == damaged.body and undecodable.type == "quarantined-event"
    unencodable = by_id[bad_key.message_id]
    assert unencodable.headers["reason"].startswith("unpublishable: ")
    assert unencodable.routing_key == "quarantine"  # its own key is over 255 bytes
    assert unencodable.headers["call_id"] == "bad"  # small headers are kept
    assert stack.metric("simotel_bridge_spool_dead_copies_total", outcome="sent") == 2
    spool = Spool(settings.spool.path, max_messages=10, max_bytes=1 << 20)
    assert [q.dead_copy for q in spool.quarantined()] == ["sent", "sent"]
    spool.close()


async def test_rows_the_broker_refuses_are_quarantined_and_the_connection_comes_back(
    amqp_url: str, tmp_path: Path
) -> None:
    """One row names an exchange that does not exist (the broker closes the channel), one has
    a header over frame_max (the broker closes the whole connection): each is refused again
    and again while others would pass, so each goes to the quarantine; nothing else is lost."""
    settings = make_settings(amqp_url, tmp_path)
    await declare_audit(amqp_url)
    events, sent = traffic(calls=3, per_call=3)
    no_exchange = replace(make_event("gone", 0), exchange="no-such-exchange")
    too_big = make_event("big", 0)
    too_big = replace(too_big, headers={**too_big.headers, "app_name": "x" * 300_000})
    events[1:1] = [no_exchange]
    events[5:5] = [too_big]
    spool_file(settings, events)
    stack = await open_stack(settings, poison_attempts=2, backoff=(0.05, 0.3))
    try:
        await drained(stack, 90)
        assert stack.metric("simotel_bridge_spool_quarantined_total", reason="refused") == 2
        dead = await dead_letters(amqp_url, 2)
        # The shared connection is usable again: a new event goes straight to the broker.
        assert await stack.sink.accept(make_event("after", 0)) == "broker"
    finally:
        await stack.close()
    sent["after"] = ["after/0"]
    got = await read_queue(amqp_url)
    delivery = check_delivery(sent, got)
    assert delivery.ok, delivery
    assert {m.message_id for m in got} == {i for ids in sent.values() for i in ids}
    reasons = {m.message_id: m.headers["reason"] for m in dead}
    assert reasons.keys() == {no_exchange.message_id, too_big.message_id}
    assert all(r.startswith("refused: ") for r in reasons.values()), reasons
    big_copy = next(m for m in dead if m.message_id == too_big.message_id)
    assert big_copy.headers["headers_dropped"] is True and big_copy.body == too_big.body


async def test_a_broker_that_refuses_everything_quarantines_nothing(
    amqp_url: str, tmp_path: Path
) -> None:
    """A queue that refuses every event (full, reject-publish) nacks them all: that is the
    broker's state, not poison. Even after many refusals nothing is quarantined, and all
    events arrive once the queue takes them again."""
    await declare_audit(amqp_url)
    conn = await aio_pika.connect(amqp_url)
    ch = await conn.channel()
    blocker = await ch.declare_queue(
        "blocker", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    await blocker.bind("simotel.events", routing_key="#")
    stack = await open_stack(
        make_settings(amqp_url, tmp_path), poison_attempts=2, backoff=(0.02, 0.05)
    )
    events, sent = traffic(calls=3, per_call=3)
    try:
        assert {await stack.sink.accept(e) for e in events} == {"spool"}
        # It cannot drain; meanwhile the head is refused, compared, refused again, ...
        assert not await stack.sink.wait_drained(3.0)
        assert stack.metric("simotel_bridge_spool_replay_failures_total") >= 6
        assert stack.sink.status()["quarantined"] == 0
        assert stack.metric("simotel_bridge_spool_quarantined_total", reason="refused") == 0
        await blocker.delete(if_unused=False, if_empty=False)
        await drained(stack)
        assert stack.sink.status()["quarantined"] == 0
    finally:
        await stack.close()
        await conn.close()
    delivery = check_delivery(sent, await read_queue(amqp_url))
    assert delivery.ok, delivery


async def test_a_refused_row_is_quarantined_even_with_only_its_own_call_behind_it(
    amqp_url: str, tmp_path: Path
) -> None:
    """Events without another call to compare with (one call, or events without a call id on
    one routing key): the next event of the same call is the comparison."""
    settings = make_settings(amqp_url, tmp_path)
    await declare_audit(amqp_url)
    events, sent = traffic(calls=1, per_call=4)
    events.insert(0, replace(make_event("c0", 99), exchange="no-such-exchange"))
    spool_file(settings, events)
    stack = await open_stack(settings, poison_attempts=2, backoff=(0.05, 0.3))
    try:
        await drained(stack)
        assert stack.metric("simotel_bridge_spool_quarantined_total", reason="refused") == 1
    finally:
        await stack.close()
    delivery = check_delivery(sent, await read_queue(amqp_url))
    assert delivery.ok, delivery
