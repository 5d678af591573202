"""The event webhooks' lean path (bridge/eventroute.py): every answer timed by status, the
access log sampled for accepted events only, refusals and failures always logged, and the
answers Starlette gave before (405, 404 off the routes) unchanged."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import structlog

from bridge import logs
from bridge.config import LogSettings, Settings
from bridge.errors import PublishError
from bridge.ingress import create_app
from bridge.logs import Sampler
from bridge.metrics import Metrics
from bridge.translate import OutgoingEvent
from tests.helpers.logstream import LogStream

AUTH = ("simotel", "pw-1")
CDR = {"event_name": "Cdr", "unique_id": "1.5"}


class _Sink:
    """A collaborator the app is given (the EventSink protocol), answering as told."""

    def __init__(self) -> None:
        self.fail: BaseException | None = None
        self.events: list[OutgoingEvent] = []

    async def accept(self, event: OutgoingEvent) -> str:
        if self.fail is not None:
            raise self.fail
        self.events.append(event)
        return "broker"

    def status(self) -> dict[str, str]:
        return {"mode": "broker"}


@pytest.fixture
def stream() -> Iterator[LogStream]:
    out = LogStream()
    logs.configure(LogSettings(level="info", format="json"), stream=out)
    try:
        yield out
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()


def _settings(sample: float) -> Settings:
    return Settings.model_validate(
        {
            "log": {"access_sample": sample},
            "sources": {"simotel": {"webhook": {"username": "simotel", "password": "pw-1"}}},
        }
    )


class _App:
    def __init__(self, sample: float) -> None:
        self.sink = _Sink()
        self.metrics = Metrics()
        app = create_app(_settings(sample), sink=self.sink, metrics=self.metrics)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bridge"
        )

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def answered(self, status: str) -> float:
        return self.count("simotel_bridge_webhook_seconds_count", status=status)


@pytest.fixture
async def app() -> AsyncIterator[_App]:
    made = _App(0.1)
    async with made.client:
        yield made


def test_sampler_takes_one_in_n_starting_with_the_first() -> None:
    tenth = Sampler(0.1)
    assert [tenth.take() for _ in range(21)] == [10] + [0] * 9 + [10] + [0] * 9 + [10]
    every = Sampler(1.0)
    assert [every.take() for _ in range(3)] == [1, 1, 1]
    never = Sampler(0.0)
    assert [never.take() for _ in range(3)] == [0, 0, 0]
    assert Sampler(0.3).every == 3


async def test_accepted_sampled_refusals_always_logged_every_answer_timed(
    app: _App, stream: LogStream
) -> None:
    for _ in range(25):
        ok = await app.client.post("/webhooks/simotel/events", json=CDR, auth=AUTH)
        assert ok.status_code == 200
    refused = [
        await app.client.post("/webhooks/simotel/events", json=CDR, auth=("simotel", "bad")),
        await app.client.post("/webhooks/nobody/events", json=CDR, auth=AUTH),
        await app.client.post("/webhooks/simotel/events", content=b"{nope", auth=AUTH),
    ]
    assert [r.status_code for r in refused] == [401, 404, 400]
    assert refused[0].headers["www-authenticate"] == 'Basic realm="simotel-bridge"'
    assert refused[0].headers["content-type"] == "application/json"

    hooks = stream.hooks()
    accepted = [h for h in hooks if h["status"] == 200]
    # The 1st, 11th and 21st of 25, each standing for ten answers.
    assert len(accepted) == 3
    assert all(h["sampled"] == 10 and h["outcome"] == "broker" for h in accepted)
    assert accepted[0]["message_id"] == app.sink.events[0].message_id
    assert accepted[1]["message_id"] == app.sink.events[10].message_id
    assert [h["status"] for h in hooks if h["status"] != 200] == [401, 404, 400]

    # The counters and the latency histogram count every answer, sampled or not.
    assert app.count("simotel_bridge_webhooks_accepted_total", source="simotel",
                     event="Cdr", destination="broker") == 25  # fmt: skip
    assert app.answered("200") == 25
    assert (app.answered("401"), app.answered("404"), app.answered("400")) == (1, 1, 1)


async def test_unavailable_and_defects_are_timed_and_logged(app: _App, stream: LogStream) -> None:
    app.sink.fail = PublishError("broker and spool both down")
    down = await app.client.post("/webhooks/simotel/events", json=CDR, auth=AUTH)
    assert down.status_code == 503 and down.json()["error"] == "unavailable"
    app.sink.fail = RuntimeError("a defect")
    broken = await app.client.post("/webhooks/simotel/events", json=CDR, auth=AUTH)
    assert broken.status_code == 500
    assert (app.answered("503"), app.answered("500")) == (1, 1)
    hooks = stream.hooks()
    assert [(h["status"], h["level"]) for h in hooks] == [(503, "warning"), (500, "warning")]
    assert "broker and spool both down" in str(hooks[0]["error"])
    assert any("webhook failed" in line for line in stream.text().splitlines())


async def test_sample_zero_logs_no_accepted_event_but_every_refusal(stream: LogStream) -> None:
    made = _App(0.0)
    async with made.client:
        for _ in range(5):
            ok = await made.client.post("/webhooks/simotel/events", json=CDR, auth=AUTH)
            assert ok.status_code == 200
        bad = await made.client.get("/webhooks/simotel/events", auth=AUTH)
        assert bad.status_code == 400
    assert [h["status"] for h in stream.hooks()] == [400]
    assert made.answered("200") == 5


async def test_other_spellings_of_basic_auth_still_checked(app: _App) -> None:
    token = base64.b64encode(b"simotel:pw-1").decode()
    for header in (f"basic {token}", f"BASIC   {token}  ", f"Basic {token}"):
        ok = await app.client.post(
            "/webhooks/simotel/events", json=CDR, headers={"authorization": header}
        )
        assert ok.status_code == 200, header
    wrong = base64.b64encode(b"simotel:pw-2").decode()
    bad = await app.client.post(
        "/webhooks/simotel/events", json=CDR, headers={"authorization": f"basic {wrong}"}
    )
    assert bad.status_code == 401


async def test_off_the_event_routes_starlette_answers_as_before(app: _App) -> None:
    put = await app.client.put("/webhooks/simotel/events", json=CDR, auth=AUTH)
    assert put.status_code == 405
    deeper = await app.client.post("/webhooks/simotel/events/Cdr/more", json=CDR, auth=AUTH)
    assert deeper.status_code == 404
    assert (await app.client.get("/healthz")).json() == {"status": "alive"}
    assert app.answered("200") == 0 and not app.sink.events
