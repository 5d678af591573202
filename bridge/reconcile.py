"""The reconciler: every call that ended on the PBX reaches the exchange, whether its webhook
arrived or not (docs/reconcile.md).

For each source with `reconcile.enabled`:
- **What was delivered.** Its durable queue `simotel.reconcile.{source}` (topology.py) is bound
  to `{source}.Cdr` and `{source}.CdrQueue`, so it holds what every ingress replica (and the
  reconciler itself) published. Before each page of a walk the queue is drained with basic.get:
  the call ids go to the state store (`mark_seen`), then the messages are acknowledged.
- **The walk.** Every `interval_s` each feed's cursor endpoint is walked from the stored cursor.
  The walk stops at the first record younger than `grace_s` (left for its webhook). Every
  record whose call was not seen becomes an event (`bridge.cdr`), published with confirms; the
  cursor is stored only once every publish before it was confirmed.
- **One active reconciler per source.** A lock held through the broker: an exclusive queue
  `simotel.reconcile.{source}.lock` on a connection of the reconciler's own. Only one
  connection can declare it; it goes with its holder's connection, and a standby replica takes
  over at its next attempt.

Errors: `ReconcileError` (a `BridgeError`) when Simotel's answer cannot be used; a failed pass is
logged and counted, and the next pass starts again from the stored cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aio_pika
import aio_pika.exceptions
import aiormq.exceptions
import orjson
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from bridge import cdr, topology
from bridge.amqp import Publisher, connect_first
from bridge.catalog import CATALOG
from bridge.config import ApiSettings, ReconcileSettings, Settings
from bridge.errors import LockLost as LockLost  # re-exported: defined in bridge.errors
from bridge.errors import PublishError
from bridge.errors import ReconcileError as ReconcileError
from bridge.metrics import ReconcileMetrics
from bridge.state import ReconcileStore
from bridge.translate import MAX_CALL_ID, OutgoingEvent, Payload, build_event

log = structlog.get_logger("bridge.reconcile")

DRAIN_BATCH = 500  # seen messages stored (and acknowledged) together


@dataclass(frozen=True, slots=True)
class CursorPage:
    last_id: str
    records: list[dict[str, Any]]


class CursorApi(Protocol):
    async def page(self, feed: cdr.Feed, after: str) -> CursorPage: ...


# ---------------------------------------------------------------------------------------------
# the pure core


def initial_cursor(start: str, now: float) -> str:
    """Where a feed without a stored cursor starts. `now`: an ObjectId of this second (ObjectIds
    sort by creation time first, so the walk begins with records stored from now on);
    `beginning`: the table's start; anything else: that record `_id`."""
    if start == "now":
        return f"{int(now):08x}" + "0" * 16
    if start == "beginning":
        return ""
    return start


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one page: publish these, then move the cursor to `cursor`."""

    publish: list[cdr.Recovered]
    cursor: str | None  # the _id of the last record dealt with; None: none was
    held: bool  # stopped at a record younger than the grace (the rest waits)
    held_age: float | None  # that record's age (seconds)
    skipped: dict[str, int]  # reason -> count


def plan_page(
    feed: cdr.Feed,
    records: Sequence[Mapping[str, Any]],
    seen: set[str],
    now: float,
    grace_s: float,
    limit: int,
) -> Plan:
    """Decide a page: records in order, up to the first one younger than `grace_s` (or whose
    age is unknown... it is then treated as old) or until `limit` publishes. `seen` holds the
    seen keys (`cdr.seen_key`) known so far, including those published earlier in the pass."""
    publish: list[cdr.Recovered] = []
    skipped: dict[str, int] = {}
    cursor: str | None = None
    keys = set(seen)
    for record in records:
        try:
            rid = cdr.record_id(record)
        except cdr.RecordError:
            skipped["no_id"] = skipped.get("no_id", 0) + 1
            continue
        at = cdr.inserted_at(record)
        if at is not None and now - at < grace_s:
            return Plan(publish, cursor, True, max(now - at, 0.0), skipped)
        if len(publish) >= limit:
            return Plan(publish, cursor, True, None if at is None else now - at, skipped)
        cursor = rid
        try:
            item = cdr.recover(feed, record)
        except cdr.RecordError:
            skipped["no_call_id"] = skipped.get("no_call_id", 0) + 1
            continue
        key = cdr.seen_key(item.event, item.call_id)
        if key in keys:
            skipped["seen"] = skipped.get("seen", 0) + 1
            continue
        keys.add(key)
        publish.append(item)
    return Plan(publish, cursor, False, None, skipped)


def recovered_event(exchange: str, source: str, item: cdr.Recovered, now: float) -> OutgoingEvent:
    """The publish of one recovered event: what the ingress would have published for its
    webhook (translate.build_event), with `message_id` from the record and `origin: reconciled`."""
    payload = Payload(fields=item.fields, form="json", raw=orjson.dumps(item.fields))
    event = build_event(exchange, source, item.event, payload, now=now, message_id=item.message_id)
    return dataclasses.replace(event, headers={**event.headers, "origin": "reconciled"})


def seen_of(message: AbstractIncomingMessage) -> str | None:
    """The seen key of a Cdr / CdrQueue event on the exchange; None when it names no call."""
    headers = message.headers or {}
    event = headers.get("event")
    if not isinstance(event, str):
        event = (message.routing_key or "").rsplit(".", 1)[-1]
    cid = headers.get("call_id")
    if isinstance(cid, bytes):
        cid = cid.decode("utf-8", "replace")
    if not isinstance(cid, str) or not cid:
        try:
            body = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict):
            return None
        cid = cdr.call_id({"unique_id": body.get("unique_id"), "cuid": body.get("cuid")})
    if not cid or len(cid) > MAX_CALL_ID:
        return None
    return cdr.seen_key(event, cid)


# ---------------------------------------------------------------------------------------------
# adapters


class SimotelCursors:
    """The cursor endpoints of one source, through the worker's Simotel client (auth, timeouts,
    rate limit, retries)."""

    def __init__(self, source: str, api: ApiSettings) -> None:
        from bridge.simotel import SimotelClient

        self._client = SimotelClient(source, api, max_connections=2)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def page(self, feed: cdr.Feed, after: str) -> CursorPage:
        from bridge.commands import HttpRequest

        endpoint = CATALOG[cdr.ENDPOINTS[feed]]
        request = HttpRequest(
            method=endpoint.method,
            path=endpoint.path,
            json={"_id": after},
            file=None,
            form={},
            slow=True,
            download=False,
        )
        execution = await self._client.execute(endpoint, request)
        outcome = execution.outcome
        if outcome.status != "ok":
            raise ReconcileError(f"{endpoint.path}: {outcome.status}: {outcome.error}")
        doc = outcome.response
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("data", []), list):
            raise ReconcileError(f"{endpoint.path}: the answer has no data list")
        records = [r for r in data.get("data") or [] if isinstance(r, dict)]
        last = cdr.plain(data.get("last_id"))
        return CursorPage("" if last is None else str(last)[:64], records)


class BrokerLock:
    """The lock of one source: an exclusive queue on a connection of its own."""

    def __init__(self, urls: Sequence[str], source: str, heartbeat: int = 20) -> None:
        # Every node of a cluster: the lock is taken on the first that answers (an exclusive
        # queue lives on the node it was declared on, and goes with that node or connection).
        self.urls = tuple(urls)
        self.source = source
        self.heartbeat = heartbeat
        self.name = f"{topology.reconcile_queue_name(source)}.lock"
        self.connection: AbstractConnection | None = None
        self.channel: AbstractChannel | None = None

    @property
    def held(self) -> bool:
        c, ch = self.connection, self.channel
        return c is not None and not c.is_closed and ch is not None and not ch.is_closed

    async def acquire(self) -> bool:
        """True when this process holds the lock (now or already)."""
        if self.held:
            return True
        await self.release()
        connection = await connect_first(
            self.urls,
            timeout=10,
            heartbeat=self.heartbeat,
            client_properties={"connection_name": f"simotel-bridge reconcile {self.source}"},
        )
        try:
            channel = await connection.channel()
            await channel.declare_queue(self.name, exclusive=True, durable=False)
        except aiormq.exceptions.ChannelLockedResource:
            await connection.close()
            return False
        except BaseException:
            await connection.close()
            raise
        self.connection, self.channel = connection, channel
        return True

    async def release(self) -> None:
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await connection.close()


# ---------------------------------------------------------------------------------------------
# the reconciler


# Every value `_error_kind` gives: the counters start at zero for each (see Reconciler).
ERROR_KINDS = ("api", "lock", "broker", "other")


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, LockLost):
        return "lock"
    if isinstance(exc, ReconcileError):
        return "api"
    if isinstance(exc, (PublishError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS)):
        return "broker"
    return "other"


@dataclass(slots=True)
class PassStats:
    published: int = 0
    seen: int = 0
    skipped: int = 0
    pages: int = 0


class Reconciler:
    """One source's reconciler. `run(stop)` loops; `run_pass()` is one walk of every feed."""

    def __init__(
        self,
        source: str,
        settings: Settings,
        store: ReconcileStore,
        api: CursorApi,
        publisher: Publisher,
        metrics: ReconcileMetrics,
        *,
        clock: Any = time.time,
    ) -> None:
        self.source = source
        self.settings = settings
        self.config: ReconcileSettings = settings.sources[source].reconcile
        self.store = store
        self.api = api
        self.publisher = publisher
        self.metrics = metrics
        self.clock = clock
        self.lock = BrokerLock(settings.amqp.endpoints(), source, settings.amqp.heartbeat)
        self.queue_name = topology.reconcile_queue_name(source)
        # The series an operator reads as "none so far" exist from the start, at zero, rather
        # than appearing with their first increment (rate() and increase() need the zero).
        for event in cdr.EVENTS.values():
            metrics.recovered.labels(source, event)
        for kind in ERROR_KINDS:
            metrics.errors.labels(source, kind)
        metrics.seen.labels(source)
        metrics.active.labels(source)

    async def close(self) -> None:
        await self.lock.release()
        self.metrics.active.labels(self.source).set(0)

    async def acquire(self) -> bool:
        had = self.lock.held
        held = await self.lock.acquire()
        if held and not had:
            # The seen queue and its bindings exist before anything is walked.
            assert self.lock.channel is not None
            await topology.declare(
                self.lock.channel,
                self.settings.amqp,
                sources={self.source: self.settings.sources[self.source]},
            )
        self.metrics.active.labels(self.source).set(1 if held else 0)
        return held

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: hold the lock (or wait for it), and walk every `interval_s`."""
        retry = min(self.config.interval_s, 10.0)
        was_active = False
        try:
            while not stop.is_set():
                wait = self.config.interval_s
                try:
                    if await self.acquire():
                        if not was_active:
                            log.info("reconciler active", source=self.source)
                            was_active = True
                        await self.run_pass()
                    else:
                        if was_active:
                            log.warning("reconciler lock lost", source=self.source)
                        was_active = False
                        wait = retry
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the top of a unit of work: log, count, go on
                    kind = _error_kind(exc)
                    self.metrics.errors.labels(self.source, kind).inc()
                    log.warning(
                        "reconciliation pass failed", source=self.source, kind=kind, error=repr(exc)
                    )
                    if not self.lock.held:
                        self.metrics.active.labels(self.source).set(0)
                        was_active = False
                    wait = retry
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=wait)
        finally:
            await self.close()

    async def run_pass(self, start: str | None = None) -> PassStats:
        """Walk every feed once. `start` (a one-off back-fill) replaces the stored cursors as
        the starting point; a cursor is then stored only if it moves past the stored one."""
        stats = PassStats()
        now = self.clock()
        await self.store.purge_seen(now - self.config.seen_window_h * 3600)
        for feed in cdr.FEEDS:
            await self.walk(feed, stats, start)
        self.metrics.last_success.labels(self.source).set(self.clock())
        log.info(
            "reconciliation pass done",
            source=self.source,
            recovered=stats.published,
            seen=stats.seen,
            pages=stats.pages,
        )
        return stats

    async def drain(self) -> int:
        """Take every message now in the seen queue: store their call ids, then ack."""
        if not self.lock.held:
            raise LockLost("the reconciler lock was lost")
        channel = self.lock.channel
        assert channel is not None
        queue = await channel.get_queue(self.queue_name, ensure=False)
        total = 0
        while True:
            batch: list[AbstractIncomingMessage] = []
            while len(batch) < DRAIN_BATCH:
                message = await queue.get(no_ack=False, fail=False, timeout=30)
                if message is None:
                    break
                batch.append(message)
            if not batch:
                return total
            keys = [k for k in (seen_of(m) for m in batch) if k is not None]
            await self.store.mark_seen(self.source, keys, self.clock())
            await batch[-1].ack(multiple=True)
            total += len(batch)
            self.metrics.seen.labels(self.source).inc(len(batch))
            if len(batch) < DRAIN_BATCH:
                return total

    async def walk(self, feed: cdr.Feed, stats: PassStats, start: str | None = None) -> None:
        stored = await self.store.get_cursor(self.source, feed)
        if start is not None:
            cursor = initial_cursor(start, self.clock())
        elif stored is not None:
            cursor = stored
        else:
            cursor = initial_cursor(self.config.from_, self.clock())
            await self.store.set_cursor(self.source, feed, cursor)
            stored = cursor
        exchange = self.settings.amqp.exchanges.events
        published_here: set[str] = set()
        lag = 0.0
        while True:
            stats.seen += await self.drain()
            page = await self.api.page(feed, cursor)
            stats.pages += 1
            if not page.records:
                break
            keys = []
            for r in page.records:
                cid = cdr.call_id(r)
                if cid is not None:
                    keys.append(cdr.seen_key(cdr.EVENTS[feed], cid))
            seen = await self.store.seen(self.source, keys) | published_here
            limit = self.config.max_per_pass - stats.published
            now = self.clock()
            plan = plan_page(feed, page.records, seen, now, self.config.grace_s, limit)
            for reason, count in plan.skipped.items():
                self.metrics.skipped.labels(self.source, feed, reason).inc(count)
            await self._publish(exchange, plan.publish, now)
            stats.published += len(plan.publish)
            published_here.update(cdr.seen_key(i.event, i.call_id) for i in plan.publish)
            before = cursor
            if plan.cursor is not None:
                cursor = plan.cursor
                if cursor != before and (start is None or stored is None or cursor > stored):
                    await self.store.set_cursor(self.source, feed, cursor)
            elif page.last_id and not plan.held:
                cursor = page.last_id  # a page of records without _id: Simotel's own cursor
            if plan.held:
                lag = plan.held_age or 0.0
                break
            if cursor == before:  # the end, or a server that does not move: stop either way
                break
        self.metrics.lag.labels(self.source, feed).set(lag)

    async def _publish(self, exchange: str, items: list[cdr.Recovered], now: float) -> None:
        """Publish, all confirmed, then remember them as seen."""
        if not items:
            return
        if not self.lock.held:
            raise LockLost("the reconciler lock was lost")
        events = [recovered_event(exchange, self.source, i, now) for i in items]
        await asyncio.gather(
            *(
                self.publisher.publish_raw(e.exchange, e.routing_key, e.body, e.properties())
                for e in events
            )
        )
        await self.store.mark_seen(
            self.source, [cdr.seen_key(i.event, i.call_id) for i in items], now
        )
        for i in items:
            self.metrics.recovered.labels(self.source, i.event).inc()
            log.info(
                "recovered",
                source=self.source,
                webhook_event=i.event,
                call_id=i.call_id,
                record_id=i.record_id,
                message_id=i.message_id,
            )


# ---------------------------------------------------------------------------------------------
# running it


@contextlib.asynccontextmanager
async def _reconcilers(
    settings: Settings, sources: Sequence[str], publisher: Publisher, metrics: ReconcileMetrics
) -> Any:
    from bridge.state import open_state_store

    async with contextlib.AsyncExitStack() as stack:
        # The worker's store (worker.state_path, or PostgreSQL at worker.state_url): one
        # interface, and with PostgreSQL the cursors and seen ids are shared by every replica,
        # so a fail-over neither loses nor repeats (docs/reconcile.md).
        store = await open_state_store(settings.worker, owner=f"reconcile:{os.getpid()}")
        stack.push_async_callback(store.aclose)
        out: list[Reconciler] = []
        for name in sources:
            src = settings.sources[name]
            if src.api is None:
                raise ReconcileError(f"source {name!r} has no api settings")
            api = SimotelCursors(name, src.api)
            stack.push_async_callback(api.aclose)
            reconciler = Reconciler(name, settings, store, api, publisher, metrics)
            stack.push_async_callback(reconciler.close)
            out.append(reconciler)
        yield out


async def run_reconcilers(
    settings: Settings,
    sources: Sequence[str],
    stop: asyncio.Event,
    broker: Any,
    publisher: Publisher,
    registry: Any,
) -> None:
    """The reconcilers of `sources` until `stop` (a role of `runtime.serve`)."""
    if not await broker.connected_unless(stop):
        return
    metrics = ReconcileMetrics(registry)
    async with _reconcilers(settings, sources, publisher, metrics) as reconcilers:
        await asyncio.gather(*(r.run(stop) for r in reconcilers))


async def run_once(
    settings: Settings,
    sources: Sequence[str],
    start: str | None = None,
    *,
    lock_wait: float = 15.0,
) -> dict[str, PassStats]:
    """One pass of each source's reconciler (`simotel-bridge reconcile --once / --from`).
    Raises ReconcileError when another process holds a source's lock for `lock_wait` s."""
    from prometheus_client import CollectorRegistry

    from bridge.amqp import Broker

    broker = Broker(settings.amqp, name="simotel-bridge reconcile")
    await broker.connect()
    publisher = Publisher(broker)
    out: dict[str, PassStats] = {}
    try:
        await publisher.start()
        metrics = ReconcileMetrics(CollectorRegistry())
        async with _reconcilers(settings, sources, publisher, metrics) as reconcilers:
            for r in reconcilers:
                deadline = time.monotonic() + lock_wait
                while not await r.acquire():
                    if time.monotonic() >= deadline:
                        raise ReconcileError(f"another reconciler of {r.source!r} is active")
                    await asyncio.sleep(0.5)  # the holder's connection may be closing
                out[r.source] = await r.run_pass(start)
    finally:
        await publisher.close()
        await broker.close()
    return out
