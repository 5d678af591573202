"""Two workers, each with a local directory of its own, sharing their command state: an
originate (not retry-safe) is never sent to Simotel twice, whichever worker gets which copy.

Shared state is either one PostgreSQL database (`worker.state_url`, workers on any host) or one
SQLite file both point at (`worker.state_path`, workers on one host). Separate SQLite files share
nothing, and the last test shows what that costs: the same message_id runs once per worker.

Real broker, real PostgreSQL, a fake Simotel over real HTTP that records every request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aio_pika.abc import AbstractRobustConnection

from bridge.commands import Result
from tests.helpers.worker import (
    ORIGINATE,
    START,
    Bus,
    FakeSimotel,
    WorkerProcess,
    api_settings,
    header,
    held,
    worker_settings,
)

ACTION = "call/originate/act"

# worker-name -> the worker settings' state keys
StateFor = Callable[[str], dict[str, Any]]


@pytest.fixture(
    params=[pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite-shared"],
)
def shared_state(request: pytest.FixtureRequest, tmp_path: Path) -> StateFor:
    """The state keys that make workers share their command state, on each backend."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        return lambda name: {
            "state_url": url,
            "state_path": str(tmp_path / name / "unused.sqlite3"),
        }
    shared = str(tmp_path / "shared" / "worker.sqlite3")
    return lambda name: {"state_path": shared}


async def wait_logged(log: Path, event: str, count: int = 1) -> None:
    """Until a worker's log holds `count` lines with `event` (polled, bounded by START). A
    quorum queue does not report its consumers in queue.declare-ok, so a worker's own word
    ("worker consuming", logged once basic.consume is confirmed) is what is waited on."""
    needle = f'"event":"{event}"'

    def logged() -> int:
        return log.read_text().count(needle) if log.exists() else 0

    async with asyncio.timeout(START):
        while True:
            if await asyncio.to_thread(logged) >= count:
                return
            await asyncio.sleep(0.05)  # another process's log: nothing to await


def write_config(path: Path, amqp_url: str, fake: FakeSimotel, state: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "amqp": {"url": amqp_url},
        "http": {"port": 0},
        "log": {"level": "info", "format": "json"},
        "sources": {
            "simotel": {
                "webhook": {"allow_unauthenticated": True},
                "api": api_settings(fake.url, read_timeout=60),
            }
        },
        "worker": state,
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
async def processes() -> AsyncIterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for w in started:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.kill()
                await w.proc.wait()


@pytest.mark.slow
async def test_killed_mid_originate_the_other_worker_answers_unknown(
    fake: FakeSimotel,
    amqp: AbstractRobustConnection,
    amqp_url: str,
    tmp_path: Path,
    shared_state: StateFor,
    processes: list[WorkerProcess],
) -> None:
    """Worker A is SIGKILLed while Simotel holds its originate; the redelivery lands on worker B
    (its own directory), which finds A's `started` row: `unknown`, never sent again."""
    fake.on(ACTION, held(fake.gate()))  # A never gets an answer
    settings = worker_settings(amqp_url, tmp_path, fake.url)
    bus = await Bus(amqp, settings).start()
    cid = await bus.send(ACTION, ORIGINATE, message_id="kill-shared-1")

    a, b = (
        WorkerProcess(
            write_config(tmp_path / name / "config.yaml", amqp_url, fake, shared_state(name)),
            tmp_path / name / "worker.log",
        )
        for name in ("a", "b")
    )
    processes.extend([a, b])
    await a.start()
    await fake.wait_for(ACTION, timeout=START)
    await b.start()
    await wait_logged(b.log, "worker consuming")  # B is consuming before A dies
    await a.kill()

    result = await bus.result(cid, timeout=START)
    letter = await bus.next_dead()
    assert await b.terminate() == 0

    assert (result.status, result.command_id, result.attempts) == ("unknown", "kill-shared-1", 0)
    assert len(fake.to(ACTION)) == 1  # never sent a second time
    assert (header(letter, "status"), header(letter, "reason")) == ("unknown", "interrupted")
    assert await bus.queued_commands() == []


async def publish_twice(
    amqp: AbstractRobustConnection,
    amqp_url: str,
    tmp_path: Path,
    fake: FakeSimotel,
    state: StateFor,
    processes: list[WorkerProcess],
    until_sent: int,
) -> tuple[list[Result], list[int]]:
    """One originate published twice with one message_id while two worker processes consume.
    Simotel holds every originate until `until_sent` have arrived and, when that is 1, until
    one result is out. Returns both results and how many commands each worker settled."""
    gate = fake.gate()
    fake.on(ACTION, held(gate))
    settings = worker_settings(amqp_url, tmp_path, fake.url)
    bus = await Bus(amqp, settings).start()
    workers = [
        WorkerProcess(
            write_config(tmp_path / name / "config.yaml", amqp_url, fake, state(name)),
            tmp_path / name / "worker.log",
        )
        for name in ("a", "b")
    ]
    processes.extend(workers)
    for w in workers:
        await w.start()
    for w in workers:
        await wait_logged(w.log, "worker consuming")
    cids = [await bus.send(ACTION, ORIGINATE, message_id="twice-1") for _ in range(2)]
    futures = [asyncio.ensure_future(bus.result(c, timeout=START)) for c in cids]
    await fake.wait_for(ACTION, until_sent, timeout=START)
    if until_sent == 1:  # the other copy is answered while the first is still running
        done, _ = await asyncio.wait(futures, timeout=START, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
    gate.set()
    results = list(await asyncio.gather(*futures))
    for w in workers:
        assert await w.terminate() == 0
    return results, [w.log.read_text().count('"event":"command settled"') for w in workers]


@pytest.mark.slow
async def test_one_message_id_published_twice_to_two_workers_runs_once(
    fake: FakeSimotel,
    amqp: AbstractRobustConnection,
    amqp_url: str,
    tmp_path: Path,
    shared_state: StateFor,
    processes: list[WorkerProcess],
) -> None:
    results, per_worker = await publish_twice(
        amqp, amqp_url, tmp_path, fake, shared_state, processes, 1
    )
    assert per_worker == [1, 1]  # each worker got one copy
    assert sorted(r.status for r in results) == ["ok", "unknown"]
    assert len(fake.to(ACTION)) == 1  # the phone rang once


@pytest.mark.slow
async def test_separate_sqlite_files_do_not_share_the_guarantee(
    fake: FakeSimotel,
    amqp: AbstractRobustConnection,
    amqp_url: str,
    tmp_path: Path,
    processes: list[WorkerProcess],
) -> None:
    """What docs/worker.md warns about: workers with a state file each run the same message_id
    once each."""

    def own_file(name: str) -> dict[str, Any]:
        return {"state_path": str(tmp_path / name / "worker.sqlite3")}

    results, per_worker = await publish_twice(
        amqp, amqp_url, tmp_path, fake, own_file, processes, 2
    )
    assert per_worker == [1, 1]
    assert [r.status for r in results] == ["ok", "ok"]
    assert len(fake.to(ACTION)) == 2  # sent twice
