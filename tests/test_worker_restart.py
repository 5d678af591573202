"""The worker killed (SIGKILL) in the middle of a command, then restarted: a command that is not
retry-safe is not sent to Simotel a second time (`unknown`), a retry-safe one completes.

The worker runs as a real process (`python -m bridge.cli worker -c FILE`) against a config file;
Simotel is faked over real HTTP in the test process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from aio_pika.abc import AbstractRobustConnection

from bridge.config import Settings
from tests.helpers.worker import (
    ORIGINATE,
    START,
    Bus,
    FakeSimotel,
    WorkerProcess,
    api_settings,
    header,
    held,
    ok,
    worker_settings,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def config(amqp_url: str, tmp_path: Path, fake: FakeSimotel) -> Path:
    path = tmp_path / "config.yaml"
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
        "worker": {"state_path": str(tmp_path / "state" / "worker.sqlite3")},
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def settings(amqp_url: str, tmp_path: Path, fake: FakeSimotel) -> Settings:
    return worker_settings(amqp_url, tmp_path, fake.url)


@pytest.fixture
async def workers(config: Path, tmp_path: Path) -> AsyncIterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for w in started:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.kill()
                await w.proc.wait()


async def launch(workers: list[WorkerProcess], config: Path, tmp_path: Path) -> WorkerProcess:
    w = WorkerProcess(config, tmp_path / f"worker-{len(workers)}.log")
    workers.append(w)
    await w.start()
    return w


async def test_killed_during_originate_is_not_sent_again(
    fake: FakeSimotel,
    amqp: AbstractRobustConnection,
    settings: Settings,
    config: Path,
    tmp_path: Path,
    workers: list[WorkerProcess],
) -> None:
    fake.on("call/originate/act", held(fake.gate()))  # the first worker never gets an answer
    bus = await Bus(amqp, settings).start()
    cid = await bus.send("call/originate/act", ORIGINATE, message_id="kill-1")
    first = await launch(workers, config, tmp_path)
    await fake.wait_for("call/originate/act", timeout=START)
    await first.kill()

    second = await launch(workers, config, tmp_path)
    result = await bus.result(cid, timeout=START)
    letter = await bus.next_dead()
    assert await second.terminate() == 0

    assert (result.status, result.command_id, result.attempts) == ("unknown", "kill-1", 0)
    assert len(fake.to("call/originate/act")) == 1  # never sent a second time
    assert (header(letter, "status"), header(letter, "reason")) == ("unknown", "interrupted")
    assert await bus.queued_commands() == []


async def test_killed_during_read_completes_after_restart(
    fake: FakeSimotel,
    amqp: AbstractRobustConnection,
    settings: Settings,
    config: Path,
    tmp_path: Path,
    workers: list[WorkerProcess],
) -> None:
    fake.on("pbx/users/search", held(fake.gate()), ok([{"number": "101"}]))
    bus = await Bus(amqp, settings).start()
    cid = await bus.send("pbx/users/search", {"alike": "true"}, message_id="read-1")
    first = await launch(workers, config, tmp_path)
    await fake.wait_for("pbx/users/search", timeout=START)
    await first.kill()

    second = await launch(workers, config, tmp_path)
    result = await bus.result(cid, timeout=START)
    assert await second.terminate() == 0

    assert (result.status, result.response["data"]) == ("ok", [{"number": "101"}])
    assert [r.json for r in fake.to("pbx/users/search")] == [{"alike": "true"}] * 2
    assert bus.dead.empty()
    assert await bus.queued_commands() == []
