"""The history stream: declared with the topology as configured, fed by the events exchange, and
read back as exact time windows (bridge.history) from the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from bridge import topology
from bridge.amqp import Broker, Publisher
from bridge.config import AmqpSettings, HistorySettings, Settings
from bridge.errors import ConfigError
from bridge.history import (
    HISTORY_STREAM,
    MARKER_TYPE,
    HistoryError,
    history_window,
    in_window,
    parse_when,
    topic_matches,
)
from bridge.runtime import serve
from bridge.translate import Payload, build_event
from tests.helpers.broker_node import free_port
from tests.helpers.env import make_settings
from tests.helpers.taps import drain, tap

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
SOURCES = ("simotel", "tehran")
EVENTS = ("Cdr", "NewState", "IncomingCall", "Cdr", "Hangup")


# ------------------------------------------------------------------------------ pure parts


def test_parse_when_relative_absolute_and_now() -> None:
    assert parse_when("now", NOW) == NOW
    assert parse_when("10m", NOW) == NOW - timedelta(minutes=10)
    assert parse_when("2h", NOW) == NOW - timedelta(hours=2)
    assert parse_when("1h30m", NOW) == NOW - timedelta(minutes=90)
    assert parse_when("7d", NOW) == NOW - timedelta(days=7)
    assert parse_when("1w", NOW) == NOW - timedelta(days=7)
    assert parse_when("90s", NOW) == NOW - timedelta(seconds=90)
    assert parse_when("2026-12-01T09:30:00Z") == datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    tehran = parse_when("2026-12-01T13:00:00+03:30")
    assert tehran == datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    local = parse_when("2026-12-01T09:30")  # no zone: the machine's local time
    assert local == datetime(2026, 12, 1, 9, 30).astimezone().astimezone(UTC)
    assert parse_when("2026-12-01").tzinfo is UTC
    for bad in ("", "yesterday", "10x", "-5m", "h", "1" * 80, "2026-13-01"):
        with pytest.raises(ValueError):
            parse_when(bad, NOW)


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("#", "simotel.Cdr", True),
        ("*.Cdr", "simotel.Cdr", True),
        ("*.Cdr", "tehran.Cdr", True),
        ("*.Cdr", "simotel.NewState", False),
        ("*.Cdr", "simotel.Cdr.x", False),
        ("tehran.#", "tehran.Cdr", True),
        ("tehran.#", "tehran", True),  # `#` is zero or more words
        ("tehran.#", "simotel.Cdr", False),
        ("simotel.*", "simotel", False),
        ("#.Cdr", "a.b.Cdr", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
        ("simotel.Cdr", "simotel.Cdr", True),
        ("simotel.Cdr", "simotel.cdr", False),
    ],
)
def test_topic_matching_is_amqp_topic_matching(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


def test_the_window_is_half_open_and_needs_a_time() -> None:
    since, until = NOW - timedelta(minutes=10), NOW
    assert in_window("s.Cdr", since, since, until, "#")
    assert not in_window("s.Cdr", until, since, until, "#")
    assert not in_window("s.Cdr", since - timedelta(microseconds=1), since, until, "#")
    assert in_window("s.Cdr", NOW + timedelta(days=1), since, None, "#")
    assert not in_window("s.Cdr", None, since, None, "#")
    assert not in_window("s.NewState", NOW - timedelta(minutes=1), since, until, "*.Cdr")


def test_the_stream_is_in_the_topology_as_configured() -> None:
    amqp = AmqpSettings()
    assert HISTORY_STREAM not in {q.name for q in topology.build(amqp).queues}
    off = topology.build(amqp, HistorySettings(enabled=False))
    assert off == topology.build(amqp)
    topo = topology.build(amqp, HistorySettings(max_age="36h", max_bytes=2 * 1024**3))
    (stream,) = [q for q in topo.queues if q.name == HISTORY_STREAM]
    assert stream.arguments == {
        "x-queue-type": "stream",
        "x-max-age": "36h",
        "x-max-length-bytes": 2 * 1024**3,
        "x-stream-max-segment-size-bytes": 100 * 1024 * 1024,
    }
    assert topology.Binding(HISTORY_STREAM, "simotel.events", "#") in topo.bindings
    tehran = topology.build(amqp, HistorySettings(pattern="tehran.#"))
    assert topology.Binding(HISTORY_STREAM, "simotel.events", "tehran.#") in tehran.bindings


def test_history_settings_are_validated() -> None:
    assert HistorySettings().max_age == "7D"
    for bad in ("7", "7days", "0D", "D", "-1D"):
        with pytest.raises(ValueError):
            HistorySettings(max_age=bad)
    with pytest.raises(ValueError):
        HistorySettings(max_bytes=10)


def test_the_client_module_imports_only_aio_pika_and_orjson() -> None:
    code = (
        "import sys, bridge.history\n"
        "heavy = {'pydantic', 'yaml', 'prometheus_client', 'starlette', 'httpx', 'structlog',"
        " 'uvicorn', 'bridge.config'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------- against the broker


@dataclass(frozen=True)
class Sent:
    message_id: str
    routing_key: str
    received: datetime


async def open_publisher(settings: Settings) -> tuple[Broker, Publisher]:
    broker = Broker(settings.amqp, history=settings.history)
    await broker.connect()
    publisher = Publisher(broker)
    await publisher.start()
    return broker, publisher


async def publish_spread(
    settings: Settings, count: int, start: datetime, step: timedelta
) -> list[Sent]:
    """`count` events as the ingress builds them, received at synthetic times `start + i*step`
    (the filter uses each event's own receive time, so no real waiting is needed), over both
    sources and several event names. Published (confirmed) in the order of their times."""
    broker, publisher = await open_publisher(settings)
    sent: list[Sent] = []
    try:
        for i in range(count):
            source, name = SOURCES[i % 2], EVENTS[i % len(EVENTS)]
            when = start + i * step
            event = build_event(
                settings.amqp.exchanges.events,
                source,
                name,
                Payload({"event_name": name, "n": i, "unique_id": f"17000.{i}"}, "json"),
                now=when.timestamp(),
            )
            await publisher.publish(event.exchange, event.routing_key, event.to_message())
            sent.append(Sent(event.message_id, event.routing_key, when))
    finally:
        await publisher.close()
        await broker.close()
    return sent


async def read(
    url: str, since: datetime, until: datetime | None = None, pattern: str = "#", **kw: object
) -> list[AbstractIncomingMessage]:
    async with asyncio.timeout(60):  # the window ends by itself; this only bounds a failure
        return [m async for m in history_window(url, since, until, pattern, **kw)]  # type: ignore[arg-type]


def ids(messages: list[AbstractIncomingMessage]) -> list[str | None]:
    return [m.message_id for m in messages]


@pytest.fixture
def history_settings(amqp_url: str, tmp_path: Path) -> Settings:
    return make_settings(amqp_url, tmp_path, history={"max_age": "2D", "max_bytes": 50_000_000})


@pytest.fixture
async def thousand(history_settings: Settings) -> tuple[datetime, list[Sent]]:
    """1,000 events received one every 6 s over the 100 minutes before now."""
    now = datetime.now(UTC)
    start = now - timedelta(minutes=100)
    return now, await publish_spread(history_settings, 1000, start, timedelta(seconds=6))


@pytest.mark.broker
async def test_a_late_consumer_replays_exactly_the_last_minutes_in_order(
    history_settings: Settings, thousand: tuple[datetime, list[Sent]]
) -> None:
    now, sent = thousand
    url = history_settings.amqp.url.get_secret_value()
    since = now - timedelta(minutes=30)
    got = await read(url, since)
    expected = [s for s in sent if s.received >= since]
    assert 290 <= len(expected) <= 310
    assert ids(got) == [s.message_id for s in expected]
    first = got[0]
    assert first.routing_key == expected[0].routing_key and first.type in EVENTS
    assert first.app_id == "simotel-bridge" and first.content_type == "application/json"
    assert first.headers["received_at"] == expected[0].received.isoformat(timespec="microseconds")
    assert orjson.loads(first.body)["unique_id"] == first.headers["call_id"]


@pytest.mark.broker
async def test_pattern_and_until_select_exactly(
    history_settings: Settings, thousand: tuple[datetime, list[Sent]]
) -> None:
    now, sent = thousand
    url = history_settings.amqp.url.get_secret_value()
    since, until = now - timedelta(minutes=60), now - timedelta(minutes=45)
    cdr = await read(url, since, until, "*.Cdr")
    expected = [s for s in sent if since <= s.received < until and s.routing_key.endswith(".Cdr")]
    assert len(expected) > 50
    assert ids(cdr) == [s.message_id for s in expected]
    tehran = await read(url, now - timedelta(hours=3), None, "tehran.#")
    assert ids(tehran) == [s.message_id for s in sent if s.routing_key.startswith("tehran.")]
    assert await read(url, now + timedelta(minutes=1)) == []  # a window in the future is empty


@pytest.mark.broker
async def test_events_published_late_are_in_their_window_and_markers_never_show(
    history_settings: Settings,
) -> None:
    """A spooled event is published after later ones but belongs to the time it was received."""
    now = datetime.now(UTC)
    late = await publish_spread(history_settings, 3, now - timedelta(minutes=5), timedelta(0))
    early = await publish_spread(history_settings, 3, now - timedelta(hours=2), timedelta(0))
    url = history_settings.amqp.url.get_secret_value()
    assert ids(await read(url, now - timedelta(hours=3))) == ids_of(late + early)
    assert ids(await read(url, now - timedelta(minutes=10))) == ids_of(late)
    # Two readers appended two markers; nobody reading a window sees them.
    raw = await read(url, now - timedelta(hours=3))
    assert all(m.type != MARKER_TYPE for m in raw)


def ids_of(sent: list[Sent]) -> list[str | None]:
    return [s.message_id for s in sent]


@pytest.mark.broker
async def test_the_broker_starts_at_the_time_offset(history_settings: Settings) -> None:
    """A real time gap: events before it carry (forged) receive times inside the window, so
    had the broker delivered them they would be yielded. It does not: the stream is entered at
    the timestamp, not read from the start."""
    now = datetime.now(UTC)
    forged = await publish_spread(history_settings, 5, now + timedelta(hours=1), timedelta(0))
    before = time.monotonic()
    await asyncio.sleep(2.5)  # not waiting for anything: the gap in time is what is tested
    assert time.monotonic() - before >= 2.5
    since = datetime.now(UTC) - timedelta(seconds=1.2)
    after = await publish_spread(history_settings, 5, now + timedelta(hours=1), timedelta(0))
    url = history_settings.amqp.url.get_secret_value()
    got = await read(url, since, skew=timedelta(0))
    assert ids(got) == ids_of(after)
    assert ids(await read(url, since)) == ids_of(forged + after)  # with the clock-skew margin


@pytest.mark.broker
async def test_following_goes_on_live_after_the_history(history_settings: Settings) -> None:
    now = datetime.now(UTC)
    old = await publish_spread(history_settings, 4, now - timedelta(minutes=3), timedelta(0))
    url = history_settings.amqp.url.get_secret_value()
    caught_up = asyncio.Event()
    got: list[AbstractIncomingMessage] = []

    async def follow() -> None:
        window = history_window(
            url, now - timedelta(minutes=10), pattern="*.Cdr", follow=True, caught_up=caught_up
        )
        async with contextlib.aclosing(window):  # left early: closed here, not at loop end
            async for message in window:
                got.append(message)
                if len(got) == len([s for s in old if s.routing_key.endswith("Cdr")]) + 1:
                    return

    task = asyncio.create_task(follow())
    await asyncio.wait_for(caught_up.wait(), 30)
    new = await publish_spread(history_settings, 1, datetime.now(UTC), timedelta(0))
    await asyncio.wait_for(task, 30)
    assert ids(got) == [s.message_id for s in old + new if s.routing_key.endswith("Cdr")]


@pytest.mark.broker
async def test_without_history_there_is_no_stream_and_reading_says_so(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(amqp_url, tmp_path, history={"enabled": False})
    await publish_spread(settings, 2, datetime.now(UTC), timedelta(0))
    with pytest.raises(HistoryError, match="history enabled"):
        await read(amqp_url, datetime.now(UTC) - timedelta(hours=1))
    # ... and events nobody is bound to are kept in the unrouted queue, as before
    assert len(await drain(amqp, "simotel.unrouted")) == 2


@pytest.mark.broker
async def test_with_history_every_event_is_routable_so_unrouted_stays_empty(
    history_settings: Settings, amqp: AbstractRobustConnection
) -> None:
    sent = await publish_spread(history_settings, 3, datetime.now(UTC), timedelta(0))
    assert await drain(amqp, "simotel.unrouted") == []
    url = history_settings.amqp.url.get_secret_value()
    assert ids(await read(url, datetime.now(UTC) - timedelta(hours=1))) == ids_of(sent)


def _queue_info(vhost: str) -> dict[str, Any]:
    exe = "rabbitmqctl"
    out = subprocess.run(
        [exe, "list_queues", "-p", vhost, "-q", "--formatter", "json", "name", "type", "arguments"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return {q["name"]: q for q in orjson.loads(out.stdout)}


@pytest.mark.broker
async def test_retention_arguments_on_the_broker_are_the_configured_ones(
    history_settings: Settings, vhost: str, amqp_url: str, tmp_path: Path
) -> None:
    broker, publisher = await open_publisher(history_settings)
    await publisher.close()
    await broker.close()
    info = (await asyncio.to_thread(_queue_info, vhost))[HISTORY_STREAM]
    assert info["type"] == "stream"
    args = {name: value for name, _type, value in info["arguments"]}  # [name, type, value]
    assert args["x-max-age"] == "2D"
    assert args["x-max-length-bytes"] == 50_000_000
    assert args["x-stream-max-segment-size-bytes"] == 12_500_000
    # Other retention on an existing stream: a start-up error that says what to do.
    changed = make_settings(amqp_url, tmp_path, history={"max_age": "30D"})
    broker = Broker(changed.amqp, history=changed.history)
    with pytest.raises(ConfigError, match="policy") as caught:
        await broker.connect()
    assert caught.value.problems[0][0] == "history"
    await broker.close()


@pytest.mark.broker
async def test_what_the_ingress_accepts_is_kept_with_its_properties(
    history_settings: Settings, amqp: AbstractRobustConnection
) -> None:
    """Through the real HTTP ingress: every accepted webhook is in the stream, exactly as a
    consumer bound at the time received it; none of them is unroutable any more."""
    from tests.test_ingress import AUTH, start_ingress

    since = datetime.now(UTC) - timedelta(seconds=1)
    ingress = await start_ingress(history_settings)
    try:
        async with tap(amqp, "simotel.events", "*.Cdr") as live:
            accepted = []
            for name in ("NewState", "Cdr", "IncomingCall"):
                body = {"event_name": name, "unique_id": f"1700.{name}"}
                r = await ingress.client.post("/webhooks/simotel/events", json=body, auth=AUTH)
                assert r.status_code == 200
                accepted.append(r.json()["message_id"])
            (cdr,) = await live.wait_for(1)
    finally:
        await ingress.aclose()
    assert await drain(amqp, "simotel.unrouted") == []
    url = history_settings.amqp.url.get_secret_value()
    kept = await read(url, since)
    assert ids(kept) == accepted
    (stored,) = [m for m in kept if m.message_id == cdr.message_id]
    for name in ("routing_key", "exchange", "body", "type", "app_id", "timestamp", "delivery_mode"):
        assert getattr(stored, name) == getattr(cdr, name), name
    headers = dict(stored.headers)
    offset = headers.pop("x-stream-offset")
    assert isinstance(offset, int) and offset >= 0
    assert headers == cdr.headers


@pytest.mark.broker
async def test_metrics_give_the_oldest_age_and_a_count(history_settings: Settings) -> None:
    from prometheus_client import CollectorRegistry

    from bridge.historystats import HistoryMetrics, refresh

    now = datetime.now(UTC)
    await publish_spread(history_settings, 1, now, timedelta(0))  # declares the stream
    metrics = HistoryMetrics(CollectorRegistry())
    url = history_settings.amqp.url.get_secret_value()
    connection = await aio_pika.connect(url)
    async with connection:
        await refresh(connection, metrics)
        assert metrics.events._value.get() == 1
        assert 0 <= metrics.oldest_age._value.get() < 120
    # The metrics as the ingress serves them, refreshed in the background from the start.
    port = free_port()
    settings = history_settings.model_copy(
        update={"http": history_settings.http.model_copy(update={"port": port})}
    )
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, frozenset({"ingress"}), stop))
    try:
        async with httpx.AsyncClient() as client, asyncio.timeout(60):
            while True:
                if server.done():
                    server.result()
                try:
                    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                except httpx.TransportError:
                    text = ""
                if "simotel_bridge_history_events 1.0" in text:
                    break
                await asyncio.sleep(0.1)  # a background refresh: nothing to await from here
        assert "simotel_bridge_history_oldest_event_age_seconds" in text
    finally:
        stop.set()
        await asyncio.wait_for(server, 60)


@pytest.mark.broker
async def test_a_lost_connection_ends_a_read_with_history_error(
    history_settings: Settings, vhost: str
) -> None:
    await publish_spread(history_settings, 2, datetime.now(UTC), timedelta(0))
    url = history_settings.amqp.url.get_secret_value()
    caught_up = asyncio.Event()

    async def follow() -> None:
        since = datetime.now(UTC) - timedelta(hours=1)
        async for _ in history_window(url, since, follow=True, caught_up=caught_up):
            pass

    task = asyncio.create_task(follow())
    await asyncio.wait_for(caught_up.wait(), 30)
    await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "close_all_connections", "-p", vhost, "test: connection lost"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    with pytest.raises(HistoryError, match="CONNECTION_FORCED"):
        await asyncio.wait_for(task, 30)
