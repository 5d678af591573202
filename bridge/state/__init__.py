"""The worker's (and the reconciler's) state: one interface, two implementations.

- `SqliteStateStore` (`bridge.state.sqlite`): one SQLite file at `worker.state_path`, the
  embedded default. Shared only by the processes that open the same file on one host.
- `PostgresStateStore` (`bridge.state.postgres`): used when `worker.state_url: postgresql://...`
  is set. Shared by every worker that points at the same database, on any host.

Both give the same semantics, and the same test body runs against both (tests/test_state.py):

- `start()` is an atomic claim: of any number of workers, on any number of hosts, that call it
  for one `message_id`, exactly one gets True. The `started` row is durable before it returns
  (SQLite: `synchronous=FULL`; PostgreSQL: committed with `synchronous_commit=on`), so a
  non-retry-safe request is only sent once its claim would survive a crash of the worker (and,
  in PostgreSQL, of the database server).
- `finish()` keeps the result of an executed command; `get()` returns it, so a duplicate
  `message_id` is answered with the first result. Results are kept for `worker.state_ttl_hours`
  and then removed by `purge()`.
- Sizes are bounded: keys (message ids, sources, actions, feeds, call ids) are at most
  `MAX_KEY_BYTES` (the AMQP short-string limit, so any `message_id` the broker can carry fits),
  a cursor at most `MAX_CURSOR_BYTES`, a batch of call ids at most `MAX_BATCH`; a result larger
  than `worker.max_stored_result_bytes` is stored with its `response` replaced by a marker
  (`bound_result`), so the de-duplicated answer is still a valid result that says it was cut.
  A key over its bound raises `StateError`; nothing is silently shortened.
- The schema is created and migrated at open, idempotently, by any number of processes starting
  at once (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a transaction-scoped advisory lock). A schema
  newer than this version of the bridge is refused (`StateError`).

The reconciler's state (a cursor per source and feed, and the call ids already seen) lives in
the same store (`ReconcileStore`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson

from bridge.errors import StateError as StateError  # re-exported: defined in bridge.errors

if TYPE_CHECKING:
    from bridge.config import WorkerSettings

State = Literal["started", "done"]

MAX_KEY_BYTES = 255  # an AMQP short string: the longest message_id a broker can deliver
MAX_CURSOR_BYTES = 4096
MAX_BATCH = 10_000  # call ids in one mark_seen / seen call
MIN_RESULT_BYTES = 4096  # the smallest allowed max_stored_result_bytes
_MAX_ERROR_CHARS = 1000  # an error message kept in a cut result


@dataclass(frozen=True, slots=True)
class Record:
    message_id: str
    source: str
    action: str
    state: State
    result: bytes | None
    owner: str
    updated_at: float


class CommandStore(Protocol):
    """What the worker needs: at most once per `message_id`."""

    async def get(self, message_id: str) -> Record | None: ...

    async def start(self, message_id: str, source: str, action: str) -> bool:
        """Claim the command before it is sent (durably). False when a row already exists."""
        ...

    async def finish(
        self, message_id: str, source: str, action: str, result: bytes, *, durable: bool = True
    ) -> None:
        """Keep the result (JSON) of an executed command; `durable=False` may lose it on a crash
        (then a duplicate of a retry-safe command simply runs again)."""
        ...

    async def purge(self, now: float | None = None) -> int:
        """Forget commands older than the TTL; returns how many."""
        ...


class ReconcileStore(Protocol):
    """What the reconciler needs. `feed` is e.g. "cdr" or "queue"; times are `time.time()`."""

    async def get_cursor(self, source: str, feed: str) -> str | None: ...

    async def set_cursor(self, source: str, feed: str, cursor: str) -> None: ...

    async def mark_seen(self, source: str, call_ids: Sequence[str], at: float) -> None: ...

    async def seen(self, source: str, call_ids: Sequence[str]) -> set[str]: ...

    async def purge_seen(self, before: float) -> int: ...


class StateStore(CommandStore, ReconcileStore, Protocol):
    """Both, plus closing. `backend` is "sqlite" or "postgresql"."""

    backend: str

    async def aclose(self) -> None: ...


# --- bounds (pure) ---------------------------------------------------------------------------


def check_key(name: str, value: str) -> str:
    """`value` unchanged, or StateError when it is empty or longer than MAX_KEY_BYTES."""
    size = len(value.encode("utf-8", "surrogatepass"))
    if not value or size > MAX_KEY_BYTES:
        raise StateError(f"{name} must be 1 to {MAX_KEY_BYTES} bytes (got {size})")
    return value


def check_keys(name: str, values: Sequence[str]) -> list[str]:
    if isinstance(values, str):
        raise StateError(f"{name} must be a sequence of strings, not one string")
    if len(values) > MAX_BATCH:
        raise StateError(f"at most {MAX_BATCH} {name} at once (got {len(values)})")
    return [check_key(name, v) for v in values]


def check_cursor(cursor: str) -> str:
    size = len(cursor.encode("utf-8", "surrogatepass"))
    if size > MAX_CURSOR_BYTES:
        raise StateError(f"a cursor must be at most {MAX_CURSOR_BYTES} bytes (got {size})")
    return cursor


def bound_result(raw: bytes, limit: int) -> bytes:
    """`raw` (a stored result: a JSON object) when it fits in `limit` bytes; otherwise the same
    object with `response` replaced by a marker saying it was cut and how big it was, and an
    over-long `error` shortened. Still valid JSON, still a valid result."""
    if len(raw) <= limit:
        return raw
    marker: dict[str, Any] = {
        "truncated": True,
        "original_bytes": len(raw),
        "limit_bytes": limit,
        "note": "the stored result was larger than worker.max_stored_result_bytes",
    }
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        return orjson.dumps(marker)
    doc["response"] = marker
    if isinstance(doc.get("error"), str) and len(doc["error"]) > _MAX_ERROR_CHARS:
        doc["error"] = doc["error"][:_MAX_ERROR_CHARS] + "…"
    cut = orjson.dumps(doc)
    if len(cut) <= limit:
        return cut
    # Only a hostile key could still be too long: keep the short scalar fields.
    small = {
        k: v
        for k, v in doc.items()
        if k == "response" or (not isinstance(v, str | list | dict) or len(str(v)) <= 256)
    }
    return orjson.dumps(small)


# --- the factory -----------------------------------------------------------------------------


async def open_state_store(settings: WorkerSettings, *, owner: str) -> StateStore:
    """The store the settings name: PostgreSQL when `state_url` is set, else the SQLite file at
    `state_path`. Its schema is created or migrated before it is returned."""
    ttl = settings.state_ttl_hours * 3600
    if settings.state_url is not None:
        from bridge.state.postgres import PostgresStateStore

        return await PostgresStateStore.open(
            settings.state_url.get_secret_value(),
            ttl_seconds=ttl,
            owner=owner,
            max_result_bytes=settings.max_stored_result_bytes,
            pool_size=settings.state_pool_size,
        )
    from bridge.state.sqlite import SqliteStateStore

    return SqliteStateStore(
        settings.state_path,
        ttl_seconds=ttl,
        owner=owner,
        max_result_bytes=settings.max_stored_result_bytes,
    )
