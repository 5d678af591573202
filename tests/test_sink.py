"""The event sink against the real (shared) RabbitMQ, without stopping it: direct publishes,
replay at start, new events queueing behind the spool, a refused publish, the bounds."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import aio_pika
import pytest

from bridge.sink import ordered_window
from bridge.spool import Spool, Spooled, SpoolFull
from tests.helpers.env import make_settings
from tests.helpers.sink import check_delivery, declare_audit, make_event, open_stack, read_queue

CLOSED_PORT_URL = "amqp://guest:guest@127.0.0.1:1/"


@pytest.mark.broker
async def test_accept_publishes_with_confirm(amqp_url: str, tmp_path: Path) -> None:
    stack = await open_stack(make_settings(amqp_url, tmp_path))
    try:
        await declare_audit(amqp_url)
        events = [make_event("c1", n) for n in range(5)]
        assert [await stack.sink.accept(e) for e in events] == ["broker"] * 5
        assert stack.sink.status() == {
            "mode": "broker",
            "spool_enabled": True,
            "spool_full": False,
            "spool_depth": 0,
            "oldest_age_s": 0.0,
            "quarantined": 0,
        }
    finally:
        await stack.close()
    got = await read_queue(amqp_url)
    assert [m.message_id for m in got] == [e.message_id for e in events]
    m = got[0]
    assert (m.body, m.type, m.content_type, m.app_id) == (
        events[0].body,
        "NewState",
        "application/json",
        "simotel-bridge",
    )
    assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert m.headers == events[0].headers
    assert stack.metric("simotel_bridge_spool_replayed_total") == 0


def prefill(path: Path, calls: int, per_call: int) -> dict[str, list[str]]:
    """A spool left behind by an earlier run: the events of several calls, interleaved."""
    spool = Spool(path, max_messages=1_000_000, max_bytes=1 << 30)
    sent: dict[str, list[str]] = {}
    for n in range(per_call):
        for c in range(calls):
            e = make_event(f"old{c}", n)
            spool.append(e)
            sent.setdefault(f"old{c}", []).append(e.message_id)
    spool.close()
    return sent


@pytest.mark.broker
async def test_spool_left_by_a_previous_run_is_replayed_at_start(
    amqp_url: str, tmp_path: Path
) -> None:
    settings = make_settings(amqp_url, tmp_path)
    sent = prefill(Path(settings.spool.path), calls=3, per_call=100)
    await declare_audit(amqp_url)
    stack = await open_stack(settings)
    try:
        assert stack.sink.status()["mode"] == "spool"
        assert await stack.sink.wait_drained(20)
        assert stack.sink.status()["spool_depth"] == 0
        assert stack.metric("simotel_bridge_spool_replayed_total") == 300
        assert stack.metric("simotel_bridge_spool_depth") == 0
    finally:
        await stack.close()
    got = await read_queue(amqp_url)
    delivery = check_delivery(sent, got)
    assert delivery.ok, delivery
    assert delivery.duplicates == 0
    assert len(got) == 300


@pytest.mark.broker
async def test_new_events_queue_behind_the_spool(amqp_url: str, tmp_path: Path) -> None:
    """While older events are spooled, new ones go behind them, even with the broker up; once
    the spool is empty they go straight to the broker again, and the order is kept."""
    settings = make_settings(amqp_url, tmp_path)
    sent = prefill(Path(settings.spool.path), calls=2, per_call=1000)
    await declare_audit(amqp_url)
    stack = await open_stack(settings)
    outcomes = []
    try:
        for n in range(1000, 1300):
            for call in ("old0", "old1"):
                e = make_event(call, n)
                outcomes.append(await stack.sink.accept(e))
                sent[call].append(e.message_id)
        assert await stack.sink.wait_drained(30)
        outcomes.append(await stack.sink.accept(make_event("new", 0)))
        sent["new"] = ["new/0"]
    finally:
        await stack.close()
    assert outcomes[0] == "spool"
    assert outcomes[-1] == "broker"
    # Spool first, then broker: never back and forth while the broker is healthy.
    flip = outcomes.index("broker")
    assert set(outcomes[:flip]) == {"spool"} and set(outcomes[flip:]) == {"broker"}
    assert stack.metric("simotel_bridge_spooled_total", reason="behind_spool") == flip
    got = await read_queue(amqp_url)
    delivery = check_delivery(sent, got)
    assert delivery.ok, delivery
    assert len(got) == 2000 + 600 + 1


@pytest.mark.broker
async def test_a_refused_publish_is_spooled_and_replayed(amqp_url: str, tmp_path: Path) -> None:
    """A queue that refuses messages makes the broker nack the publish: the event is spooled
    (answered, not lost), later events queue behind it, and all arrive once it takes them."""
    await declare_audit(amqp_url)
    conn = await aio_pika.connect(amqp_url)
    ch = await conn.channel()
    blocker = await ch.declare_queue(
        "blocker", arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    await blocker.bind("simotel.events", routing_key="#")
    stack = await open_stack(make_settings(amqp_url, tmp_path), backoff=(0.05, 0.2))
    try:
        sent = {"c": [f"c/{n}" for n in range(10)]}
        outcomes = [await stack.sink.accept(make_event("c", n)) for n in range(10)]
        assert outcomes == ["spool"] * 10
        assert stack.metric("simotel_bridge_spooled_total", reason="publish_failed") == 1
        assert stack.metric("simotel_bridge_spooled_total", reason="behind_spool") == 9
        assert stack.sink.status()["mode"] == "spool"
        await blocker.delete(if_unused=False, if_empty=False)
        assert await stack.sink.wait_drained(10)
        assert stack.metric("simotel_bridge_spool_replay_failures_total") >= 1
        assert await stack.sink.accept(make_event("c", 10)) == "broker"
        sent["c"].append("c/10")
    finally:
        await stack.close()
        await conn.close()
    got = await read_queue(amqp_url)
    delivery = check_delivery(sent, got)
    assert delivery.ok, delivery


async def test_a_full_spool_refuses(tmp_path: Path) -> None:
    """No broker at all: events are spooled up to the bound, then refused (the ingress's 503),
    and what was spooled is still there after a restart."""
    settings = make_settings(CLOSED_PORT_URL, tmp_path, spool={
        "path": str(tmp_path / "spool.sqlite3"), "max_messages": 3,
    })  # fmt: skip
    stack = await open_stack(settings, connect=False)
    try:
        outcomes = [await stack.sink.accept(make_event("c", n)) for n in range(3)]
        assert outcomes == ["spool"] * 3
        assert stack.sink.status()["mode"] == "full"
        with pytest.raises(SpoolFull) as info:
            await stack.sink.accept(make_event("c", 3))
        assert info.value.reason == "messages"
        assert stack.metric("simotel_bridge_spool_full_total", reason="messages") == 1
        assert stack.metric("simotel_bridge_spooled_total", reason="broker_down") == 1
        assert stack.metric("simotel_bridge_spool_depth") == 3
        assert stack.sink.oldest_age() >= 0
    finally:
        await stack.close()
    spool = await asyncio.to_thread(Spool, settings.spool.path, max_messages=3, max_bytes=1 << 20)
    assert [s.event.message_id for s in spool.peek(10)] == ["c/0", "c/1", "c/2"]
    spool.close()


async def test_without_a_spool_a_failed_publish_is_refused(tmp_path: Path) -> None:
    settings = make_settings(CLOSED_PORT_URL, tmp_path, spool={"enabled": False})
    stack = await open_stack(settings, connect=False)
    try:
        assert stack.sink.status()["mode"] == "broker"
        with pytest.raises(SpoolFull) as info:
            await stack.sink.accept(make_event("c", 0))
        assert info.value.reason == "disabled"
    finally:
        await stack.close()


async def test_a_closed_sink_refuses(tmp_path: Path) -> None:
    stack = await open_stack(make_settings(CLOSED_PORT_URL, tmp_path), connect=False)
    await stack.close()
    with pytest.raises(SpoolFull):
        await stack.sink.accept(make_event("c", 0))


def test_the_replay_window_never_holds_two_events_of_one_call() -> None:
    events = [make_event("a", 0), make_event("b", 0), make_event("c", 0), make_event("a", 1)]
    batch = [Spooled(seq=i, spooled_at=0.0, event=e) for i, e in enumerate(events)]
    assert [s.seq for s in ordered_window(batch)] == [0, 1, 2]
    # Events without a call id are kept in order per routing key.
    loose = [replace(make_event("x", n), call_id=None) for n in range(2)]
    batch = [Spooled(seq=i, spooled_at=0.0, event=e) for i, e in enumerate(loose)]
    assert [s.seq for s in ordered_window(batch)] == [0]
    assert ordered_window([]) == []
