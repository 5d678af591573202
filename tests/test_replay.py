"""`simotel-bridge replay` against the real broker: the exact window, to a queue or an exchange,
with original ids and `replayed: true`; --pattern, --until, --dry-run; SIGINT stops cleanly."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import orjson
import pytest
import yaml
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from bridge.config import Settings
from bridge.errors import BridgeError
from bridge.replay import ReplayError, Summary, Target, replay
from tests.helpers.env import make_settings
from tests.helpers.taps import drain, tap
from tests.test_history import Sent, publish_spread

pytestmark = pytest.mark.broker
Window = tuple[datetime, list[Sent]]


@pytest.fixture
def history_settings(amqp_url: str, tmp_path: Path) -> Settings:
    return make_settings(amqp_url, tmp_path, history={"max_age": "2D"})


@pytest.fixture
async def thousand(history_settings: Settings) -> Window:
    """1,000 events received one every 6 s over the 100 minutes before now."""
    now = datetime.now(UTC)
    start = now - timedelta(minutes=100)
    return now, await publish_spread(history_settings, 1000, start, timedelta(seconds=6))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def _queue(amqp: AbstractRobustConnection, name: str) -> None:
    channel = await amqp.channel()
    await channel.declare_queue(name, durable=True)
    await channel.close()


def test_a_target_is_one_exchange_or_one_queue() -> None:
    with pytest.raises(ValueError):
        Target()
    with pytest.raises(ValueError):
        Target(exchange="x", queue="q")
    summary = Summary(Target(queue="q"), matched=3, published=2, interrupted=True)
    summary.last_received = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    assert "interrupted" in summary.line() and "--since 2026-12-01T09:00:00+00:00" in summary.line()


async def test_replay_to_a_queue_is_the_exact_window_with_original_ids(
    history_settings: Settings, thousand: Window, amqp: AbstractRobustConnection
) -> None:
    now, sent = thousand
    url = history_settings.amqp.url.get_secret_value()
    await _queue(amqp, "analytics.backfill")
    since = now - timedelta(minutes=20)
    terminal = _Terminal()
    async with asyncio.timeout(60):
        summary = await replay(
            url, since, None, "#", Target(queue="analytics.backfill"), progress=terminal
        )
    expected = [s for s in sent if s.received >= since]
    assert (summary.matched, summary.published, summary.interrupted) == (
        len(expected),
        len(expected),
        False,
    )
    got = await drain(amqp, "analytics.backfill")
    assert [m.message_id for m in got] == [s.message_id for s in expected]
    bar = terminal.getvalue()
    assert bar.startswith("\r[") and bar.endswith("\n")
    assert f"[{'#' * 24}] 100%  matched {len(expected):,}  published {len(expected):,}" in bar
    first = got[0]
    assert first.headers["replayed"] is True
    assert "x-stream-offset" not in first.headers
    assert first.headers["received_at"] == expected[0].received.isoformat(timespec="microseconds")
    assert first.headers["source"] in ("simotel", "tehran") and first.type
    assert first.app_id == "simotel-bridge" and first.delivery_mode == 2
    assert orjson.loads(first.body)["n"] == sent.index(expected[0])


async def test_pattern_and_until_to_an_exchange_keep_routing_keys(
    history_settings: Settings, thousand: Window, amqp: AbstractRobustConnection
) -> None:
    now, sent = thousand
    url = history_settings.amqp.url.get_secret_value()
    channel = await amqp.channel()
    await channel.declare_exchange("billing.replay", "topic", durable=True)
    since, until = now - timedelta(minutes=90), now - timedelta(minutes=80)
    expected = [s for s in sent if since <= s.received < until and s.routing_key.endswith("Cdr")]
    async with tap(amqp, "billing.replay", "#") as t:
        async with asyncio.timeout(60):  # --until stops by itself: this bounds a failure only
            summary = await replay(url, since, until, "*.Cdr", Target(exchange="billing.replay"))
        got = await t.wait_for(len(expected))
    assert summary.published == len(expected) > 20
    assert [(m.message_id, m.routing_key) for m in got] == [
        (s.message_id, s.routing_key) for s in expected
    ]
    assert all(m.headers["replayed"] is True for m in got)
    await channel.close()


async def test_dry_run_prints_and_sends_nothing(
    history_settings: Settings, thousand: Window, amqp: AbstractRobustConnection
) -> None:
    now, sent = thousand
    url = history_settings.amqp.url.get_secret_value()
    await _queue(amqp, "dry")
    out = io.StringIO()
    since = now - timedelta(minutes=10)
    summary = await replay(url, since, None, "tehran.#", Target(queue="dry"), dry_run=True, out=out)
    expected = [s for s in sent if s.received >= since and s.routing_key.startswith("tehran.")]
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [r["message_id"] for r in lines] == [s.message_id for s in expected]
    assert lines[0]["to"] == "queue dry" and lines[0]["original_routing_key"].startswith("tehran.")
    assert (summary.matched, summary.published) == (len(expected), 0)
    assert "would be published" in summary.line()
    assert await drain(amqp, "dry") == []


async def test_bad_targets_are_refused_before_anything_is_sent(
    history_settings: Settings, amqp: AbstractRobustConnection
) -> None:
    await publish_spread(history_settings, 5, datetime.now(UTC), timedelta(0))
    url = history_settings.amqp.url.get_secret_value()
    since = datetime.now(UTC) - timedelta(hours=1)
    with pytest.raises(ReplayError, match="no queue nowhere"):
        await replay(url, since, None, "#", Target(queue="nowhere"))
    with pytest.raises(ReplayError, match="every consumer again"):
        await replay(url, since, None, "#", Target(exchange="simotel.events"))
    channel = await amqp.channel()
    await channel.declare_exchange("unbound", "topic", durable=True)
    with pytest.raises(ReplayError, match="unroutable"):  # nothing bound: it would be lost
        await replay(url, since, None, "#", Target(exchange="unbound"))
    await channel.close()


async def test_sigint_stops_a_replay_cleanly(
    history_settings: Settings,
    thousand: Window,
    amqp: AbstractRobustConnection,
    tmp_path: Path,
) -> None:
    """The command line, throttled, interrupted after some messages: exit 130, a summary line,
    and exactly the messages it reports in the queue (a prefix of the window, in order)."""
    now, sent = thousand
    await _queue(amqp, "slow.replay")
    config = tmp_path / "config.yaml"
    url = history_settings.amqp.url.get_secret_value()
    config.write_text(
        yaml.safe_dump(
            {
                "amqp": {"url": url},
                "sources": {"simotel": {"webhook": {"allow_unauthenticated": True}}},
            }
        )
    )
    since = now - timedelta(minutes=30)
    expected = [s.message_id for s in sent if s.received >= since]
    got: list[AbstractIncomingMessage] = []
    arrived = asyncio.Condition()

    async def on_message(message: AbstractIncomingMessage) -> None:
        async with arrived:
            got.append(message)
            arrived.notify_all()

    channel = await amqp.channel()
    queue = await channel.get_queue("slow.replay")
    await queue.consume(on_message, no_ack=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMOTEL_BRIDGE")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.cli",
        "replay",
        "-c",
        str(config),
        "--since",
        since.isoformat(),
        "--to-queue",
        "slow.replay",
        "--rate",
        "40",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(60), arrived:
            await arrived.wait_for(lambda: len(got) >= 10)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = err.decode()
    assert proc.returncode == 130, stderr
    summary = stderr.strip().splitlines()[-1]
    assert summary.startswith("replay interrupted: "), stderr
    published = int(summary.split(" matched, ")[1].split(" ")[0])
    assert 10 <= published < len(expected)
    assert "--since" in summary
    # Everything reported is in the queue, and nothing more: a sentinel published after the
    # replay ended arrives right after the last replayed message.
    await channel.default_exchange.publish(
        aio_pika.Message(b"{}", message_id="sentinel"), "slow.replay"
    )
    async with asyncio.timeout(30), arrived:
        await arrived.wait_for(lambda: bool(got) and got[-1].message_id == "sentinel")
    assert [m.message_id for m in got[:-1]] == expected[:published]
    await channel.close()


def test_errors_are_bridge_errors() -> None:
    assert issubclass(ReplayError, BridgeError)
