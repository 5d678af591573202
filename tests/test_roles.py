"""The roles as processes, on the shared broker (a fresh vhost): `ingress` and `worker` started
apart with one configuration, as deploy/README.md describes, and the HTTP server's view of the
client address."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers.broker_node import free_port

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent


async def _start(role: str, config: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.cli", role, "-c", str(config),
            stdout=out, stderr=out, cwd=ROOT,
        )  # fmt: skip


async def _healthy(proc: asyncio.subprocess.Process, base: str, log: Path) -> None:
    async with httpx.AsyncClient() as client, asyncio.timeout(30):
        while True:
            if proc.returncode is not None:
                raise AssertionError(await asyncio.to_thread(log.read_text))
            try:
                if (await client.get(f"{base}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)  # a process that is starting: nothing to await


async def test_ingress_and_worker_apart_with_one_config(amqp_url: str, tmp_path: Path) -> None:
    ports = {"ingress": free_port(), "worker": free_port()}
    procs: dict[str, asyncio.subprocess.Process] = {}
    try:
        for role in ("worker", "ingress"):  # the worker first: it must not take the spool
            config = tmp_path / f"{role}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "amqp": {"url": amqp_url},
                        "http": {"port": ports[role]},
                        "log": {"format": "json"},
                        "sources": {
                            "simotel": {
                                "webhook": {
                                    "username": "simotel",
                                    "password": "secret",
                                    # No proxy is trusted: X-Forwarded-For must not count.
                                    "allowed_ips": ["10.9.9.9/32"],
                                },
                                "api": {
                                    "base_url": "http://127.0.0.1:9/api/v4/",
                                    "auth": "apikey",
                                    "api_key": "k",
                                },
                            }
                        },
                        "spool": {"path": str(tmp_path / "spool.sqlite3")},
                        "worker": {"state_path": str(tmp_path / "worker.sqlite3")},
                    }
                )
            )
            log = tmp_path / f"{role}.log"
            procs[role] = await _start(role, config, log)
            await _healthy(procs[role], f"http://127.0.0.1:{ports[role]}", log)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['ingress']}") as c:
            ready = await c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["spool_enabled"] is True
            forged = await c.post(
                "/webhooks/simotel/events",
                json={"event_name": "Ping"},
                auth=("simotel", "secret"),
                headers={"x-forwarded-for": "10.9.9.9"},
            )
            assert forged.status_code == 403  # the socket peer, 127.0.0.1, is not allowed
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['worker']}") as c:
            worker_ready = await c.get("/readyz")
            assert worker_ready.json()["spool_enabled"] is False  # the worker took no spool
            assert (await c.post("/webhooks/simotel/events", json={})).status_code == 404
        for role, proc in procs.items():
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0, role
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
