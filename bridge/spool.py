"""The local durable spool: accepted events the broker could not take (yet), kept in order.

One SQLite file in WAL mode, written with `synchronous=FULL`, so an event that `append` returned
for survives a crash of the process (SIGKILL) and of the machine. Rows are replayed oldest first
(`peek`) and removed in order once the broker confirmed them (`delete_through`). The spool is
bounded by a number of events and a number of bytes (body + headers + names); past either bound
`append` raises `SpoolFull` and the ingress answers 503.

This module does no asyncio: every method blocks (an fsync per append). The sink calls it from
one worker thread, so the event loop never waits on the disk. One process owns a spool file at
a time (SQLite exclusive locking mode); a second opener gets `SpoolFull(reason="locked")`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson

from bridge.errors import PublishError
from bridge.translate import OutgoingEvent

SpoolFullReason = Literal["messages", "bytes", "error", "locked", "disabled", "closed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq         INTEGER PRIMARY KEY,
    spooled_at  REAL    NOT NULL,
    size        INTEGER NOT NULL,
    exchange    TEXT    NOT NULL,
    routing_key TEXT    NOT NULL,
    message_id  TEXT    NOT NULL,
    event       TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    call_id     TEXT,
    timestamp   REAL    NOT NULL,
    headers     BLOB    NOT NULL,
    body        BLOB    NOT NULL
)
"""
_COLUMNS = (
    "seq, spooled_at, size, exchange, routing_key, message_id, event, source, call_id, "
    "timestamp, headers, body"
)


class SpoolFull(PublishError):
    """The spool cannot take the event: a bound is reached, the disk failed, or there is no
    spool. The ingress answers 503. `reason` is one of `SpoolFullReason`."""

    def __init__(self, reason: SpoolFullReason, detail: str) -> None:
        self.reason: SpoolFullReason = reason
        super().__init__(f"spool cannot take the event ({reason}): {detail}")


@dataclass(frozen=True, slots=True)
class Spooled:
    """One spooled event and its place in the spool."""

    seq: int
    spooled_at: float
    event: OutgoingEvent


def record_size(event: OutgoingEvent) -> int:
    """What an event counts against `max_bytes`: its body, headers and names."""
    named = (event.exchange, event.routing_key, event.message_id, event.event, event.source)
    headers = sum(len(k) + len(v) for k, v in event.headers.items())
    return len(event.body) + headers + sum(len(s) for s in named) + len(event.call_id or "")


class Spool:
    """An ordered, bounded, durable queue of `OutgoingEvent`s in one SQLite file.

    Not thread-safe: use it from one thread at a time (the sink uses a single worker thread).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_messages: int,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
        lock_timeout: float = 2.0,
    ) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.path, timeout=lock_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise SpoolFull("error", f"{self.path}: WAL mode refused ({mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            # Takes the exclusive lock now, not at the first append.
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(_SCHEMA)
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc):
                raise SpoolFull("locked", f"{self.path} is used by another process") from exc
            raise SpoolFull("error", f"{self.path}: {exc}") from exc
        except BaseException:
            self._db.close()
            raise
        count, size, oldest = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0), min(spooled_at) FROM spool"
        ).fetchone()
        self._depth: int = count
        self._bytes: int = size
        self._oldest: float | None = oldest

    @property
    def depth(self) -> int:
        """Events in the spool."""
        return self._depth

    @property
    def size_bytes(self) -> int:
        """Sum of `record_size` over the spooled events."""
        return self._bytes

    @property
    def oldest_spooled_at(self) -> float | None:
        """When the oldest spooled event was written (epoch seconds), None when empty."""
        return self._oldest

    def append(self, event: OutgoingEvent) -> int:
        """Write one event durably (fsynced when this returns) and return its sequence number.
        Raises SpoolFull past a bound or when the write fails."""
        size = record_size(event)
        if self._depth + 1 > self.max_messages:
            raise SpoolFull("messages", f"{self._depth} events spooled (max {self.max_messages})")
        if self._bytes + size > self.max_bytes:
            raise SpoolFull("bytes", f"{self._bytes} + {size} bytes over max {self.max_bytes}")
        now = self._clock()
        try:
            cur = self._db.execute(
                f"INSERT INTO spool ({_COLUMNS}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    now,
                    size,
                    event.exchange,
                    event.routing_key,
                    event.message_id,
                    event.event,
                    event.source,
                    event.call_id,
                    event.timestamp,
                    orjson.dumps(event.headers),
                    event.body,
                ),
            )
        except sqlite3.Error as exc:
            raise SpoolFull("error", f"write failed: {exc}") from exc
        seq = cur.lastrowid
        assert seq is not None
        self._depth += 1
        self._bytes += size
        if self._oldest is None:
            self._oldest = now
        return seq

    def peek(self, limit: int) -> list[Spooled]:
        """The oldest `limit` events, oldest first. Nothing is removed."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM spool ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [_row(r) for r in rows]

    def delete_through(self, seq: int) -> int:
        """Remove every event up to and including `seq` (they were confirmed by the broker).
        Returns how many were removed."""
        with self._transaction():
            n, size = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM spool WHERE seq <= ?", (seq,)
            ).fetchone()
            self._db.execute("DELETE FROM spool WHERE seq <= ?", (seq,))
            oldest = self._db.execute("SELECT min(spooled_at) FROM spool").fetchone()[0]
        self._depth -= n
        self._bytes -= size
        self._oldest = oldest
        if self._depth == 0 and n:
            # Give the pages back and keep the WAL file from growing across outages.
            # (executescript runs each pragma to completion; execute would free one page.)
            self._db.executescript("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")
        return int(n)

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _row(r: tuple[object, ...]) -> Spooled:
    (seq, spooled_at, _size, exchange, routing_key, message_id, event, source, call_id, ts, headers,
     body) = r  # fmt: skip
    assert isinstance(seq, int) and isinstance(spooled_at, float) and isinstance(body, bytes)
    assert isinstance(headers, bytes) and isinstance(ts, float)
    return Spooled(
        seq=seq,
        spooled_at=spooled_at,
        event=OutgoingEvent(
            exchange=str(exchange),
            routing_key=str(routing_key),
            body=body,
            message_id=str(message_id),
            event=str(event),
            source=str(source),
            call_id=None if call_id is None else str(call_id),
            timestamp=ts,
            headers=orjson.loads(headers),
        ),
    )
