"""The worker with each state store (SQLite file, PostgreSQL database): a result over
`worker.max_stored_result_bytes` is published whole the first time, and a duplicate of its
message_id gets the stored, cut result: still a valid result, saying what was cut.

Real broker, real PostgreSQL, a fake Simotel over real HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest
from aio_pika.abc import AbstractRobustConnection

from bridge.config import Settings
from tests.helpers.worker import Bus, FakeSimotel, ok, running_worker, worker_settings

SEARCH = "pbx/users/search"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def state_settings(
    request: pytest.FixtureRequest, amqp_url: str, tmp_path: Path, fake: FakeSimotel
) -> Settings:
    worker = {"max_stored_result_bytes": 4096}
    if request.param == "postgresql":
        worker["state_url"] = request.getfixturevalue("pg_url")
    return worker_settings(amqp_url, tmp_path, fake.url, worker=worker)


async def test_a_large_result_is_deduplicated_from_its_cut_copy(
    fake: FakeSimotel, amqp: AbstractRobustConnection, state_settings: Settings
) -> None:
    users = [{"number": str(100 + i), "name": "x" * 40} for i in range(500)]  # ~30 kB
    fake.on(SEARCH, ok(users))
    bus = await Bus(amqp, state_settings).start()
    async with running_worker(state_settings):
        first = await bus.call(SEARCH, {"alike": "true"}, message_id="big-1")
        again = await bus.call(SEARCH, {"alike": "true"}, message_id="big-1")
    assert first.status == "ok" and first.response["data"] == users  # published whole
    assert len(fake.to(SEARCH)) == 1  # the duplicate did not run
    assert (again.status, again.command_id, again.http_status) == ("ok", "big-1", 200)
    marker = again.response
    assert marker["truncated"] is True and marker["limit_bytes"] == 4096
    assert marker["original_bytes"] > 30_000
