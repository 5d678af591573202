"""`tail` prints what flows on the events and results exchanges of a real broker, matching its
pattern, without taking messages from anyone else."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection

from bridge.amqp import json_message
from bridge.tail import render_text, tail
from tests.helpers.env import make_settings


class _Tty(io.StringIO):
    """A terminal that tells when a line has been written."""

    def __init__(self) -> None:
        super().__init__()
        self.line = asyncio.Event()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        n = super().write(text)
        if text.endswith("\n"):
            self.line.set()
        return n


async def _start(
    settings: Any,
    pattern: str,
    out: io.StringIO,
    limit: int | None,
    stop: asyncio.Event | None = None,
) -> asyncio.Task[int]:
    ready = asyncio.Event()
    task = asyncio.create_task(tail(settings, pattern, out, stop, limit, ready=ready))
    done, _ = await asyncio.wait(
        {task, asyncio.ensure_future(ready.wait())}, timeout=10, return_when=asyncio.FIRST_COMPLETED
    )
    if task in done:
        task.result()  # raises what went wrong
    assert ready.is_set()
    return task


async def _publish(
    amqp: AbstractRobustConnection, exchange: str, key: str, body: dict[str, Any], **props: Any
) -> None:
    channel = await amqp.channel()
    ex = await channel.get_exchange(exchange)
    await ex.publish(json_message(orjson.dumps(body), message_id=key, **props), key)
    await channel.close()


@pytest.mark.broker
async def test_tail_prints_matching_events_and_results_as_json_lines(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(amqp_url, tmp_path)
    out = io.StringIO()
    task = await _start(settings, "simotel.#", out, limit=3)
    # another consumer's queue, bound before: it must still get everything
    channel = await amqp.channel()
    other = await channel.declare_queue("someone-else", auto_delete=True)
    await other.bind("simotel.events", "#")
    await _publish(amqp, "simotel.events", "tehran.Cdr", {"event_name": "Cdr"})  # no match
    await _publish(
        amqp,
        "simotel.events",
        "simotel.NewState",
        {"event_name": "NewState", "exten": "101", "state": "Ringing"},
        type="NewState",
        headers={"source": "simotel", "call_id": "1700.1"},
    )
    await _publish(
        amqp,
        "simotel.results",
        "simotel.call.originate.act",
        {"command_id": "c1", "status": "ok", "http_status": 200, "response": {"success": 1}},
    )
    await _publish(amqp, "simotel.events", "simotel.Cdr", {"event_name": "Cdr", "billsec": 9})
    assert await asyncio.wait_for(task, 10) == 3
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["exchange"], r["routing_key"]) for r in lines] == [
        ("simotel.events", "simotel.NewState"),
        ("simotel.results", "simotel.call.originate.act"),
        ("simotel.events", "simotel.Cdr"),
    ]
    assert lines[0]["body"] == {"event_name": "NewState", "exten": "101", "state": "Ringing"}
    assert lines[0]["headers"] == {"source": "simotel", "call_id": "1700.1"}
    assert lines[0]["type"] == "NewState" and lines[1]["body"]["status"] == "ok"
    got = [await other.get(timeout=5) for _ in range(3)]
    assert [m.routing_key for m in got] == ["tehran.Cdr", "simotel.NewState", "simotel.Cdr"]
    await channel.close()


@pytest.mark.broker
async def test_tail_on_a_terminal_is_readable_and_stops_on_request(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    settings = make_settings(amqp_url, tmp_path)
    out = _Tty()
    stop = asyncio.Event()
    task = await _start(settings, "*.Cdr", out, limit=None, stop=stop)
    await _publish(amqp, "simotel.events", "simotel.Cdr", {"event_name": "Cdr", "src": "991"})
    await _publish(
        amqp,
        "simotel.results",
        "simotel.pbx.users.add",
        {"status": "failed", "http_status": 200, "response": {"success": 0}},
    )
    await asyncio.wait_for(out.line.wait(), 10)  # the Cdr line (the result does not match)
    stop.set()
    assert await asyncio.wait_for(task, 10) == 1
    text = out.getvalue()
    assert "\x1b[" in text and "src=991" in text and "users.add" not in text


def test_render_text_for_a_result() -> None:
    # render_text reads only a message's public attributes; real messages come from the broker
    # in the tests above, here the layout of a failed result is checked with a stand-in.

    class _Msg:
        timestamp = None
        content_type = "application/json"
        routing_key = "simotel.call.originate.act"
        body = orjson.dumps(
            {
                "status": "error",
                "http_status": 503,
                "duration_ms": 12,
                "attempts": 3,
                "error": "Service Unavailable",
                "response": None,
            }
        )

    line = render_text("simotel.results", _Msg(), colour=False)  # type: ignore[arg-type]
    assert "result error" in line and "http=503" in line and "attempts=3" in line
    assert "error=Service Unavailable" in line and "simotel.call.originate.act" in line


@pytest.mark.broker
async def test_tail_since_prints_the_history_first_then_follows_live(
    amqp_url: str, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    from datetime import UTC, datetime, timedelta

    from bridge.tail import tail_since
    from tests.test_history import publish_spread

    settings = make_settings(amqp_url, tmp_path)  # history on, as by default
    now = datetime.now(UTC)
    too_old = await publish_spread(settings, 2, now - timedelta(hours=2), timedelta(0))
    old = await publish_spread(settings, 6, now - timedelta(minutes=8), timedelta(minutes=1))
    old_simotel = [s.message_id for s in old if s.routing_key.startswith("simotel.")]
    assert len(old_simotel) == 3 and too_old
    out = io.StringIO()
    ready = asyncio.Event()
    task = asyncio.create_task(
        tail_since(settings, now - timedelta(minutes=10), "simotel.#", out, limit=5, ready=ready)
    )
    done, _ = await asyncio.wait(
        {task, asyncio.ensure_future(ready.wait())}, timeout=30, return_when=asyncio.FIRST_COMPLETED
    )
    if task in done:
        task.result()
    assert ready.is_set()  # the history part is printed: what is published now is live
    await _publish(
        amqp,
        "simotel.results",
        "simotel.call.originate.act",
        {"command_id": "c9", "status": "ok", "http_status": 200},
    )
    (new,) = await publish_spread(settings, 1, datetime.now(UTC), timedelta(0))
    assert await asyncio.wait_for(task, 30) == 5
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["message_id"] for r in lines[:3]] == old_simotel
    assert {(r["exchange"], r["message_id"]) for r in lines[3:]} == {
        ("simotel.events", new.message_id),
        ("simotel.results", "simotel.call.originate.act"),
    }
    assert all(
        r["headers"].get("x-stream-offset") is not None
        for r in lines
        if r["exchange"] == "simotel.events"
    )


@pytest.mark.broker
async def test_tail_since_without_history_says_so(amqp_url: str, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from bridge.history import HistoryError
    from bridge.tail import tail_since
    from tests.test_history import publish_spread

    settings = make_settings(amqp_url, tmp_path, history={"enabled": False})
    await publish_spread(settings, 1, datetime.now(UTC), timedelta(0))  # declares the topology
    with pytest.raises(HistoryError, match="history enabled"):
        await asyncio.wait_for(
            tail_since(settings, datetime.now(UTC) - timedelta(minutes=5), out=io.StringIO()), 30
        )
