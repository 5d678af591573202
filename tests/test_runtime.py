"""The real `simotel-bridge` process: it starts without a broker when it can spool, survives
SIGKILL with events spooled, delivers everything once the broker is back, and stops cleanly on
SIGTERM. The broker is a private RabbitMQ node of this test, never the shared one."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import pytest
import yaml

from tests.helpers import broker_node
from tests.helpers.broker_node import PrivateBroker, free_port

pytestmark = [pytest.mark.disruptive, pytest.mark.broker, pytest.mark.timeout(180)]

private_broker = broker_node.private_broker
ROOT = Path(__file__).resolve().parent.parent
AUTH = ("simotel", "secret")


class Bridge:
    """`python -m bridge.cli ingress -c FILE` as a child process."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: asyncio.subprocess.Process | None = None
        self.base = f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge.cli", "ingress", "-c", str(self.config),
                stdout=out, stderr=out, cwd=ROOT,
            )  # fmt: skip
        async with httpx.AsyncClient() as client, asyncio.timeout(30):
            while True:
                assert self.proc.returncode is None, self.log.read_text()
                try:
                    if (await client.get(f"{self.base}/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)  # polling a process that is starting: nothing to await

    async def signal(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 30)

    async def kill(self) -> None:
        """Whatever happened in the test, no bridge process outlives it."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def write_config(tmp_path: Path, url: str, port: int) -> Path:
    config = {
        "amqp": {"url": url, "publish_timeout": 1.0, "connect_timeout": 2.0, "heartbeat": 2},
        "http": {"host": "127.0.0.1", "port": port},
        "log": {"level": "info", "format": "json"},
        "sources": {"simotel": {"webhook": {"username": AUTH[0], "password": AUTH[1]}}},
        "spool": {"path": str(tmp_path / "spool.sqlite3")},
        # No history stream: with none bound, every event is kept in simotel.unrouted, which
        # read_unrouted reads (with history on, the stream would take them all instead).
        "history": {"enabled": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def send(client: httpx.AsyncClient, base: str, call: str, n: int) -> str:
    body = {"event_name": "NewState", "unique_id": call, "n": n}
    r = await client.post(f"{base}/webhooks/simotel/events", json=body, auth=AUTH)
    assert r.status_code == 200, r.text
    return str(r.json()["message_id"])


async def read_unrouted(url: str, count: int, timeout: float = 60) -> list[Any]:
    """Every event published with no queue bound is kept in simotel.unrouted."""
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    connection = await aio_pika.connect_robust(url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue("simotel.unrouted", ensure=False)
        async with asyncio.timeout(timeout):
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    got.append(message)
                    if len(got) >= count:
                        break
    finally:
        await connection.close()
    return got


async def test_starts_without_broker_survives_sigkill_and_delivers_all(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    url = private_broker.url
    await asyncio.to_thread(private_broker.stop)
    port = free_port()
    config = write_config(tmp_path, url, port)
    first = Bridge(config, port, tmp_path / "bridge-1.log")
    second = Bridge(config, port, tmp_path / "bridge-2.log")
    try:
        got, sent = await _run_scenario(private_broker, first, second)
    finally:
        await first.kill()
        await second.kill()
    assert [m.message_id for m in got] == sent  # all of them, once, in the order sent
    assert [orjson.loads(m.body)["n"] for m in got] == list(range(40))
    log = (tmp_path / "bridge-2.log").read_text()
    assert "secret" not in log and "guest:guest" not in log


async def _run_scenario(
    private_broker: PrivateBroker, first: Bridge, second: Bridge
) -> tuple[list[Any], list[str]]:
    """Bridge 1 starts with no broker and spools 30 events, is SIGKILLed; bridge 2 starts on
    the same spool (still no broker) and takes 10 more; then the broker starts."""
    url = private_broker.url
    sent: list[str] = []
    await first.start()  # no broker: it starts anyway, because it can spool
    async with httpx.AsyncClient(timeout=10) as client:
        ready = await client.get(f"{first.base}/readyz")
        assert (ready.status_code, ready.json()["mode"]) == (200, "spool")
        assert ready.json()["broker"] == "disconnected"
        for n in range(30):
            sent.append(await send(client, first.base, "call-1", n))
        assert await first.signal(signal.SIGKILL) == -signal.SIGKILL

        await second.start()  # the spool the first one left is the second one's to replay
        for n in range(30, 40):
            sent.append(await send(client, second.base, "call-1", n))
        await asyncio.to_thread(private_broker.start)
        async with asyncio.timeout(60):  # the bridge reconnects (with backoff) on its own
            while True:
                if (await client.get(f"{second.base}/readyz")).json()["broker"] == "connected":
                    break
                await asyncio.sleep(0.1)  # another process's state: nothing to await
        got = await read_unrouted(url, len(sent))
        # The spool deletes a row once its confirm is processed, which can come a moment after
        # a consumer already has the message: wait for the depth, with a bound.
        async with asyncio.timeout(15):
            while True:
                ready = (await client.get(f"{second.base}/readyz")).json()
                if ready["spool_depth"] == 0:
                    break
                await asyncio.sleep(0.1)  # another process's state: nothing to await
        assert ready["broker"] == "connected"
    assert await second.signal(signal.SIGTERM) == 0
    return got, sent
