"""The local durable spool: accepted events the broker could not take (yet), kept in order.

One SQLite file in WAL mode, written with `synchronous=FULL`, so an event that `append` returned
for survives a crash of the process (SIGKILL) and of the machine. Rows are replayed oldest first
(`peek`) and removed in order once the broker confirmed them (`delete_through`). The spool is
bounded by a number of events and a number of bytes (body + headers + names); past either bound
`append` raises `SpoolFull` and the ingress answers 503.

Poison never blocks the line: a row that cannot be decoded, or that the sink judged the broker
will never take, is moved (`quarantine`) to the `quarantine` table of the same file, with its
reason. The rows behind it move on, in their order. Quarantined rows still count against the
bounds (they are accepted events, kept until an operator re-queues or drops them: `requeue`,
`drop`, the `simotel-bridge spool` command), and each has a copy to send to the dead-letter
exchange (`pending_dead_copies`, `mark_dead_copy`).

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

from bridge.errors import SpoolFull as SpoolFull  # re-exported: defined in bridge.errors
from bridge.errors import Undecodable as Undecodable
from bridge.translate import OutgoingEvent

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
# Rows of the spool moved aside: the same columns, untyped (a row that could not be decoded is
# copied as it is), plus why, when, and the state of its copy to the dead-letter exchange.
_QUARANTINE_SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantine (
    seq            INTEGER PRIMARY KEY,
    quarantined_at REAL    NOT NULL,
    reason         TEXT    NOT NULL,
    dead_copy      TEXT    NOT NULL DEFAULT 'pending',
    dead_attempts  INTEGER NOT NULL DEFAULT 0,
    spooled_at, size INTEGER NOT NULL, exchange, routing_key, message_id, event, source,
    call_id, timestamp, headers, body
)
"""
DeadCopyState = Literal["pending", "sent", "failed"]
MAX_REASON = 200  # characters of a quarantine reason kept
_COLUMNS = (
    "seq, spooled_at, size, exchange, routing_key, message_id, event, source, call_id, "
    "timestamp, headers, body"
)


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
            self._db.execute(_QUARANTINE_SCHEMA)
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
        self._q_depth = 0
        self._q_bytes = 0
        self._q_pending = 0
        self._count_quarantine()

    def _count_quarantine(self) -> None:
        self._q_depth, self._q_bytes, self._q_pending = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0), "
            "coalesce(sum(dead_copy = 'pending'), 0) FROM quarantine"
        ).fetchone()

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

    @property
    def quarantine_depth(self) -> int:
        """Events in the quarantine."""
        return self._q_depth

    @property
    def quarantine_bytes(self) -> int:
        return self._q_bytes

    @property
    def dead_copies_pending(self) -> int:
        """Quarantined events whose copy to the dead-letter exchange is still to be sent."""
        return self._q_pending

    @property
    def full(self) -> bool:
        """Whether a bound is reached (spooled and quarantined events together)."""
        return (
            self._depth + self._q_depth >= self.max_messages
            or self._bytes + self._q_bytes >= self.max_bytes
        )

    def append(self, event: OutgoingEvent) -> int:
        """Write one event durably (fsynced when this returns) and return its sequence number.
        Raises SpoolFull past a bound or when the write fails. Quarantined events count too."""
        size = record_size(event)
        held, held_bytes = self._depth + self._q_depth, self._bytes + self._q_bytes
        if held + 1 > self.max_messages:
            raise SpoolFull(
                "messages",
                f"{self._depth} events spooled, {self._q_depth} quarantined "
                f"(max {self.max_messages})",
            )
        if held_bytes + size > self.max_bytes:
            raise SpoolFull("bytes", f"{held_bytes} + {size} bytes over max {self.max_bytes}")
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
        """The oldest `limit` events, oldest first. Nothing is removed. A row that cannot be
        decoded is quarantined on the way (see `next_batch`)."""
        return self.next_batch(limit)[0]

    def next_batch(self, limit: int) -> tuple[list[Spooled], int]:
        """The oldest `limit` decodable events, oldest first, and how many rows on the way could
        not be decoded: those are moved to the quarantine (reason `undecodable`), so they never
        stop the rows behind them."""
        out: list[Spooled] = []
        moved = 0
        after = -1
        while len(out) < limit:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM spool WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit - len(out)),
            ).fetchall()
            if not rows:
                break
            for r in rows:
                after = r[0]
                try:
                    out.append(_row(r))
                except Exception as exc:  # anything a damaged row can raise
                    self.quarantine(r[0], f"undecodable: {type(exc).__name__}")
                    moved += 1
        return out, moved

    def quarantine(self, seq: int, reason: str) -> bool:
        """Move one spooled row to the quarantine, with `reason`. False if it is not spooled."""
        with self._transaction():
            row = self._db.execute("SELECT size FROM spool WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return False
            self._db.execute(
                "INSERT OR REPLACE INTO quarantine (seq, quarantined_at, reason, spooled_at, size, "
                "exchange, routing_key, message_id, event, source, call_id, timestamp, headers, "
                "body) SELECT seq, ?, ?, spooled_at, size, exchange, routing_key, message_id, "
                "event, source, call_id, timestamp, headers, body FROM spool WHERE seq = ?",
                (self._clock(), reason[:MAX_REASON], seq),
            )
            self._db.execute("DELETE FROM spool WHERE seq = ?", (seq,))
            oldest = self._db.execute("SELECT min(spooled_at) FROM spool").fetchone()[0]
        size = int(row[0])
        self._depth -= 1
        self._bytes -= size
        self._oldest = oldest
        self._count_quarantine()
        return True

    def delete(self, seq: int) -> bool:
        """Remove one spooled row (confirmed by the broker out of order). False if absent."""
        with self._transaction():
            row = self._db.execute("SELECT size FROM spool WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM spool WHERE seq = ?", (seq,))
            oldest = self._db.execute("SELECT min(spooled_at) FROM spool").fetchone()[0]
        self._depth -= 1
        self._bytes -= int(row[0])
        self._oldest = oldest
        return True

    def quarantined(self, limit: int | None = None) -> list[Quarantined]:
        """Quarantined rows, oldest first."""
        rows = self._db.execute(
            f"SELECT {_Q_COLUMNS} FROM quarantine ORDER BY seq LIMIT ?",
            (-1 if limit is None else limit,),
        ).fetchall()
        return [_quarantined(r) for r in rows]

    def pending_dead_copies(self, limit: int) -> list[Quarantined]:
        """Quarantined rows whose dead-letter copy is still to be sent, oldest first."""
        rows = self._db.execute(
            f"SELECT {_Q_COLUMNS} FROM quarantine WHERE dead_copy = 'pending' ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [_quarantined(r) for r in rows]

    def mark_dead_copy(self, seq: int, *, sent: bool, give_up_after: int) -> DeadCopyState:
        """Record an attempt to send a row's dead-letter copy. A copy that failed
        `give_up_after` times is marked `failed` and not tried again (the row stays listed)."""
        with self._transaction():
            self._db.execute(
                "UPDATE quarantine SET dead_attempts = dead_attempts + 1, dead_copy = CASE "
                "WHEN ? THEN 'sent' WHEN dead_attempts + 1 >= ? THEN 'failed' "
                "ELSE 'pending' END WHERE seq = ?",
                (sent, give_up_after, seq),
            )
            row = self._db.execute(
                "SELECT dead_copy FROM quarantine WHERE seq = ?", (seq,)
            ).fetchone()
        self._count_quarantine()
        state: DeadCopyState = "sent" if row is None else row[0]
        return state

    def requeue(self, seqs: list[int] | None = None) -> list[int]:
        """Move quarantined rows (all of them for None) back to the end of the spool, oldest
        first; they get new sequence numbers, which are returned."""
        new: list[int] = []
        with self._transaction():
            if seqs is None:
                seqs = [r[0] for r in self._db.execute("SELECT seq FROM quarantine ORDER BY seq")]
            for seq in sorted(seqs):
                cur = self._db.execute(
                    f"INSERT INTO spool ({_COLUMNS}) SELECT NULL, ?, size, exchange, routing_key, "
                    "message_id, event, source, call_id, timestamp, headers, body "
                    "FROM quarantine WHERE seq = ?",
                    (self._clock(), seq),
                )
                if cur.rowcount:
                    assert cur.lastrowid is not None
                    new.append(cur.lastrowid)
                    self._db.execute("DELETE FROM quarantine WHERE seq = ?", (seq,))
            self._recount()
        return new

    def drop(self, seqs: list[int]) -> int:
        """Delete quarantined rows for good. Returns how many were deleted."""
        with self._transaction():
            n = sum(
                self._db.execute("DELETE FROM quarantine WHERE seq = ?", (s,)).rowcount
                for s in seqs
            )
        self._count_quarantine()
        return n

    def _recount(self) -> None:
        self._depth, self._bytes, self._oldest = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0), min(spooled_at) FROM spool"
        ).fetchone()
        self._count_quarantine()

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


