"""The event ingress end to end: HTTP in, the real RabbitMQ out."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from bridge.amqp import Broker, Publisher
from bridge.config import Settings
from bridge.ingress import create_app
from bridge.metrics import Metrics
from bridge.sink import EventSink, SpoolMetrics
from tests.helpers.env import FIXTURES, make_settings
from tests.helpers.taps import drain, tap

pytestmark = pytest.mark.broker

EVENT_FIXTURES = sorted(FIXTURES.glob("event-*.json"))
AUTH = ("simotel", "secret")


@dataclass
class Ingress:
    """The ingress app as `simotel-bridge ingress` builds it (the real sink, with its spool),
    driven in-process over ASGI."""

    client: httpx.AsyncClient
    settings: Settings
    metrics: Metrics
    sink: EventSink
    broker: Broker
    publisher: Publisher

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.sink.close()
        await self.publisher.close()
        await self.broker.close()


async def start_ingress(settings: Settings, client_ip: str = "127.0.0.1") -> Ingress:
    broker = Broker(settings.amqp, history=settings.history)
    await broker.connect()
    publisher = Publisher(broker)
    await publisher.start()
    metrics = Metrics()
    sink = await EventSink.open(
        settings, publisher, SpoolMetrics(metrics.registry), confirm_latency=metrics.confirm_latency
    )
    app = create_app(settings, sink=sink, metrics=metrics, broker_ready=lambda: broker.ready)
    transport = httpx.ASGITransport(app=app, client=(client_ip, 40000))
    client = httpx.AsyncClient(transport=transport, base_url="http://bridge")
    return Ingress(client, settings, metrics, sink, broker, publisher)


@pytest.fixture
async def ingress(settings: Settings) -> AsyncIterator[Ingress]:
    ing = await start_ingress(settings)
    try:
        yield ing
    finally:
        await ing.aclose()


def _as_string(value: Any) -> str:
    """How a value travels in a query string or form: nested values as JSON text."""
    if isinstance(value, dict | list):
        return json.dumps(value)
    if value is None:
        return ""
    return str(value)


def _fixture(path: Path) -> tuple[str, dict[str, Any], bytes]:
    name = path.stem.removeprefix("event-")
    raw = path.read_bytes()
    return name, orjson.loads(raw), raw


async def _send(client: httpx.AsyncClient, form: str, name: str, raw: bytes) -> httpx.Response:
    fields = orjson.loads(raw)
    flat = {k: _as_string(v) for k, v in fields.items()}
    json_headers = {"content-type": "application/json"}
    if form == "g4-json":
        return await client.post(
            "/webhooks/simotel/events", content=raw, headers=json_headers, auth=AUTH
        )
    if form == "rest4-json":
        return await client.post(
            f"/webhooks/simotel/events/{name}", content=raw, headers=json_headers, auth=AUTH
        )
    if form == "get-query":
        return await client.get(f"/webhooks/simotel/events/{name}?{urlencode(flat)}", auth=AUTH)
    if form == "form-post":
        return await client.post("/webhooks/simotel/events/", data=flat, auth=AUTH)
    raise AssertionError(form)


FORMS = ("g4-json", "rest4-json", "get-query", "form-post")


async def test_every_fixture_in_every_form_arrives_intact(
    ingress: Ingress, amqp: AbstractRobustConnection
) -> None:
    sent: list[tuple[str, str, dict[str, Any], bytes, str, float]] = []
    async with tap(amqp, "simotel.events", "#") as t:
        for path in EVENT_FIXTURES:
            name, fields, raw = _fixture(path)
            for form in FORMS:
                before = time.time()
                response = await _send(ingress.client, form, name, raw)
                assert response.status_code == 200, (path.name, form, response.text)
                sent.append((name, form, fields, raw, response.json()["message_id"], before))
        messages = await t.wait_for(len(sent))
    assert len(messages) == len(sent)
    by_id = {m.message_id: m for m in messages}
    assert len(by_id) == len(sent), "message ids must be unique"
    for name, form, fields, raw, message_id, before in sent:
        m = by_id[message_id]
        assert m.routing_key == f"simotel.{name}", (name, form)
        if form.endswith("json"):
            assert m.body == raw  # byte for byte, JSON types kept
        else:
            assert orjson.loads(m.body) == {k: _as_string(v) for k, v in fields.items()}
        _assert_contract_properties(m, name, fields, before)


def _assert_contract_properties(
    m: AbstractIncomingMessage, name: str, fields: dict[str, Any], before: float
) -> None:
    assert m.delivery_mode == 2  # persistent
    assert m.content_type == "application/json"
    assert m.type == name
    assert m.app_id == "simotel-bridge"
    assert m.timestamp is not None
    headers = m.headers
    assert headers["source"] == "simotel"
    assert headers["event"] == name
    received = datetime.fromisoformat(str(headers["received_at"]))
    assert received.utcoffset() is not None and not received.utcoffset()
    assert before - 1 <= received.timestamp() <= time.time() + 1
    expected_call = fields.get("unique_id") or fields.get("cuid")
    if expected_call:
        assert headers["call_id"] == str(expected_call)
    else:
        assert "call_id" not in headers


async def test_rest_path_name_any_case_and_cdr_spelling(
    ingress: Ingress, amqp: AbstractRobustConnection
) -> None:
    async with tap(amqp, "simotel.events", "#") as t:
        r1 = await ingress.client.get(
            "/webhooks/simotel/events/newstate?event_name=NewState&exten=991&state=Unavailable",
            auth=AUTH,
        )
        r2 = await ingress.client.post(
            "/webhooks/simotel/events", json={"event_name": "CDR", "cuid": "7.7"}, auth=AUTH
        )
        r3 = await ingress.client.post(
            "/webhooks/simotel/events", json={"event_name": "Totally-New"}, auth=AUTH
        )
        assert [r.status_code for r in (r1, r2, r3)] == [200, 200, 200]
        messages = await t.wait_for(3)
    assert [m.routing_key for m in messages] == [
        "simotel.NewState",
        "simotel.Cdr",
        "simotel.Totally_New",
    ]
    assert messages[1].headers["call_id"] == "7.7"


async def test_two_sources_are_kept_apart(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(
        amqp_url,
        tmp_path,
        sources={
            "simotel": {"webhook": {"username": "simotel", "password": "secret"}},
            "tehran": {"webhook": {"username": "teh", "password": "other-secret"}},
        },
    )
    ing = await start_ingress(settings)
    try:
        async with (
            tap(amqp, "simotel.events", "tehran.#") as tehran,
            tap(amqp, "simotel.events", "simotel.#") as main,
        ):
            body = {"event_name": "Cdr", "unique_id": "1.1"}
            crossed = await ing.client.post(
                "/webhooks/tehran/events", json=body, auth=("simotel", "secret")
            )
            assert crossed.status_code == 401
            ok_t = await ing.client.post(
                "/webhooks/tehran/events", json=body, auth=("teh", "other-secret")
            )
            ok_s = await ing.client.post("/webhooks/simotel/events", json=body, auth=AUTH)
            assert (ok_t.status_code, ok_s.status_code) == (200, 200)
            got_t = await tehran.wait_for(1)
            got_s = await main.wait_for(1)
        assert [m.routing_key for m in got_t] == ["tehran.Cdr"]
        assert got_t[0].headers["source"] == "tehran"
        assert [m.routing_key for m in got_s] == ["simotel.Cdr"]
        assert got_t[0].message_id == ok_t.json()["message_id"]
    finally:
        await ing.aclose()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_refusals_publish_nothing(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(
        amqp_url,
        tmp_path,
        http={"max_body_bytes": 2048},
        sources={
            "simotel": {"webhook": {"username": "simotel", "password": "secret"}},
            "locked": {
                "webhook": {
                    "username": "simotel",
                    "password": "secret",
                    "allowed_ips": ["10.1.0.0/16"],
                }
            },
        },
    )
    ing = await start_ingress(settings)
    c = ing.client
    good = {"event_name": "Cdr", "unique_id": "1.1"}
    cases: list[tuple[int, str, httpx.Response]] = []
    try:
        async with tap(amqp, "simotel.events", "#") as t:
            for status, reason, response in [
                (401, "unauthorized", await c.post("/webhooks/simotel/events", json=good)),
                (401, "unauthorized", await c.post(
                    "/webhooks/simotel/events", json=good, auth=("simotel", "wrong"))),
                (401, "unauthorized", await c.post(
                    "/webhooks/simotel/events", json=good, auth=("other", "secret"))),
                (401, "unauthorized", await c.post(
                    "/webhooks/simotel/events", json=good,
                    headers={"authorization": "Basic !!notbase64"})),
                (401, "unauthorized", await c.post(
                    "/webhooks/simotel/events", json=good,
                    headers={"authorization": _basic("simotel", "secret") + "x"})),
                (403, "address_not_allowed", await c.post(
                    "/webhooks/locked/events", json=good, auth=AUTH)),
                (404, "unknown_source", await c.post(
                    "/webhooks/nosuch/events", json=good, auth=AUTH)),
                (400, "invalid_json", await c.post(
                    "/webhooks/simotel/events", content=b"{oops",
                    headers={"content-type": "application/json"}, auth=AUTH)),
                (400, "empty_payload", await c.post("/webhooks/simotel/events", auth=AUTH)),
                (400, "empty_payload", await c.get("/webhooks/simotel/events", auth=AUTH)),
                (400, "no_event_name", await c.post(
                    "/webhooks/simotel/events", json={"unique_id": "1.1"}, auth=AUTH)),
                (413, "too_large", await c.post(
                    "/webhooks/simotel/events",
                    json={"event_name": "Cdr", "pad": "x" * 3000}, auth=AUTH)),
                (400, "event_name_too_long", await c.post(
                    "/webhooks/simotel/events/" + "X" * 300, json={"a": "1"}, auth=AUTH)),
            ]:  # fmt: skip
                cases.append((status, reason, response))
            # The sentinel: published after every refusal on the same channel, so if any
            # refusal had published, it would arrive first.
            sentinel = await c.post(
                "/webhooks/simotel/events", json={"event_name": "Ping"}, auth=AUTH
            )
            assert sentinel.status_code == 200
            arrived = await t.wait_for(1)
        for status, reason, response in cases:
            assert response.status_code == status, (reason, response.text)
            assert response.json()["error"] == reason
        assert cases[0][2].headers["www-authenticate"].startswith("Basic")
        assert [m.message_id for m in arrived] == [sentinel.json()["message_id"]]
        assert await drain(amqp, "simotel.unrouted") == []
        metrics = (await c.get("/metrics")).text
        assert 'simotel_bridge_webhooks_rejected_total{reason="unauthorized"} 5.0' in metrics
        assert 'simotel_bridge_webhooks_rejected_total{reason="too_large"} 1.0' in metrics
    finally:
        await ing.aclose()


async def test_trusted_proxy_forwarded_address(amqp_url: str, tmp_path: Path) -> None:
    settings = make_settings(
        amqp_url,
        tmp_path,
        http={"trusted_proxies": ["127.0.0.1/32"]},
        sources={
            "simotel": {
                "webhook": {
                    "username": "simotel",
                    "password": "secret",
                    "allowed_ips": ["10.1.2.0/24"],
                }
            }
        },
    )
    ing = await start_ingress(settings)
    try:
        body = {"event_name": "Ping"}
        allowed = await ing.client.post(
            "/webhooks/simotel/events",
            json=body,
            auth=AUTH,
            headers={"x-forwarded-for": "10.1.2.3"},
        )
        spoofed = await ing.client.post(
            "/webhooks/simotel/events",
            json=body,
            auth=AUTH,
            headers={"x-forwarded-for": "10.1.2.3, 192.0.2.9"},
        )
        # The same hops as two header lines (a proxy adding its own line after the client's).
        two_lines = await ing.client.post(
            "/webhooks/simotel/events",
            json=body,
            auth=AUTH,
            headers=[("x-forwarded-for", "10.1.2.3"), ("x-forwarded-for", "192.0.2.9")],
        )
        assert two_lines.status_code == 403
        direct = await ing.client.post("/webhooks/simotel/events", json=body, auth=AUTH)
        assert allowed.status_code == 200
        assert spoofed.status_code == 403  # the nearest untrusted hop is 192.0.2.9
        assert direct.status_code == 403  # the proxy itself is not in the allow-list
    finally:
        await ing.aclose()

    # Without a trusted proxy, X-Forwarded-For is ignored.
    untrusting = make_settings(
        amqp_url,
        tmp_path,
        sources=settings.model_dump(mode="json", include={"sources"})["sources"]
        | {"simotel": {"webhook": {"username": "simotel", "password": "secret",
                                   "allowed_ips": ["10.1.2.0/24"]}}},
    )  # fmt: skip
    ing = await start_ingress(untrusting)
    try:
        forged = await ing.client.post(
            "/webhooks/simotel/events",
            json={"event_name": "Ping"},
            auth=AUTH,
            headers={"x-forwarded-for": "10.1.2.3"},
        )
        assert forged.status_code == 403
    finally:
        await ing.aclose()


async def test_cdr_consumer_gets_only_cdr_and_unbound_events_are_kept(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    # History off: then nothing else is bound to the events exchange, and what the Cdr consumer
    # does not take goes to simotel.unrouted. (With history on, the stream keeps every event, so
    # nothing is unroutable: tests/test_history.py.)
    ingress = await start_ingress(make_settings(amqp_url, tmp_path, history={"enabled": False}))
    try:
        async with tap(amqp, "simotel.events", "*.Cdr") as cdr_only:
            for name in ("NewState", "Cdr", "IncomingCall", "Cdr"):
                r = await ingress.client.post(
                    "/webhooks/simotel/events",
                    json={"event_name": name, "unique_id": str(uuid.uuid4())},
                    auth=AUTH,
                )
                assert r.status_code == 200
            got = await cdr_only.wait_for(2)
    finally:
        await ingress.aclose()
    assert [m.routing_key for m in got] == ["simotel.Cdr", "simotel.Cdr"]
    unrouted = await drain(amqp, "simotel.unrouted")
    assert sorted(m.routing_key or "" for m in unrouted) == [
        "simotel.IncomingCall",
        "simotel.NewState",
    ]


async def test_health_and_readiness(ingress: Ingress) -> None:
    assert (await ingress.client.get("/healthz")).json() == {"status": "alive"}
    ready = await ingress.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["broker"] == "connected"
    metrics = await ingress.client.get("/metrics")
    assert "simotel_bridge_broker_connected 1.0" in metrics.text
