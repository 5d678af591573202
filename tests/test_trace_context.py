"""W3C trace context: an incoming `traceparent` (webhook or command) is carried to everything it
causes; a webhook without one starts a trace. The pure builders first, then the real broker."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

import bridge.client
from bridge import wire
from bridge.commands import Envelope, Result, copied_headers, result_message
from bridge.components import component_event
from bridge.config import Settings
from bridge.settle import dead_letter
from bridge.translate import Payload, build_event
from tests.conftest import make_settings
from tests.helpers.taps import tap
from tests.helpers.worker import Bus, FakeSimotel, ok, reply, running_worker

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = TRACE.split("-")[1]


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "",
        TRACE.upper(),  # upper-case hex is invalid
        "ff" + TRACE[2:],  # version ff is forbidden
        "01" + TRACE[2:],  # a later version: its format is not ours to guess
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",  # all-zero parent id
        TRACE + "-extra",
        TRACE[:-1] + "\n",
        "x" * 5000,
    ],
)
def test_a_malformed_traceparent_is_dropped(value: object) -> None:
    assert wire.traceparent(value) is None


def test_a_valid_traceparent_is_kept_and_new_ones_are_valid_and_distinct() -> None:
    assert wire.traceparent(TRACE) == TRACE
    made = {wire.new_traceparent() for _ in range(100)}
    assert len({t.split("-")[1] for t in made}) == 100
    assert all(wire.traceparent(t) == t and t.endswith("-01") for t in made)


def _event(traceparent: object = None) -> dict[str, object]:
    payload = Payload({"event_name": "Cdr", "unique_id": "1.2"}, "json")
    return build_event("simotel.events", "simotel", "Cdr", payload, traceparent=traceparent).headers


def test_an_event_carries_the_webhooks_traceparent() -> None:
    assert _event(TRACE)[wire.TRACEPARENT] == TRACE


def test_an_event_without_a_valid_traceparent_starts_a_trace() -> None:
    first, second, bad = _event(), _event(), _event("00-nope")
    for headers in (first, second, bad):
        assert wire.traceparent(headers[wire.TRACEPARENT]) is not None
    assert first[wire.TRACEPARENT] != second[wire.TRACEPARENT]


def test_a_component_event_carries_the_requests_trace() -> None:
    event = component_event(
        "simotel.events", "simotel", "ExtenApi", {"app_name": "a"}, "m", "answered",
        {"ok": "1", "extension": "100"}, trace=TRACE,
    )  # fmt: skip
    assert event.headers[wire.TRACEPARENT] == TRACE


def test_results_and_dead_letters_carry_the_commands_traceparent() -> None:
    result = Result("m1", "pbx/users/add", "simotel", "error", error="x", reason="http")
    _, _, headers = result_message(result, {wire.TRACEPARENT: TRACE, "other": "x"})
    assert headers[wire.TRACEPARENT] == TRACE and "other" not in headers
    _, _, untraced = result_message(result, {wire.TRACEPARENT: "bogus"})
    assert wire.TRACEPARENT not in untraced
    assert wire.TRACEPARENT not in result_message(result)[2]
    # A command's headers too large to copy into its dead letter: the trace goes on anyway.
    big = {wire.TRACEPARENT: TRACE, "junk": "x" * 10_000}
    assert copied_headers(big) == {"headers_dropped": True, wire.TRACEPARENT: TRACE}
    letter = dead_letter(Envelope(body=b"{}", message_id="m1", headers=big), result)
    assert (letter.headers or {})[wire.TRACEPARENT] == TRACE


# --- against the real broker ---------------------------------------------------------------


async def test_a_command_result_and_reply_carry_its_traceparent(
    fake: FakeSimotel, cfg: Settings, bus: Bus
) -> None:
    fake.on("pbx/users/search", ok([]))
    async with running_worker(cfg):
        cid = await bus.send("pbx/users/search", {}, headers={wire.TRACEPARENT: TRACE})
        reply = await bus.reply(cid)
        published: AbstractIncomingMessage = await asyncio.wait_for(bus.results.get(), 60)
    assert (reply.headers or {})[wire.TRACEPARENT] == TRACE
    assert (published.headers or {})[wire.TRACEPARENT] == TRACE


async def test_a_command_sent_by_the_client_keeps_its_trace_to_the_dead_letter(
    fake: FakeSimotel, cfg: Settings, bus: Bus
) -> None:
    fake.on("pbx/users/add", reply(500, {"success": 0, "message": "down"}))
    async with running_worker(cfg):
        result = await bridge.client.send_command(
            cfg.amqp.url.get_secret_value(),
            "pbx/users/add",
            {"name": "x"},
            source="simotel",
            timeout=30,
            message_id="t-1",
            traceparent=TRACE,
        )
        letter = await bus.next_dead()
    assert result.status not in ("ok", "failed")  # so it is dead-lettered
    assert (letter.headers or {})[wire.TRACEPARENT] == TRACE
    assert (letter.headers or {})["status"] == result.status


async def test_a_webhook_trace_reaches_the_event_and_one_is_started_without(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    from tests.test_ingress import AUTH, start_ingress

    ingress = await start_ingress(make_settings(amqp_url, tmp_path))
    try:
        async with tap(amqp, "simotel.events", "#") as t:
            for headers in ({"traceparent": TRACE}, {}, {"traceparent": "00-bad"}):
                r = await ingress.client.post(
                    "/webhooks/simotel/events",
                    json={"event_name": "Cdr", "unique_id": "1.2"},
                    auth=AUTH,
                    headers=headers,
                )
                assert r.status_code == 200
            traced, started, replaced = await t.wait_for(3)
    finally:
        await ingress.aclose()
    assert (traced.headers or {})[wire.TRACEPARENT] == TRACE
    for message in (started, replaced):
        value = (message.headers or {})[wire.TRACEPARENT]
        assert wire.traceparent(value) == value and TRACE_ID not in str(value)


async def test_the_responder_gets_the_requests_trace_and_replies_with_it(
    amqp: AbstractRobustConnection,
) -> None:
    seen: list[str | None] = []

    async def route(req: bridge.client.ComponentRequest) -> bridge.client.ExtenApiAnswer:
        seen.append(req.traceparent)
        return bridge.client.ExtenApiAnswer("100")

    async with bridge.client.Responder(amqp) as responder:
        await responder.subscribe("ExtenApi", "a", route)
        channel = await amqp.channel()
        replies = await channel.declare_queue(exclusive=True)
        exchange = await channel.get_exchange(wire.COMPONENTS_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(
                b'{"app_name": "a", "src": "1", "dst": "2"}',
                correlation_id="c1",
                reply_to=replies.name,
                headers=wire.component_request_headers(
                    "simotel", "ExtenApi", "a", _soon(), None, TRACE
                ),
            ),
            wire.component_key("simotel", "ExtenApi", "a"),
        )
        async with replies.iterator() as it:
            reply = await asyncio.wait_for(it.__anext__(), 60)
    assert seen == [TRACE]
    assert (reply.headers or {})[wire.TRACEPARENT] == TRACE


def _soon() -> datetime:
    return datetime.fromtimestamp(time.time() + 30, UTC)
