"""The state store in one SQLite file (the embedded default, `worker.state_path`).

SQLite in WAL mode. Every commit survives the process being killed; the rows that guard a command
that is not retry-safe (`durable=True`) are also synced to disk (`synchronous=FULL`) before the
request leaves, so they survive the machine going down too. The others use `synchronous=NORMAL`
(no fsync per commit): losing one only means a duplicate read is executed again.

Several worker processes **on one host** may share the file (SQLite locks it), and then `start()`
is an atomic claim among them. Workers with separate files share nothing: see docs/worker.md,
"Several workers". Do not put the file on a network file system. The blocking SQLite calls run in
a thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from bridge.state import (
    Record,
    State,
    StateError,
    bound_result,
    check_cursor,
    check_key,
    check_keys,
)

T = TypeVar("T")

# Version n is reached by running _MIGRATIONS[n - 1]. Every statement is idempotent, so a file
# written before versions were recorded (it has `commands` only) migrates cleanly.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS commands (
            message_id TEXT PRIMARY KEY,
            source     TEXT NOT NULL,
            action     TEXT NOT NULL,
            state      TEXT NOT NULL,
            result     BLOB,
            owner      TEXT NOT NULL,
            updated_at REAL NOT NULL
        )""",
    ),
    (
        "CREATE INDEX IF NOT EXISTS commands_updated_at ON commands (updated_at)",
        """CREATE TABLE IF NOT EXISTS reconcile_cursors (
            source     TEXT NOT NULL,
            feed       TEXT NOT NULL,
            cursor     TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (source, feed)
        )""",
        """CREATE TABLE IF NOT EXISTS reconcile_seen (
            source  TEXT NOT NULL,
            call_id TEXT NOT NULL,
            seen_at REAL NOT NULL,
            PRIMARY KEY (source, call_id)
        )""",
        "CREATE INDEX IF NOT EXISTS reconcile_seen_at ON reconcile_seen (seen_at)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)
_CHUNK = 500  # ids per IN (...) query


def migrate(db: sqlite3.Connection) -> int:
    """Bring the file's schema to SCHEMA_VERSION under an exclusive write lock; returns the
    version found. Several processes may run this at once: they take turns."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise StateError(
                f"the state file has schema version {found}, newer than this bridge "
                f"knows ({SCHEMA_VERSION}): upgrade the bridge"
            )
        for statements in _MIGRATIONS[found:]:
            for sql in statements:
                db.execute(sql)
        if found < SCHEMA_VERSION:
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found


class SqliteStateStore:
    """One SQLite file; each method is one short transaction, run off the event loop."""

    backend = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        ttl_seconds: float,
        owner: str,
        max_result_bytes: int = 1024 * 1024,
    ) -> None:
        self.path = Path(path)
        self.ttl_seconds = ttl_seconds
        self.owner = owner
        self.max_result_bytes = max_result_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            migrate(self._db)
        except BaseException:
            self._db.close()
            raise

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        def call() -> T:
            with self._lock:
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                return fn(self._db)

        return await asyncio.to_thread(call)

    async def _run(
        self, sql: str, params: tuple[object, ...], *, durable: bool = True
    ) -> sqlite3.Cursor:
        return await self._call(lambda db: db.execute(sql, params), durable=durable)

    # --- commands ----------------------------------------------------------------------------

    async def get(self, message_id: str) -> Record | None:
        check_key("message_id", message_id)

        def call(db: sqlite3.Connection) -> tuple[str, str, str, str, bytes | None, str, float]:
            row: tuple[str, str, str, str, bytes | None, str, float] = db.execute(
                "SELECT message_id, source, action, state, result, owner, updated_at "
                "FROM commands WHERE message_id = ?",
                (message_id,),
            ).fetchone()
            return row

        row = await self._call(call, durable=False)
        if row is None:
            return None
        state: State = "done" if row[3] == "done" else "started"
        return Record(row[0], row[1], row[2], state, row[4], row[5], row[6])

    async def start(self, message_id: str, source: str, action: str) -> bool:
        """Claim the command before it is sent. False when a row already exists (someone
        started or finished it before)."""
        params = (check_key("message_id", message_id), check_key("source", source))
        cur = await self._run(
            "INSERT INTO commands (message_id, source, action, state, result, owner, updated_at) "
            "VALUES (?, ?, ?, 'started', NULL, ?, ?) ON CONFLICT(message_id) DO NOTHING",
            (*params, check_key("action", action), self.owner, time.time()),
        )
        return cur.rowcount == 1

    async def finish(
        self, message_id: str, source: str, action: str, result: bytes, *, durable: bool = True
    ) -> None:
        """Keep the result (JSON) of an executed command, cut to `max_result_bytes`."""
        params = (check_key("message_id", message_id), check_key("source", source))
        await self._run(
            "INSERT INTO commands (message_id, source, action, state, result, owner, updated_at) "
            "VALUES (?, ?, ?, 'done', ?, ?, ?) ON CONFLICT(message_id) DO UPDATE SET "
            "state = 'done', result = excluded.result, owner = excluded.owner, "
            "updated_at = excluded.updated_at",
            (
                *params,
                check_key("action", action),
                bound_result(result, self.max_result_bytes),
                self.owner,
                time.time(),
            ),
            durable=durable,
        )

    async def purge(self, now: float | None = None) -> int:
        """Forget rows older than the TTL; returns how many."""
        limit = (time.time() if now is None else now) - self.ttl_seconds
        cur = await self._run("DELETE FROM commands WHERE updated_at < ?", (limit,), durable=False)
        return cur.rowcount

    # --- the reconciler's state --------------------------------------------------------------

    async def get_cursor(self, source: str, feed: str) -> str | None:
        params = (check_key("source", source), check_key("feed", feed))
        row = await self._call(
            lambda db: db.execute(
                "SELECT cursor FROM reconcile_cursors WHERE source = ? AND feed = ?", params
            ).fetchone(),
            durable=False,
        )
        return None if row is None else str(row[0])

    async def set_cursor(self, source: str, feed: str, cursor: str) -> None:
        await self._run(
            "INSERT INTO reconcile_cursors (source, feed, cursor, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(source, feed) DO UPDATE SET cursor = excluded.cursor, "
            "updated_at = excluded.updated_at",
            (
                check_key("source", source),
                check_key("feed", feed),
                check_cursor(cursor),
                time.time(),
            ),
        )

    async def mark_seen(self, source: str, call_ids: Sequence[str], at: float) -> None:
        check_key("source", source)
        rows = [(source, cid, at) for cid in check_keys("call_ids", call_ids)]
        if not rows:
            return

        def call(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO reconcile_seen (source, call_id, seen_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(source, call_id) DO UPDATE SET "
                    "seen_at = max(seen_at, excluded.seen_at)",
                    rows,
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._call(call)

    async def seen(self, source: str, call_ids: Sequence[str]) -> set[str]:
        check_key("source", source)
        ids = check_keys("call_ids", call_ids)

        def call(db: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(
                    str(r[0])
                    for r in db.execute(
                        "SELECT call_id FROM reconcile_seen "  # only placeholders are formatted in
                        f"WHERE source = ? AND call_id IN ({marks})",
                        (source, *chunk),
                    )
                )
            return found

        return await self._call(call, durable=False)

    async def purge_seen(self, before: float) -> int:
        cur = await self._run(
            "DELETE FROM reconcile_seen WHERE seen_at < ?", (before,), durable=False
        )
        return cur.rowcount

    # --- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
