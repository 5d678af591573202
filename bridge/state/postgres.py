"""The state store in PostgreSQL (`worker.state_url: postgresql://...`), shared by every worker
that points at the same database, on any number of hosts.

psycopg 3 with its async connection pool (`worker.state_pool_size` connections at most per
process). Every connection runs in autocommit mode with `synchronous_commit = on` for the
session, so `start()` (one `INSERT ... ON CONFLICT DO NOTHING`) is an atomic claim that is
committed and flushed to the database's WAL before it returns, whatever the server's default.
A result of a retry-safe command (`durable=False`) is written with `synchronous_commit = off` for
that one transaction: losing it only means a duplicate read runs again.

The tables live in the connection's default schema (choose another with
`?options=-csearch_path%3Dmyschema` in the URL). The schema is created and migrated at open in
one transaction holding a transaction-scoped advisory lock, so processes starting at once take
turns instead of failing. Nothing here logs the URL (it may hold a password).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from bridge.state import (
    Record,
    State,
    StateError,
    bound_result,
    check_cursor,
    check_key,
    check_keys,
)

log = structlog.get_logger("bridge.state")

POOL_TIMEOUT = 10.0  # seconds to wait for a pooled connection (or the first one at open)
# pg_advisory_xact_lock key for schema migrations: b"SIMOTEL" as a number
_MIGRATION_LOCK = int.from_bytes(b"SIMOTEL", "big")

# Version n is reached by running _MIGRATIONS[n - 1], inside the migration transaction.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS simotel_bridge_commands (
            message_id text PRIMARY KEY,
            source     text NOT NULL,
            action     text NOT NULL,
            state      text NOT NULL CHECK (state IN ('started', 'done')),
            result     bytea,
            owner      text NOT NULL,
            updated_at double precision NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS simotel_bridge_commands_updated_at "
        "ON simotel_bridge_commands (updated_at)",
    ),
    (
        """CREATE TABLE IF NOT EXISTS simotel_bridge_reconcile_cursors (
            source     text NOT NULL,
            feed       text NOT NULL,
            cursor     text NOT NULL,
            updated_at double precision NOT NULL,
            PRIMARY KEY (source, feed)
        )""",
        """CREATE TABLE IF NOT EXISTS simotel_bridge_reconcile_seen (
            source  text NOT NULL,
            call_id text NOT NULL,
            seen_at double precision NOT NULL,
            PRIMARY KEY (source, call_id)
        )""",
        "CREATE INDEX IF NOT EXISTS simotel_bridge_reconcile_seen_at "
        "ON simotel_bridge_reconcile_seen (seen_at)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


def describe(url: str) -> dict[str, str]:
    """Where a URL points, without its password (for logs)."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return {"url": "unparsable"}
    return {k: str(parts[k]) for k in ("host", "port", "dbname", "user") if parts.get(k)}


async def _configure(conn: AsyncConnection[Any]) -> None:
    await conn.execute("SET synchronous_commit = on")