_Q_COLUMNS = (
    "seq, quarantined_at, reason, dead_copy, dead_attempts, spooled_at, size, exchange, "
    "routing_key, message_id, event, source, call_id, timestamp, headers, body"
)


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A quarantined row as stored: its fields may be of any type (it may not decode)."""

    seq: int
    quarantined_at: float
    reason: str
    dead_copy: DeadCopyState
    dead_attempts: int
    spooled_at: object
    size: int
    exchange: object
    routing_key: object
    message_id: object
    event: object
    source: object
    call_id: object
    timestamp: object
    headers: object
    body: object


def _quarantined(r: tuple[object, ...]) -> Quarantined:
    seq, at, reason, state, attempts, spooled_at, size, *rest = r
    assert isinstance(seq, int) and isinstance(at, float) and isinstance(attempts, int)
    assert isinstance(size, int) and state in ("pending", "sent", "failed")
    return Quarantined(seq, at, str(reason), state, attempts, spooled_at, size, *rest)


def _row(r: tuple[object, ...]) -> Spooled:
    """Decode one spool row, checking every column (never with `assert`: a damaged row must
    raise the same way whatever the interpreter's flags)."""
    (seq, spooled_at, _size, exchange, routing_key, message_id, event, source, call_id, ts, headers,
     body) = r  # fmt: skip
    texts = (exchange, routing_key, message_id, event, source)
    if not isinstance(seq, int) or not isinstance(spooled_at, float):
        raise Undecodable("seq or spooled_at")
    if not isinstance(body, bytes) or not isinstance(headers, bytes):
        raise Undecodable("body or headers are not bytes")
    if not all(isinstance(t, str) for t in texts) or not isinstance(call_id, str | None):
        raise Undecodable("a name is not text")
    if not isinstance(ts, float):
        raise Undecodable("timestamp")
    decoded = orjson.loads(headers)  # JSONDecodeError is a ValueError
    if not isinstance(decoded, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int | float | bool) for k, v in decoded.items()
    ):
        raise Undecodable("headers are not a map of plain values")
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
            call_id=call_id,
            timestamp=ts,
            headers=decoded,
        ),
    )
