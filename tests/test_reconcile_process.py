"""The reconciler as real processes: killed with SIGKILL mid-walk and restarted, and two `run`
replicas with reconciliation on. Every call in the simulator's CDR table ends up on the exchange
exactly once, with no message id twice."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import pytest
import yaml

from bridge.amqp import Broker
from bridge.config import load_settings
from bridge.simulator import Faults, RunningSimulator, SimulatorOptions, simulator
from tests.helpers.broker_node import free_port
from tests.helpers.taps import Tap, tap

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent


def write_config(
    tmp_path: Path,
    name: str,
    amqp_url: str,
    api_url: str,
    port: int,
    state: Path,
    grace_s: float = 0,
) -> Path:
    config = {
        "amqp": {"url": amqp_url, "publish_timeout": 5.0, "heartbeat": 2},
        "http": {"host": "127.0.0.1", "port": port},
        "log": {"level": "info", "format": "json"},
        "sources": {
            "simotel": {
                "webhook": {"username": "simotel", "password": "secret"},
                "api": {
                    "base_url": api_url,
                    "username": "apiuser",
                    "password": "change-me",
                    "api_key": "change-me",
                    "rate_limit": 0,
                },
                "reconcile": {
                    "enabled": True,
                    "interval_s": 0.3,
                    "grace_s": grace_s,
                    "from": "beginning",
                },
            }
        },
        "spool": {"path": str(tmp_path / f"{name}-spool.sqlite3")},
        # The reconciler keeps its cursors and seen ids in the worker's store.
        "worker": {"state_path": str(state)},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def spawn(log: Path, *args: str) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.cli", *args, stdout=out, stderr=out, cwd=ROOT
        )


async def declare(amqp_url: str, tmp_path: Path, config: Path) -> None:
    settings = load_settings(config, environ={})
    broker = Broker(settings.amqp)
    await broker.connect()
    await broker.close()


async def barrier(amqp: aio_pika.abc.AbstractRobustConnection, t: Tap) -> None:
    """Every message published before now has reached the tap once a marker published now has
    (the publishers are gone or idle: the queue keeps the order it was given)."""
    channel = await amqp.channel(publisher_confirms=True)
    marker = uuid.uuid4().hex
    exchange = await channel.get_exchange("simotel.events")
    await exchange.publish(aio_pika.Message(b"{}", message_id=marker), "simotel.Cdr")
    await channel.close()
    async with asyncio.timeout(30):
        while not any(m.message_id == marker for m in t.messages):
            await t.wait_for(len(t.messages) + 1)
    t.messages[:] = [m for m in t.messages if m.message_id != marker]


def check_exactly_once(t: Tap, sim: RunningSimulator) -> None:
    calls = {str(r["cuid"]) for r in sim.state.table("cdr")}
    by_call = collections.Counter(
        orjson.loads(m.body)["unique_id"] for m in t.messages if m.routing_key == "simotel.Cdr"
    )
    assert set(by_call) == calls
    twice = {c: n for c, n in by_call.items() if n != 1}
    assert not twice, twice
    ids = [m.message_id for m in t.messages]
    assert len(ids) == len(set(ids))


@contextlib.asynccontextmanager
async def sim_running(**kw: Any) -> AsyncIterator[RunningSimulator]:
    options = SimulatorOptions(port=0, time_scale=0, seed=9, webhook_password="secret", **kw)
    async with simulator(options) as sim:
        yield sim


async def test_sigkill_mid_walk_then_restart_recovers_everything_once(
    amqp_url: str, amqp: aio_pika.abc.AbstractRobustConnection, tmp_path: Path
) -> None:
    async with sim_running(event_url=None, faults=Faults(latency_ms=120)) as sim:
        for _ in range(150):  # calls whose webhooks all went missing
            await sim.calls.call("internal")
        config = write_config(
            tmp_path, "r", amqp_url, sim.api_url, free_port(), tmp_path / "state.sqlite3"
        )
        await declare(amqp_url, tmp_path, config)
        async with tap(amqp, "simotel.events", "simotel.Cdr") as t:
            log = tmp_path / "reconcile.log"
            proc = await spawn(log, "reconcile", "--once", "-c", str(config))
            try:
                await t.wait_for(25, timeout=60)
                assert proc.returncode is None, "the walk ended before the kill"
                proc.kill()
                assert await proc.wait() == -9
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            killed_at = len(t.messages)
            assert killed_at < 150
            proc = await spawn(log, "reconcile", "--once", "-c", str(config))
            assert await asyncio.wait_for(proc.wait(), 120) == 0, log.read_text()[-3000:]
            await barrier(amqp, t)
            check_exactly_once(t, sim)


async def metrics_of(client: httpx.AsyncClient, port: int) -> str | None:
    try:
        return (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.TransportError:
        return None


ACTIVE = 'simotel_bridge_reconcile_active{source="simotel"} 1.0'


async def test_two_run_replicas_one_walker_at_a_time_and_no_duplicates(
    amqp_url: str, amqp: aio_pika.abc.AbstractRobustConnection, tmp_path: Path
) -> None:
    ports = free_port(), free_port()
    # Replica 0 takes Simotel's webhooks; a third of them never arrive.
    event_url = f"http://127.0.0.1:{ports[0]}/webhooks/simotel/events"
    async with sim_running(event_url=event_url, drop_webhooks=0.3, components=False) as sim:
        state = tmp_path / "shared-state.sqlite3"  # one store for both (docs/reconcile.md)
        configs = [
            # Webhooks arrive while the walks go on: the grace keeps them apart.
            write_config(tmp_path, f"run{i}", amqp_url, sim.api_url, ports[i], state, 2.0)
            for i in range(2)
        ]
        await declare(amqp_url, tmp_path, configs[0])
        procs: list[asyncio.subprocess.Process] = []
        killed: set[int] = set()
        async with tap(amqp, "simotel.events", "simotel.Cdr") as t, httpx.AsyncClient() as c:
            try:
                for i in range(2):
                    procs.append(
                        await spawn(tmp_path / f"run{i}.log", "run", "-c", str(configs[i]))
                    )

                async def active() -> list[bool]:
                    texts = [await metrics_of(c, p) for p in ports]
                    return [t is not None and ACTIVE in t for t in texts]

                async def wait_until(predicate: Any, timeout: float = 60) -> None:
                    async with asyncio.timeout(timeout):
                        while not await predicate():
                            for i, p in enumerate(procs):
                                assert i in killed or p.returncode is None, (
                                    tmp_path / f"run{i}.log"
                                ).read_text()[-4000:]
                            await asyncio.sleep(0.1)  # polling other processes' /metrics

                async def one_active() -> bool:
                    a = await active()
                    assert sum(a) <= 1, a  # never two walkers
                    return sum(a) == 1

                await wait_until(one_active)
                for _ in range(20):
                    await sim.calls.call("internal")

                async def all_there() -> bool:
                    await one_active()
                    calls = {str(r["cuid"]) for r in sim.state.table("cdr")}
                    got = {orjson.loads(m.body).get("unique_id") for m in t.messages}
                    return calls <= got

                await wait_until(all_there)
                assert sim.calls.dropped > 0 and sim.calls.sent > 0
                # The active replica dies; the other takes over.
                holder = (await active()).index(True)
                killed.add(holder)
                procs[holder].kill()
                await procs[holder].wait()
                other = 1 - holder

                async def taken_over() -> bool:
                    text = await metrics_of(c, ports[other])
                    return text is not None and ACTIVE in text

                await wait_until(taken_over)
                for _ in range(10):  # webhooks to a dead replica 0 fail too
                    await sim.calls.call("internal")

                async def all_there_again() -> bool:
                    calls = {str(r["cuid"]) for r in sim.state.table("cdr")}
                    got = {orjson.loads(m.body).get("unique_id") for m in t.messages}
                    return calls <= got

                await wait_until(all_there_again)
            finally:
                for p in procs:
                    if p.returncode is None:
                        p.terminate()
                        try:
                            await asyncio.wait_for(p.wait(), 30)
                        except TimeoutError:
                            p.kill()
                            await p.wait()
            await barrier(amqp, t)
            check_exactly_once(t, sim)
            origins = collections.Counter((m.headers or {}).get("origin") for m in t.messages)
            assert origins[None] > 0 and origins["reconciled"] > 0, origins
