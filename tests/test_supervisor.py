"""`http.workers: 2`: `simotel-bridge ingress` supervises two ingress processes on one port,
each on its own spool. One is SIGKILLed under load: it is started again on the same spool,
every webhook answered 200 is on the broker, and SIGTERM stops everything in order."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.supervisor import plan, spool_path
from tests.helpers.broker_node import free_port
from tests.helpers.sink import AUDIT_QUEUE, declare_audit, read_queue

ROOT = Path(__file__).resolve().parent.parent
CDR = orjson.loads((ROOT / "tests" / "fixtures" / "event-Cdr.json").read_bytes())


def test_spool_paths_and_roles_of_the_children() -> None:
    assert spool_path("var/spool.sqlite3", 2) == "var/spool-2.sqlite3"
    assert spool_path("/data/events", 1) == "/data/events-1"
    settings = Settings.model_validate(
        {
            "http": {"port": 8080, "workers": 3},
            "spool": {"path": "/s/spool.sqlite3"},
            "sources": {"s": {"webhook": {"allow_unauthenticated": True}}},
        }
    )
    children = plan(settings, "run")
    # Only the ingress is multiplied: one `run` (with the worker), the others `ingress`.
    assert [c.command for c in children] == ["run", "ingress", "ingress"]
    assert [c.env["SIMOTEL_BRIDGE__SPOOL__PATH"] for c in children] == [
        "/s/spool-1.sqlite3",
        "/s/spool-2.sqlite3",
        "/s/spool-3.sqlite3",
    ]
    assert all(c.env["SIMOTEL_BRIDGE__HTTP__REUSE_PORT"] == "true" for c in children)
    assert all(c.env["SIMOTEL_BRIDGE__HTTP__WORKERS"] == "1" for c in children)
    with pytest.raises(ConfigError):
        plan(settings.model_copy(update={"http": settings.http.model_copy(update={"port": 0})}),
             "ingress")  # fmt: skip


def _lines(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    out = []
    for raw in log.read_bytes().splitlines():
        if raw.startswith(b"{"):
            out.append(orjson.loads(raw))
    return out


async def _until(log: Path, what: str, count: int, proc: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(60):
        while sum(1 for line in _lines(log) if line.get("event") == what) < count:
            assert proc.returncode is None, _lines(log)[-20:]
            await asyncio.sleep(0.1)


async def _post_many(url: str, n: int) -> list[str]:
    """`n` webhooks, each on a new connection (so the kernel spreads them over the
    processes); returns the message ids answered 200 (a connection refused is tried again)."""
    ids: list[str] = []
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, auth=("simotel", "secret"), timeout=10) as c:
        for _ in range(n):
            for _attempt in range(20):
                try:
                    r = await c.post(url, json=CDR)
                except httpx.TransportError:
                    continue
                if r.status_code == 200:
                    ids.append(r.json()["message_id"])
                    break
    return ids


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_two_processes_one_killed_restarted_on_its_spool_nothing_lost(
    amqp_url: str, tmp_path: Path
) -> None:
    await declare_audit(amqp_url)
    port = free_port()
    config = tmp_path / "bridge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "amqp": {"url": amqp_url},
                "http": {"port": port, "workers": 2},
                "log": {"format": "json", "level": "info"},
                "sources": {"simotel": {"webhook": {"username": "simotel", "password": "secret"}}},
                "spool": {"path": str(tmp_path / "spool.sqlite3")},
            }
        )
    )
    log = tmp_path / "bridge.log"
    with log.open("ab") as out:
        sup = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.cli", "ingress", "-c", str(config),
            stdout=out, stderr=out, cwd=ROOT,
        )  # fmt: skip
    try:
        await _until(log, "listening", 2, sup)
        started = [line for line in _lines(log) if line.get("event") == "child started"]
        assert sorted(line["child"] for line in started) == [1, 2]
        assert {line["spool"] for line in started} == {
            str(tmp_path / "spool-1.sqlite3"),
            str(tmp_path / "spool-2.sqlite3"),
        }
        url = f"http://127.0.0.1:{port}/webhooks/simotel/events"
        ids = await _post_many(url, 40)

        victim = next(line for line in started if line["child"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        load = asyncio.create_task(_post_many(url, 60))  # under load while it dies
        await _until(log, "child started", 3, sup)
        await _until(log, "listening", 3, sup)
        ids += await load
        ids += await _post_many(url, 40)

        again = [line for line in _lines(log) if line.get("event") == "child started"][-1]
        assert again["child"] == 1 and again["pid"] != victim["pid"]
        assert again["spool"] == str(tmp_path / "spool-1.sqlite3")
        assert any(line.get("event", "").startswith("child died") for line in _lines(log))

        assert len(ids) == 140
        delivered = [m.message_id for m in await read_queue(amqp_url, AUDIT_QUEUE)]
        # Nothing answered 200 is lost, nothing is there twice. (A request whose process was
        # killed between the confirm and the answer may be there without its 200.)
        assert set(ids) <= set(delivered) and len(set(delivered)) == len(delivered)
        assert len(delivered) <= len(ids) + 20

        pids = [line["pid"] for line in _lines(log) if line.get("event") == "child started"]
        sup.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            assert await sup.wait() == 0
        stopped = [line for line in _lines(log) if line.get("event") == "child stopped"]
        assert sorted(line["child"] for line in stopped) == [1, 2]
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not (tmp_path / "spool.sqlite3").exists()
    finally:
        if sup.returncode is None:
            sup.kill()
            await sup.wait()
