"""Several ingress processes behind one port (`http.reuse_port`), each on its own spool: one is
killed with SIGKILL under load while the broker is away, so that it dies holding spooled
events; restarted on its spool, it delivers them. Every webhook answered 200 is delivered."""

from __future__ import annotations

import asyncio
import base64
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import pytest
import yaml
from aio_pika.abc import AbstractIncomingMessage

from tests.helpers import broker_node
from tests.helpers.broker_node import PrivateBroker, free_port
from tests.helpers.cluster import Progress
from tests.helpers.sink import AUDIT_QUEUE, declare_audit

pytestmark = [
    pytest.mark.broker,
    pytest.mark.disruptive,
    pytest.mark.slow,
    pytest.mark.timeout(240),
]

private_broker = broker_node.private_broker

ROOT = Path(__file__).resolve().parent.parent
CDR = orjson.loads((ROOT / "tests" / "fixtures" / "event-Cdr.json").read_bytes())
AUTH = "Basic " + base64.b64encode(b"simotel:secret").decode()


class Ingress:
    def __init__(self, name: str, tmp_path: Path, url: str, port: int) -> None:
        self.config = tmp_path / f"{name}.yaml"
        self.log = tmp_path / f"{name}.log"
        self.spool = tmp_path / f"{name}-spool.sqlite3"
        self.proc: asyncio.subprocess.Process | None = None
        self.config.write_text(
            yaml.safe_dump(
                {
                    "amqp": {"url": url, "publish_timeout": 1.0, "heartbeat": 2},
                    "http": {"port": port, "reuse_port": True},
                    "log": {"format": "json", "level": "info"},
                    "sources": {
                        "simotel": {"webhook": {"username": "simotel", "password": "secret"}}
                    },
                    "spool": {"path": str(self.spool)},
                }
            )
        )

    def listening(self) -> int:
        return self.log.read_text().count('"listening"') if self.log.exists() else 0

    async def start(self) -> None:
        before = self.listening()
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge.cli", "ingress", "-c", str(self.config),
                stdout=out, stderr=out, cwd=ROOT,
            )  # fmt: skip
        async with asyncio.timeout(60):
            while self.listening() == before:  # its own log says when it listens
                assert self.proc.returncode is None, self.log.read_text()[-3000:]
                await asyncio.sleep(0.1)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def spooled(self) -> int:
        db = sqlite3.connect(self.spool)
        try:
            return int(db.execute("SELECT count(*) FROM spool").fetchone()[0])
        finally:
            db.close()


class Webhooks:
    def __init__(self, base: str) -> None:
        self.base = base
        self.accepted: list[str] = []
        self.failed = 0
        self.stopping = asyncio.Event()
        self.progress = Progress()

    async def lane(self, lane: int) -> None:
        # A new connection per request, so the kernel spreads them over both processes.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=self.base, timeout=10, limits=limits) as client:
            i = 0
            while not self.stopping.is_set():
                i += 1
                try:
                    r = await client.post(
                        "/webhooks/simotel/events",
                        json=dict(CDR, unique_id=f"{lane}-{i}"),
                        headers={"Authorization": AUTH},
                    )
                except httpx.TransportError:
                    self.failed += 1
                    continue
                if r.status_code == 200:
                    self.accepted.append(r.json()["message_id"])
                    self.progress.bump()
                else:
                    self.failed += 1
                await asyncio.sleep(0.01)  # a steady rate, not a wait for anything

    async def more(self, count: int, timeout: float = 60) -> None:
        target = len(self.accepted) + count
        await self.progress.until(
            lambda: len(self.accepted) >= target, timeout, f"{target} accepted"
        )


async def test_two_ingress_processes_one_killed(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    url = private_broker.url
    await declare_audit(url)
    port = free_port()
    a = Ingress("a", tmp_path, url, port)
    b = Ingress("b", tmp_path, url, port)
    load = Webhooks(f"http://127.0.0.1:{port}")
    lanes: list[asyncio.Task[Any]] = []
    try:
        await a.start()
        await b.start()  # the same port: refused without reuse_port
        # A third process on b's spool file is refused: a spool has a single owner.
        with b.log.open("ab") as out:
            third = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge.cli", "ingress", "-c", str(b.config),
                stdout=out, stderr=out, cwd=ROOT,
            )  # fmt: skip
        assert await asyncio.wait_for(third.wait(), 60) != 0
        assert "used by another process" in b.log.read_text()
        lanes = [asyncio.create_task(load.lane(i)) for i in range(4)]
        await load.more(100)
        await asyncio.to_thread(private_broker.stop, kill=True)
        await load.more(200)  # both spool now
        await a.kill()
        killed_with = await asyncio.to_thread(a.spooled)
        await load.more(100)  # b alone
        await asyncio.to_thread(private_broker.start)
        await load.more(100)
        await a.start()  # on its spool: it delivers what it held
        await load.more(100)
        load.stopping.set()
        await asyncio.wait_for(asyncio.gather(*lanes), 30)
        accepted = set(load.accepted)
        # The spools drain in their own time: consume until everything accepted has arrived.
        delivered: set[str] = set()
        arrived = Progress()
        conn = await aio_pika.connect(url)
        try:
            queue = await (await conn.channel()).get_queue(AUDIT_QUEUE, ensure=False)

            async def on_message(message: AbstractIncomingMessage) -> None:
                delivered.add(str(message.message_id))
                arrived.bump()

            await queue.consume(on_message, no_ack=True)
            await arrived.until(lambda: accepted <= delivered, 90, "every accepted webhook")
        finally:
            await conn.close()
        assert killed_with > 0, "the killed process held nothing spooled: the test proved little"
        print(
            f"\ningress x2: accepted {len(accepted)}, failed {load.failed}, "
            f"spooled in the killed process {killed_with}"
        )
    finally:
        load.stopping.set()
        for t in lanes:
            t.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
        await a.stop()
        await b.stop()
