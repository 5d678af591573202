"""The worker's state store: what it has started and finished, by command `message_id`.

It is what makes commands idempotent across redeliveries and worker restarts:

- before a command that is not retry-safe is sent to Simotel, a `started` row is written (and
  synced to disk); a redelivered command that finds such a row without a result may already have
  run, so it becomes `unknown` and is not sent again;
- after a command is executed, its result is written, so a second command with the same
  `message_id` gets the first result instead of running again.

SQLite in WAL mode. Every commit survives the process being killed; the rows that guard a command
that is not retry-safe (`durable=True`) are also synced to disk (`synchronous=FULL`) before the
request leaves, so they survive the machine going down too. The others use `synchronous=NORMAL`
(no fsync per commit): losing one only means a duplicate read is executed again. Several worker
processes on one host may share the file (SQLite locks it); `start()` is an atomic claim.
Rows older than the TTL are purged. The blocking SQLite calls run in a thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

State = Literal["started", "done"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    message_id TEXT PRIMARY KEY,
    source     TEXT NOT NULL,
    action     TEXT NOT NULL,
    state      TEXT NOT NULL,
    result     BLOB,
    owner      TEXT NOT NULL,
    updated_at REAL NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class Record:
    message_id: str
    source: str
    action: str
    state: State
    result: bytes | None
    owner: str
    updated_at: float


class StateStore:
    """One SQLite file; each method is one short transaction, run off the event loop."""

    def __init__(self, path: str | Path, *, ttl_seconds: float, owner: str) -> None:
        self.path = Path(path)
        self.ttl_seconds = ttl_seconds
        self.owner = owner
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    async def _run(
        self, sql: str, params: tuple[object, ...], *, durable: bool = True
    ) -> sqlite3.Cursor:
        def call() -> sqlite3.Cursor:
            with self._lock:
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                return self._db.execute(sql, params)

        return await asyncio.to_thread(call)

    async def get(self, message_id: str) -> Record | None:
        def call() -> tuple[str, str, str, str, bytes | None, str, float] | None:
            with self._lock:
                row: tuple[str, str, str, str, bytes | None, str, float] | None = self._db.execute(
                    "SELECT message_id, source, action, state, result, owner, updated_at "
                    "FROM commands WHERE message_id = ?",
                    (message_id,),
                ).fetchone()
                return row

        row = await asyncio.to_thread(call)
        if row is None:
            return None
        state: State = "done" if row[3] == "done" else "started"
        return Record(row[0], row[1], row[2], state, row[4], row[5], row[6])

    async def start(self, message_id: str, source: str, action: str) -> bool:
        """Claim the command before it is sent. False when a row already exists (someone
        started or finished it before)."""
        cur = await self._run(
            "INSERT INTO commands (message_id, source, action, state, result, owner, updated_at) "
            "VALUES (?, ?, ?, 'started', NULL, ?, ?) ON CONFLICT(message_id) DO NOTHING",
            (message_id, source, action, self.owner, time.time()),
        )
        return cur.rowcount == 1

    async def finish(
        self, message_id: str, source: str, action: str, result: bytes, *, durable: bool = True
    ) -> None:
        """Keep the result (JSON) of an executed command."""
        await self._run(
            "INSERT INTO commands (message_id, source, action, state, result, owner, updated_at) "
            "VALUES (?, ?, ?, 'done', ?, ?, ?) ON CONFLICT(message_id) DO UPDATE SET "
            "state = 'done', result = excluded.result, owner = excluded.owner, "
            "updated_at = excluded.updated_at",
            (message_id, source, action, result, self.owner, time.time()),
            durable=durable,
        )

    async def purge(self, now: float | None = None) -> int:
        """Forget rows older than the TTL; returns how many."""
        limit = (time.time() if now is None else now) - self.ttl_seconds
        cur = await self._run("DELETE FROM commands WHERE updated_at < ?", (limit,), durable=False)
        return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
