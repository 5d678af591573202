"""The wire budget against the real RabbitMQ: no input can make the bridge send a frame the
broker refuses, so the connection every request shares is never cut by one request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection
from structlog.testing import capture_logs

from tests.helpers.attack import AUTH, NORMAL_EVENT, FullBridge, full_settings
from tests.helpers.taps import tap

pytestmark = pytest.mark.broker

HUGE_APP_NAME = "a" * 300_000  # the body stays under http.max_body_bytes (1 MiB)


@pytest.fixture
async def audited(amqp_url: str, tmp_path: Path) -> AsyncIterator[FullBridge]:
    fb = await FullBridge.start(full_settings(amqp_url, tmp_path, publish_as_event=True))
    try:
        yield fb
    finally:
        await fb.aclose()


async def test_a_huge_app_name_never_cuts_the_shared_connection(
    audited: FullBridge, amqp: AbstractRobustConnection
) -> None:
    request = {"app_name": HUGE_APP_NAME, "unique_id": "1610778618.378", "src": "09120000000"}
    async with tap(amqp, "simotel.events", "simotel.#") as events:
        for _ in range(3):
            with capture_logs() as lines:
                r, elapsed = await audited.component("SmartApi", request)
            assert r.status_code == 200 and r.json() == {"ok": "0"}
            assert elapsed < 1.0
            assert lines and all(len(repr(line)) < 2000 for line in lines)  # bounded logs too
        r = await audited.client.post("/webhooks/simotel/events", json=NORMAL_EVENT, auth=AUTH)
        assert r.status_code == 200
        got = await events.wait_for(4, timeout=5)
    assert audited.connection_intact(), audited.losses
    assert audited.sink.depth == 0  # nothing was left in the spool to be replayed forever
    normal = [m for m in got if m.routing_key == "simotel.NewState"]
    assert [orjson.loads(m.body) for m in normal] == [NORMAL_EVENT]
    audits = [m for m in got if m.routing_key == "simotel.ComponentSmartApi"]
    assert len(audits) == 3
    for m in audits:
        # The body keeps what Simotel sent; the header is cut and says so.
        assert orjson.loads(m.body)["app_name"] == HUGE_APP_NAME
        assert len(str(m.headers["app_name"]).encode()) <= 1024
        assert "app_name" in list(m.headers["truncated"])  # type: ignore[arg-type]


async def test_a_responder_for_a_long_app_name_gets_its_calls(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    """The bridge publishes to, and the responder binds, the same bounded key."""
    from bridge.responder import ComponentRequest, ExtenApiAnswer, Responder

    long_name = "campaign " + "x" * 400
    seen: list[str] = []

    async def route(req: ComponentRequest) -> ExtenApiAnswer:
        seen.append(req.app_name)
        return ExtenApiAnswer("120")

    fb = await FullBridge.start(full_settings(amqp_url, tmp_path))
    try:
        async with Responder(amqp) as responder:
            await responder.subscribe("ExtenApi", long_name, route)
            r, _ = await fb.component("ExtenApi", {"app_name": long_name, "src": "1"})
        assert r.json() == {"ok": "1", "extension": "120"}
        assert seen == [long_name]  # the body keeps the name whole
        assert fb.connection_intact()
    finally:
        await fb.aclose()
