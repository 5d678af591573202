"""Logs: one JSON line per webhook with the fields an operator needs, and no secrets."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import structlog

from bridge import logs
from bridge.config import LogSettings, Settings
from bridge.ingress import create_app
from bridge.metrics import Metrics
from bridge.translate import OutgoingEvent
from tests.helpers.logstream import LogStream


class _Sink:
    async def accept(self, event: OutgoingEvent) -> str:
        return "broker"

    def status(self) -> dict[str, str]:
        return {"mode": "broker"}


def test_redaction_of_secret_keys_and_url_credentials() -> None:
    event = {
        "event": "x",
        "password": "hunter2",
        "api_key": "k",
        "Authorization": "Basic abc",
        "url": "amqp://guest:s3cret@host:5672/vh",
        "plain": "no secret here",
    }
    out = logs.redact(None, "info", dict(event))
    assert out["password"] == "***" and out["api_key"] == "***" and out["Authorization"] == "***"
    assert out["url"] == "amqp://***:***@host:5672/vh"
    assert out["plain"] == "no secret here"


async def test_one_json_line_per_webhook_without_secrets(tmp_path: Path) -> None:
    stream = LogStream()
    logs.configure(LogSettings(level="info", format="json"), stream=stream)
    try:
        settings = Settings.model_validate(
            {
                "amqp": {"url": "amqp://guest:amqp-secret@127.0.0.1:5672/"},
                "sources": {"simotel": {"webhook": {"username": "simotel", "password": "pw-1"}}},
            }
        )
        app = create_app(settings, sink=_Sink(), metrics=Metrics())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
            ok = await client.post(
                "/webhooks/simotel/events",
                json={"event_name": "Cdr", "unique_id": "1.5"},
                auth=("simotel", "pw-1"),
            )
            bad = await client.post(
                "/webhooks/simotel/events", json={"event_name": "Cdr"}, auth=("simotel", "pw-2")
            )
            logging.getLogger("third.party").warning(
                "connecting to %s", "amqp://guest:amqp-secret@127.0.0.1/"
            )
        assert (ok.status_code, bad.status_code) == (200, 401)
        lines = stream.lines()
        hooks = [line for line in lines if line.get("event") == "webhook"]
        assert len(hooks) == 2
        first = hooks[0]
        assert first["source"] == "simotel"
        assert first["event_name"] == "Cdr"
        assert first["message_id"] == ok.json()["message_id"]
        assert first["call_id"] == "1.5"
        assert first["outcome"] == "broker"
        assert isinstance(first["duration_ms"], float)
        assert hooks[1]["outcome"] == "unauthorized"
        everything = stream.text()
        assert "third.party" in everything
        for secret in ("pw-1", "pw-2", "amqp-secret"):
            assert secret not in everything
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
