"""The state store, written once and run against both backends: SQLite (one file) and
PostgreSQL (a database of its own per test, on the machine's server).

Two store objects opened on the same file / database stand for two worker processes: each has
its own connection(s), so what one sees of the other goes through the database."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import psycopg
import pytest

from bridge.commands import Result
from bridge.config import WorkerSettings, load_settings
from bridge.errors import ConfigError
from bridge.state import (
    MAX_BATCH,
    MAX_CURSOR_BYTES,
    MAX_KEY_BYTES,
    StateError,
    StateStore,
    bound_result,
    open_state_store,
)
from bridge.state.postgres import PostgresStateStore
from bridge.state.sqlite import SqliteStateStore

Opener = Callable[..., Awaitable[StateStore]]
LIMIT = 8192  # max_stored_result_bytes in these tests


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> WorkerSettings:
    """Worker settings naming one state store of the parametrised backend."""
    fields: dict[str, object] = {
        "state_path": str(tmp_path / "state" / "worker.sqlite3"),
        "max_stored_result_bytes": LIMIT,
        "state_ttl_hours": 1.0,
    }
    if request.param == "postgresql":
        fields["state_url"] = request.getfixturevalue("pg_url")
    return WorkerSettings.model_validate(fields)


@pytest.fixture
async def opened(backend: WorkerSettings) -> AsyncIterator[Opener]:
    """Opens stores on the backend (each like another worker process); closes them after."""
    stores: list[StateStore] = []

    async def open_one(owner: str = "w1") -> StateStore:
        store = await open_state_store(backend, owner=owner)
        stores.append(store)
        return store

    try:
        yield open_one
    finally:
        for store in stores:
            await store.aclose()


def result_json(command_id: str, response: object = None, error: str | None = None) -> bytes:
    return Result(command_id, "call/originate/act", "simotel", "ok", 200, response, error).to_json()


# --- commands --------------------------------------------------------------------------------


async def test_claim_is_atomic_across_stores(opened: Opener) -> None:
    """Forty claims of one message_id from two stores at once: exactly one wins."""
    a, b = await opened("a"), await opened("b")
    claims = [s.start("m-1", "simotel", "call/originate/act") for s in (a, b) * 20]
    won = await asyncio.gather(*claims)
    assert won.count(True) == 1
    record = await b.get("m-1")
    assert record is not None and record.state == "started" and record.result is None
    assert record.owner in {"a", "b"}


async def test_started_then_done_is_seen_by_another_store(opened: Opener) -> None:
    a, b = await opened("a"), await opened("b")
    assert await b.get("m-2") is None
    assert await a.start("m-2", "simotel", "call/originate/act")
    started = await b.get("m-2")
    assert started is not None
    assert (started.source, started.action, started.state) == (
        "simotel",
        "call/originate/act",
        "started",
    )
    await a.finish("m-2", "simotel", "call/originate/act", result_json("m-2", {"x": 1}))
    done = await b.get("m-2")
    assert done is not None and done.state == "done"
    assert done.result is not None and Result.from_json(done.result).response == {"x": 1}
    assert not await b.start("m-2", "simotel", "call/originate/act")  # finished: no new claim


async def test_finish_without_start_and_not_durable(opened: Opener) -> None:
    store = await opened()
    await store.finish("m-3", "simotel", "pbx/users/search", result_json("m-3", [1]), durable=False)
    record = await store.get("m-3")
    assert record is not None and record.state == "done" and record.owner == "w1"
    assert record.result is not None and Result.from_json(record.result).response == [1]


async def test_results_are_kept_for_the_ttl_then_purged(opened: Opener) -> None:
    store = await opened()
    await store.finish("old", "simotel", "pbx/users/search", result_json("old"))
    assert await store.start("claimed", "simotel", "call/originate/act")
    now = time.time()
    assert await store.purge(now) == 0  # within the TTL (an hour)
    assert await store.get("old") is not None
    assert await store.purge(now + 3600 + 5) == 2
    assert await store.get("old") is None and await store.get("claimed") is None


async def test_a_large_result_is_stored_cut_and_still_valid(opened: Opener) -> None:
    store = await opened()
    big = {"data": ["x" * 100] * 1000}  # ~100 kB, over the 8 kB limit
    raw = result_json("big", big, error="e" * 5000)
    await store.finish("big", "simotel", "pbx/users/search", raw)
    record = await store.get("big")
    assert record is not None and record.result is not None
    assert len(record.result) <= LIMIT
    result = Result.from_json(record.result)  # still a valid result
    assert (result.command_id, result.status, result.http_status) == ("big", "ok", 200)
    assert result.response["truncated"] is True
    assert result.response["original_bytes"] == len(raw)
    assert result.error is not None and len(result.error) <= 1001

    small = result_json("small", {"data": [1]})
    await store.finish("small", "simotel", "pbx/users/search", small)
    kept = await store.get("small")
    assert kept is not None and kept.result == small  # under the limit: byte for byte


async def test_keys_are_bounded(opened: Opener) -> None:
    store = await opened()
    longest = "m" * MAX_KEY_BYTES
    assert await store.start(longest, "simotel", "call/originate/act")
    assert await store.get(longest) is not None
    too_long = "m" * (MAX_KEY_BYTES + 1)
    with pytest.raises(StateError):
        await store.start(too_long, "simotel", "call/originate/act")
    with pytest.raises(StateError):
        await store.finish("ok-id", "s" * 300, "call/originate/act", b"{}")
    with pytest.raises(StateError):
        await store.get("ي" * 128)  # 256 bytes in UTF-8
    with pytest.raises(StateError):
        await store.start("", "simotel", "call/originate/act")
    assert await store.get("ok-id") is None


# --- the reconciler's state ------------------------------------------------------------------


async def test_cursors_per_source_and_feed(opened: Opener) -> None:
    a, b = await opened("a"), await opened("b")
    assert await a.get_cursor("simotel", "cdr") is None
    await a.set_cursor("simotel", "cdr", "2026-12-01T10:00:00|abc")
    await a.set_cursor("simotel", "queue", "q-1")
    await a.set_cursor("other", "cdr", "o-1")
    assert await b.get_cursor("simotel", "cdr") == "2026-12-01T10:00:00|abc"
    await b.set_cursor("simotel", "cdr", "2026-12-01T11:00:00|def")
    assert await a.get_cursor("simotel", "cdr") == "2026-12-01T11:00:00|def"
    assert await a.get_cursor("simotel", "queue") == "q-1"
    assert await a.get_cursor("other", "cdr") == "o-1"
    await a.set_cursor("simotel", "cdr", "c" * MAX_CURSOR_BYTES)
    with pytest.raises(StateError):
        await a.set_cursor("simotel", "cdr", "c" * (MAX_CURSOR_BYTES + 1))
    with pytest.raises(StateError):
        await a.get_cursor("simotel", "f" * 300)
    assert await a.get_cursor("simotel", "cdr") == "c" * MAX_CURSOR_BYTES


async def test_seen_call_ids_and_their_purge(opened: Opener) -> None:
    a, b = await opened("a"), await opened("b")
    t0 = 1_800_000_000.0
    await a.mark_seen("simotel", ["c1", "c2", "c2"], t0)
    await a.mark_seen("simotel", [], t0)  # nothing to do
    await a.mark_seen("other", ["c3"], t0)
    assert await b.seen("simotel", ["c1", "c2", "c3", "c4"]) == {"c1", "c2"}
    assert await b.seen("other", ["c1", "c3"]) == {"c3"}
    assert await b.seen("simotel", []) == set()
    await b.mark_seen("simotel", ["c2"], t0 + 100)  # seen again later: kept longer
    await b.mark_seen("simotel", ["c2"], t0 + 50)  # an older time never shortens it
    assert await a.purge_seen(t0 + 10) == 2  # c1 and other/c3
    assert await a.seen("simotel", ["c1", "c2"]) == {"c2"}
    assert await a.purge_seen(t0 + 101) == 1
    assert await a.seen("simotel", ["c2"]) == set()


async def test_seen_is_bounded_and_handles_a_full_batch(opened: Opener) -> None:
    store = await opened()
    ids = [f"call-{i}" for i in range(MAX_BATCH)]
    await store.mark_seen("simotel", ids, 1.0)
    assert await store.seen("simotel", [*ids[:3], "nope"]) == set(ids[:3])
    assert len(await store.seen("simotel", ids)) == MAX_BATCH
    with pytest.raises(StateError):
        await store.mark_seen("simotel", [*ids, "one-more"], 1.0)
    with pytest.raises(StateError):
        await store.seen("simotel", [*ids, "one-more"])
    with pytest.raises(StateError):
        await store.mark_seen("simotel", ["x" * 256], 1.0)
    with pytest.raises(StateError):
        await store.mark_seen("simotel", "c1", 1.0)  # a string is not a list of ids


# --- schema ----------------------------------------------------------------------------------


async def test_schema_is_created_by_many_openers_at_once(opened: Opener) -> None:
    """Four processes starting together on an empty database: none fails, data survives a
    reopen (the migration runs again and finds nothing to do)."""
    stores = await asyncio.gather(*(opened(f"w{i}") for i in range(4)))
    assert await stores[0].start("m", "simotel", "call/originate/act")
    again = await opened("late")
    assert not await again.start("m", "simotel", "call/originate/act")


async def test_a_newer_schema_is_refused(backend: WorkerSettings, opened: Opener) -> None:
    store = await opened()
    await store.aclose()
    if backend.state_url is not None:
        url = backend.state_url.get_secret_value()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE simotel_bridge_schema SET version = 99")
    else:
        with sqlite3.connect(backend.state_path) as db:
            db.execute("UPDATE schema_version SET version = 99")
        db.close()
    with pytest.raises(StateError, match="schema version 99"):
        await open_state_store(backend, owner="w2")


def test_a_file_from_before_schema_versions_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(
        "CREATE TABLE commands (message_id TEXT PRIMARY KEY, source TEXT NOT NULL, "
        "action TEXT NOT NULL, state TEXT NOT NULL, result BLOB, owner TEXT NOT NULL, "
        "updated_at REAL NOT NULL)"
    )
    db.execute("INSERT INTO commands VALUES ('kept', 's', 'a', 'done', x'7b7d', 'o', 1.0)")
    db.close()
    store = SqliteStateStore(path, ttl_seconds=60, owner="new")
    try:
        (version,) = store._db.execute("SELECT version FROM schema_version").fetchone()
        assert version == 2
        assert store._db.execute("SELECT result FROM commands").fetchone() == (b"{}",)
    finally:
        store.close()


# --- pure pieces -----------------------------------------------------------------------------


def test_bound_result_keeps_json_valid() -> None:
    raw = orjson.dumps({"command_id": "c", "status": "ok", "response": "x" * 10_000})
    assert bound_result(raw, 20_000) is raw
    cut = orjson.loads(bound_result(raw, 4096))
    assert cut["command_id"] == "c" and cut["response"]["truncated"] is True
    # not an object (never written by the worker): only the marker is kept
    assert orjson.loads(bound_result(b"[" + b"1," * 5000 + b"1]", 4096))["truncated"] is True
    # a hostile long field other than response/error is dropped too
    hostile = orjson.dumps({"command_id": "c" * 9000, "status": "ok", "response": None})
    out = bound_result(hostile, 4096)
    assert len(out) <= 4096 and "command_id" not in orjson.loads(out)


def test_state_url_must_be_postgresql(tmp_path: Path) -> None:
    base = {"sources": {"s": {"webhook": {"allow_unauthenticated": True}}}}
    ok = load_settings(data={**base, "worker": {"state_url": "postgresql://u:pw@db/x"}}, environ={})
    assert ok.worker.state_url is not None and "pw" not in repr(ok.worker)
    env = {"SIMOTEL_BRIDGE__WORKER__STATE_URL": "postgresql://u:pw@db/x"}
    from_env = load_settings(data=base, environ=env)
    assert from_env.worker.state_url is not None
    assert from_env.worker.state_url.get_secret_value() == "postgresql://u:pw@db/x"
    empty = load_settings(data={**base, "worker": {"state_url": ""}}, environ={})
    assert empty.worker.state_url is None
    with pytest.raises(ConfigError) as info:
        load_settings(data={**base, "worker": {"state_url": "mysql://u:hunter2@db/x"}}, environ={})
    assert "worker.state_url" in str(info.value) and "hunter2" not in str(info.value)


@pytest.mark.postgres
async def test_postgres_claims_commit_synchronously_whatever_the_server_default(
    pg_url: str,
) -> None:
    """A database configured with synchronous_commit = off (a common speed-up) still gets
    durable claims: every pooled connection turns it on for its session."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        dbname = conn.info.dbname
        conn.execute(f'ALTER DATABASE "{dbname}" SET synchronous_commit = off')
    with psycopg.connect(pg_url, autocommit=True) as conn:  # the default now applies
        row = conn.execute("SHOW synchronous_commit").fetchone()
        assert row is not None and row[0] == "off"
    settings = WorkerSettings.model_validate({"state_url": pg_url})
    store = await open_state_store(settings, owner="w")
    try:
        assert isinstance(store, PostgresStateStore)
        async with store._pool.connection() as conn:
            cur = await conn.execute("SHOW synchronous_commit")
            assert await cur.fetchone() == ("on",)
    finally:
        await store.aclose()


async def test_an_unreachable_database_is_a_clear_error_without_the_password() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://bridge:hunter2@127.0.0.1:{port}/state"
    with pytest.raises(StateError, match=f"port={port}") as info:
        await PostgresStateStore.open(url, ttl_seconds=60, owner="w", timeout=1.0)
    assert "hunter2" not in str(info.value)
    with pytest.raises(StateError, match="cannot be parsed"):
        await PostgresStateStore.open("postgresql://[bad", ttl_seconds=60, owner="w")