async def migrate(conn: AsyncConnection[Any]) -> int:
    """Bring the schema to SCHEMA_VERSION; returns the version found. One transaction under an
    advisory lock: concurrent callers wait for each other, then find nothing left to do."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS simotel_bridge_schema (version integer NOT NULL)"
        )
        cur = await conn.execute("SELECT max(version) FROM simotel_bridge_schema")
        row = await cur.fetchone()
        found = int(row[0]) if row is not None and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise StateError(
                f"the state database has schema version {found}, newer than this bridge "
                f"knows ({SCHEMA_VERSION}): upgrade the bridge"
            )
        for statements in _MIGRATIONS[found:]:
            for sql in statements:
                await conn.execute(sql)
        if found < SCHEMA_VERSION:
            await conn.execute("DELETE FROM simotel_bridge_schema")
            await conn.execute(
                "INSERT INTO simotel_bridge_schema (version) VALUES (%s)", (SCHEMA_VERSION,)
            )
    return found


class PostgresStateStore:
    """A pool of connections to one database; each method is one short statement."""

    backend = "postgresql"

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection[Any]],
        *,
        ttl_seconds: float,
        owner: str,
        max_result_bytes: int,
    ) -> None:
        self._pool = pool
        self.ttl_seconds = ttl_seconds
        self.owner = owner
        self.max_result_bytes = max_result_bytes

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        ttl_seconds: float,
        owner: str,
        max_result_bytes: int = 1024 * 1024,
        pool_size: int = 4,
        timeout: float = POOL_TIMEOUT,
    ) -> PostgresStateStore:
        """Connect (waiting up to `timeout` for the first connection), migrate, return."""
        where = describe(url)
        if "url" in where:
            raise StateError("worker.state_url cannot be parsed as a PostgreSQL URL")
        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "application_name": "simotel-bridge"},
            configure=_configure,
            timeout=timeout,
            open=False,
            name="simotel-bridge-state",
        )
        try:
            await pool.open(wait=True, timeout=timeout)
            async with pool.connection() as conn:
                found = await migrate(conn)
        except PoolTimeout as exc:
            await pool.close()
            place = " ".join(f"{k}={v}" for k, v in where.items())
            raise StateError(
                f"cannot connect to the state database ({place}) within {timeout:g} s"
            ) from exc
        except BaseException:
            await pool.close()
            raise
        log.info(
            "state store opened",
            backend="postgresql",
            schema_version=SCHEMA_VERSION,
            migrated_from=found,
            pool_size=pool_size,
            **where,
        )
        return cls(pool, ttl_seconds=ttl_seconds, owner=owner, max_result_bytes=max_result_bytes)

    async def _execute(self, sql: str, params: tuple[Any, ...]) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(sql, params)
            return cur.rowcount

    # --- commands ----------------------------------------------------------------------------

    async def get(self, message_id: str) -> Record | None:
        check_key("message_id", message_id)
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT message_id, source, action, state, result, owner, updated_at "
                "FROM simotel_bridge_commands WHERE message_id = %s",
                (message_id,),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        state: State = "done" if row[3] == "done" else "started"
        result = bytes(row[4]) if row[4] is not None else None
        return Record(row[0], row[1], row[2], state, result, row[5], float(row[6]))

    async def start(self, message_id: str, source: str, action: str) -> bool:
        """Claim the command before it is sent: committed (synchronous_commit on) when this
        returns True. False when a row already exists."""
        count = await self._execute(
            "INSERT INTO simotel_bridge_commands "
            "(message_id, source, action, state, result, owner, updated_at) "
            "VALUES (%s, %s, %s, 'started', NULL, %s, %s) ON CONFLICT (message_id) DO NOTHING",
            (
                check_key("message_id", message_id),
                check_key("source", source),
                check_key("action", action),
                self.owner,
                time.time(),
            ),
        )
        return count == 1

    async def finish(
        self, message_id: str, source: str, action: str, result: bytes, *, durable: bool = True
    ) -> None:
        """Keep the result (JSON) of an executed command, cut to `max_result_bytes`."""
        params = (
            check_key("message_id", message_id),
            check_key("source", source),
            check_key("action", action),
            bound_result(result, self.max_result_bytes),
            self.owner,
            time.time(),
        )
        sql = (
            "INSERT INTO simotel_bridge_commands "
            "(message_id, source, action, state, result, owner, updated_at) "
            "VALUES (%s, %s, %s, 'done', %s, %s, %s) ON CONFLICT (message_id) DO UPDATE SET "
            "state = 'done', result = excluded.result, owner = excluded.owner, "
            "updated_at = excluded.updated_at"
        )
        async with self._pool.connection() as conn:
            if durable:
                await conn.execute(sql, params)
                return
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = off")
                await conn.execute(sql, params)

    async def purge(self, now: float | None = None) -> int:
        """Forget rows older than the TTL; returns how many."""
        limit = (time.time() if now is None else now) - self.ttl_seconds
        return await self._execute(
            "DELETE FROM simotel_bridge_commands WHERE updated_at < %s", (limit,)
        )

    # --- the reconciler's state --------------------------------------------------------------

    async def get_cursor(self, source: str, feed: str) -> str | None:
        params = (check_key("source", source), check_key("feed", feed))
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT cursor FROM simotel_bridge_reconcile_cursors "
                "WHERE source = %s AND feed = %s",
                params,
            )
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def set_cursor(self, source: str, feed: str, cursor: str) -> None:
        await self._execute(
            "INSERT INTO simotel_bridge_reconcile_cursors (source, feed, cursor, updated_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (source, feed) DO UPDATE SET "
            "cursor = excluded.cursor, updated_at = excluded.updated_at",
            (
                check_key("source", source),
                check_key("feed", feed),
                check_cursor(cursor),
                time.time(),
            ),
        )

    async def mark_seen(self, source: str, call_ids: Sequence[str], at: float) -> None:
        ids = check_keys("call_ids", call_ids)
        if not ids:
            return
        await self._execute(
            "INSERT INTO simotel_bridge_reconcile_seen (source, call_id, seen_at) "
            "SELECT %s, id, %s FROM unnest(%s::text[]) AS id "
            "ON CONFLICT (source, call_id) DO UPDATE SET "
            "seen_at = greatest(simotel_bridge_reconcile_seen.seen_at, excluded.seen_at)",
            (check_key("source", source), at, sorted(set(ids))),
        )

    async def seen(self, source: str, call_ids: Sequence[str]) -> set[str]:
        ids = check_keys("call_ids", call_ids)
        if not ids:
            return set()
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT call_id FROM simotel_bridge_reconcile_seen "
                "WHERE source = %s AND call_id = ANY(%s::text[])",
                (check_key("source", source), ids),
            )
            return {str(r[0]) for r in await cur.fetchall()}

    async def purge_seen(self, before: float) -> int:
        return await self._execute(
            "DELETE FROM simotel_bridge_reconcile_seen WHERE seen_at < %s", (before,)
        )

    # --- closing -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._pool.close()
