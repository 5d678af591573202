"""The bridge on a private 3-node RabbitMQ cluster (tests/helpers/cluster.py): the real `run`
process with `amqp.urls` listing the three nodes, webhooks and commands flowing, the node the
bridge is connected to killed with SIGKILL and later restarted. Every webhook answered 2xx is
delivered, every command gets a result, no originate reaches Simotel twice."""

from __future__ import annotations

import asyncio
import base64
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import pytest
import yaml
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from bridge.amqp import Broker
from bridge.config import load_settings
from bridge.responder import ComponentRequest, ExtenApiAnswer, Responder
from tests.helpers import cluster
from tests.helpers.broker_node import free_port
from tests.helpers.cluster import Cluster, Progress
from tests.helpers.worker import FakeSimotel, Received, api_settings, ok

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.broker,
    pytest.mark.disruptive,
    pytest.mark.slow,
    pytest.mark.timeout(300),
]

rmq_cluster = cluster.rmq_cluster

ROOT = Path(__file__).resolve().parent.parent
CDR = orjson.loads((ROOT / "tests" / "fixtures" / "event-Cdr.json").read_bytes())
AUTH = "Basic " + base64.b64encode(b"simotel:secret").decode()
EXTEN_REQUEST = orjson.loads(
    (ROOT / "tests" / "fixtures" / "component-ExtenApi-request.json").read_bytes()
)


def _bridge_ports(node: cluster.ClusterNode) -> list[int]:
    """The node ports (one per node of the cluster) that bridge processes are connected to."""
    out = node.ctl("-q", "list_connections", "port", "client_properties").stdout
    return [int(line.split()[0]) for line in out.splitlines() if "simotel-bridge" in line]


def _alive(c: Cluster) -> cluster.ClusterNode:
    return next(n for n in c.nodes if n.running)


async def test_quorum_queues_replicated_on_every_node(rmq_cluster: Cluster, tmp_path: Path) -> None:
    settings = load_settings(
        data={
            "amqp": {"urls": rmq_cluster.urls, "quorum_replicas": 3},
            "sources": {"simotel": {"webhook": {"allow_unauthenticated": True}}},
        },
        environ={},
    )
    broker = Broker(settings.amqp)
    await broker.connect()
    # Without the argument (quorum_replicas unset) RabbitMQ decides: what does 3.10 do?
    channel = await broker.channel()
    await channel.declare_queue("plain-quorum", durable=True, arguments={"x-queue-type": "quorum"})
    await broker.close()
    status = await asyncio.to_thread(
        rmq_cluster.nodes[0].ctl, "-q", "list_queues", "name", "type", "members"
    )
    for name in ("simotel.commands", "plain-quorum"):
        line = next(x for x in status.stdout.splitlines() if x.startswith(name))
        assert "quorum" in line
        assert all(n.node in line for n in rmq_cluster.nodes), line


