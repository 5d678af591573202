"""The reconciler's state in a local SQLite file (WAL): each feed's cursor, and the call ids seen
on the exchange with when they were seen. Blocking sqlite3 calls run in a worker thread, one at
a time, so the event loop never waits on the disk.

It implements `bridge.reconcile.ReconcileStore` and nothing more; a shared store (PostgreSQL)
with the same five methods makes fail-over between hosts exact (docs/reconcile.md).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reconcile_cursor (
    source TEXT NOT NULL,
    feed   TEXT NOT NULL,
    cursor TEXT NOT NULL,
    PRIMARY KEY (source, feed)
);
CREATE TABLE IF NOT EXISTS reconcile_seen (
    source  TEXT NOT NULL,
    call_id TEXT NOT NULL,
    at      REAL NOT NULL,
    PRIMARY KEY (source, call_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reconcile_seen_at ON reconcile_seen (at);
"""

_CHUNK = 500  # ids per statement (SQLite's variable limit is far above)


class SqliteReconcileStore:
    """`await SqliteReconcileStore.open(path)`; `await store.close()`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._lock = threading.Lock()

    @classmethod
    async def open(cls, path: str | Path) -> SqliteReconcileStore:
        return await asyncio.to_thread(cls._open, Path(path))

    @classmethod
    def _open(cls, path: Path) -> SqliteReconcileStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        return cls(db)

    async def close(self) -> None:
        await asyncio.to_thread(self._locked, self._db.close)

    async def get_cursor(self, source: str, feed: str) -> str | None:
        def get() -> str | None:
            row = self._db.execute(
                "SELECT cursor FROM reconcile_cursor WHERE source = ? AND feed = ?",
                (source, feed),
            ).fetchone()
            return None if row is None else str(row[0])

        return await asyncio.to_thread(self._locked, get)

    async def set_cursor(self, source: str, feed: str, cursor: str) -> None:
        def put() -> None:
            self._db.execute(
                "INSERT INTO reconcile_cursor (source, feed, cursor) VALUES (?, ?, ?) "
                "ON CONFLICT (source, feed) DO UPDATE SET cursor = excluded.cursor",
                (source, feed, cursor),
            )

        await asyncio.to_thread(self._locked, put)

    async def mark_seen(self, source: str, call_ids: Sequence[str], at: float) -> None:
        if not call_ids:
            return

        def put() -> None:
            with self._db:  # one transaction, one fsync
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO reconcile_seen (source, call_id, at) VALUES (?, ?, ?) "
                    "ON CONFLICT (source, call_id) DO UPDATE SET at = max(at, excluded.at)",
                    [(source, cid, at) for cid in call_ids],
                )

        await asyncio.to_thread(self._locked, put)

    async def seen(self, source: str, call_ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(call_ids))
        if not ids:
            return set()

        def get() -> set[str]:
            found: set[str] = set()
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT call_id FROM reconcile_seen WHERE source = ? AND call_id IN ({marks})",
                    (source, *chunk),
                ).fetchall()
                found.update(str(r[0]) for r in rows)
            return found

        return await asyncio.to_thread(self._locked, get)

    async def purge_seen(self, before: float) -> int:
        def purge() -> int:
            return self._db.execute("DELETE FROM reconcile_seen WHERE at < ?", (before,)).rowcount

        return await asyncio.to_thread(self._locked, purge)

    def _locked(self, fn: Callable[[], T]) -> T:
        with self._lock:
            return fn()