class Load:
    """Webhooks and commands at a steady rate until stopped; records what was accepted."""

    def __init__(
        self, base: str, channel: aio_pika.abc.AbstractChannel, progress: Progress
    ) -> None:
        self.base = base
        self.progress = progress
        self.channel = channel
        self.accepted: list[str] = []  # message ids of webhooks answered 2xx
        self.refused = 0
        self.commands: list[str] = []  # message ids of confirmed command publishes
        self.originates: dict[str, str] = {}  # caller -> command message id
        self.stopping = asyncio.Event()
        self.components: list[tuple[float, str]] = []  # (when, extension answered)

    async def webhooks(self, lane: int) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=15) as client:
            i = 0
            while not self.stopping.is_set():
                i += 1
                body = dict(CDR, unique_id=f"{lane}-{i}")
                try:
                    r = await client.post(
                        "/webhooks/simotel/events", json=body, headers={"Authorization": AUTH}
                    )
                except httpx.TransportError:
                    self.refused += 1
                    continue
                if r.status_code == 200:
                    self.accepted.append(r.json()["message_id"])
                    self.progress.bump()
                else:
                    self.refused += 1
                await asyncio.sleep(0.02)  # a steady rate, not a wait for anything

    async def component_calls(self) -> None:
        """ExtenApi requests, as Simotel's dialplan sends them: answered by the test's
        responder ("120") or, when the bridge cannot reach it in time, by the fallback."""
        async with httpx.AsyncClient(base_url=self.base, timeout=15) as client:
            while not self.stopping.is_set():
                try:
                    r = await client.post(
                        "/webhooks/simotel/components/ExtenApi",
                        json=EXTEN_REQUEST,
                        headers={"Authorization": AUTH},
                    )
                    self.components.append((time.monotonic(), r.json().get("extension", "")))
                    self.progress.bump()
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)

    def answered_since(self, since: float) -> int:
        return sum(1 for at, ext in self.components if at > since and ext == "120")

    async def commands_(self) -> None:
        exchange = await self.channel.get_exchange("simotel.commands", ensure=False)
        i = 0
        while not self.stopping.is_set():
            i += 1
            originate = i % 3 == 0
            action = "call/originate/act" if originate else "setting/ping/act"
            data = {"caller": f"c{i}", "callee": "0915", "context": "out"} if originate else {}
            mid = uuid.uuid4().hex
            try:
                await exchange.publish(
                    aio_pika.Message(
                        orjson.dumps({"action": action, "data": data}),
                        content_type="application/json",
                        message_id=mid,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    "simotel." + action.replace("/", "."),
                    mandatory=True,
                    timeout=15,
                )
            except Exception:  # not confirmed: it may or may not run; not counted
                continue
            self.commands.append(mid)
            self.progress.bump()
            if originate:
                self.originates[f"c{i}"] = mid
            await asyncio.sleep(0.05)


async def _route(req: ComponentRequest) -> ExtenApiAnswer:
    return ExtenApiAnswer("120")


async def _collect(queue: aio_pika.abc.AbstractQueue, into: set[str], progress: Progress) -> None:
    async def on_message(message: AbstractIncomingMessage) -> None:
        into.add(str(message.message_id))
        progress.bump()

    await queue.consume(on_message, no_ack=True)


async def test_node_killed_under_load(rmq_cluster: Cluster, tmp_path: Path) -> None:
    fake = FakeSimotel()

    async def slow_ok(req: Received) -> Any:
        await asyncio.sleep(0.05)  # Simotel's answer time
        return await ok({"originated_call_id": "x"})(req)

    fake.on("call/originate/act", slow_ok)
    await fake.start()
    port = free_port()
    config = tmp_path / "bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "amqp": {
                    "urls": rmq_cluster.urls,
                    "heartbeat": 2,
                    "publish_timeout": 2.0,
                    "connect_timeout": 5.0,
                    # As declared by the other test of this module: a different value (or
                    # none) would be refused by the broker (PRECONDITION_FAILED).
                    "quorum_replicas": 3,
                },
                "http": {"port": port},
                "log": {"format": "json", "level": "info"},
                "sources": {
                    "simotel": {
                        "webhook": {"username": "simotel", "password": "secret"},
                        "api": api_settings(fake.url),
                        "components": {"fallbacks": {"ExtenApi": {"ok": "1", "extension": "999"}}},
                    }
                },
                "spool": {"path": str(tmp_path / "spool.sqlite3")},
                "worker": {"state_path": str(tmp_path / "state.sqlite3"), "prefetch": 8},
            }
        )
    )
    log = tmp_path / "bridge.log"
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.cli", "run", "-c", str(config),
            stdout=out, stderr=out, cwd=ROOT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    conn: AbstractRobustConnection | None = None
    try:
        async with httpx.AsyncClient(base_url=base) as client, asyncio.timeout(60):
            while True:  # a process that is starting: nothing to await but its answer
                assert proc.returncode is None, log.read_text()
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        # Ready answers as soon as the spool can take events; the broker connection follows.
        ports: list[int] = []
        deadline = time.monotonic() + 60
        while not ports:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            ports = await asyncio.to_thread(_bridge_ports, rmq_cluster.nodes[0])
        assert len(ports) == 1, ports
        victim = rmq_cluster.node_on_port(ports[0])
        # The test's own connection is to another node, which stays up.
        other = next(n for n in rmq_cluster.nodes if n is not victim)
        conn = await aio_pika.connect_robust(other.url)
        channel = await conn.channel(publisher_confirms=True)
        progress = Progress()
        events: set[str] = set()
        results: set[str] = set()
        for name, exchange, into in (
            ("audit-events", "simotel.events", events),
            ("audit-results", "simotel.results", results),
        ):
            queue = await channel.declare_queue(
                name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind(exchange, "#")
            await _collect(queue, into, progress)
        responder = Responder(conn)
        await responder.subscribe("ExtenApi", "*", _route)
        load = Load(base, channel, progress)
        runners = [asyncio.create_task(load.webhooks(i)) for i in range(4)]
        runners.append(asyncio.create_task(load.commands_()))
        runners.append(asyncio.create_task(load.component_calls()))
        await progress.until(
            lambda: len(load.accepted) >= 100 and len(results) >= 20 and load.answered_since(0) > 0,
            60,
            "traffic",
        )
        await asyncio.to_thread(victim.stop, kill=True)
        killed_at = len(load.accepted)
        # The bridge moves to another node and traffic goes on.
        moved: list[int] = []

        async def bridge_moved() -> None:
            while True:
                moved[:] = await asyncio.to_thread(_bridge_ports, other)
                if moved and moved[0] != victim.port:
                    return
                await asyncio.sleep(0.5)  # polling the cluster's view of connections

        await asyncio.wait_for(bridge_moved(), 90)
        # Component requests reach the responder again: the bridge consumes its replies on the
        # new node (a fallback "999" is all a call gets otherwise).
        moved_at = time.monotonic()
        await progress.until(lambda: load.answered_since(moved_at) >= 10, 60, "component answers")
        await progress.until(
            lambda: len(load.accepted) >= killed_at + 100, 60, "traffic after the kill"
        )
        await asyncio.to_thread(victim.start)
        await asyncio.to_thread(rmq_cluster.wait_members, 3)
        await progress.until(
            lambda: len(load.accepted) >= killed_at + 200, 60, "traffic after restart"
        )
        load.stopping.set()
        await asyncio.wait_for(asyncio.gather(*runners), 30)
        await responder.close()

        accepted = set(load.accepted)
        await progress.until(lambda: accepted <= events, 90, "every accepted webhook")
        await progress.until(
            lambda: set(load.commands) <= results, 90, "a result for every command"
        )
        sent = [r.json["caller"] for r in fake.to("call/originate/act") if r.json]
        assert len(sent) == len(set(sent)), "an originate was sent twice"
        print(
            f"\ncluster: start {rmq_cluster.start_seconds:.1f}s; webhooks accepted "
            f"{len(accepted)} (refused {load.refused}), commands {len(load.commands)} "
            f"(originates {len(load.originates)}, sent {len(sent)}), component calls "
            f"{len(load.components)} ({load.answered_since(0)} by the responder), bridge moved to "
            f"port {moved[0]} from {victim.port}"
        )
    finally:
        if conn is not None:
            await conn.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 40)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await fake.stop()
        for node in rmq_cluster.nodes:
            if not node.running:
                await asyncio.to_thread(node.start)
        if proc.returncode not in (0, None):
            print(log.read_text()[-5000:])
