"""The event sink: makes every accepted event durable before the ingress answers 200.

Two modes. **broker**: `accept` publishes and waits for the broker's confirm. **spool**: `accept`
appends to the local spool (`bridge.spool`), and a replayer task publishes the spool oldest first,
with confirms, removing what the broker confirmed. The sink enters spool mode when a publish fails
or the connection is known to be down, and leaves it only when the replayer finds the spool empty,
checked under the same lock every append takes: while anything is spooled, new events queue
behind it, so the events of one call keep their order.

    accept(event) -> "broker" | "spool"     raises SpoolFull (a PublishError) -> 503

Every wait is bounded: a publish by its timeout, the replayer's retries by a capped backoff.
A restart replays whatever the spool holds (`start`). See docs/durability.md for the guarantees.

Poison never blocks the line. A spooled row is moved to the spool's quarantine when
- it cannot be decoded (`undecodable`), or the client library refuses to encode it
  (`unpublishable`): no broker is involved, so at once;
- the broker refused it `poison_attempts` times while connected (`is_refusal`: a nack, the
  channel closed because of it, the connection closed on its frame; a timeout or a lost
  connection does not count), AND another spooled event
  (of another call when there is one), published alone right after, is confirmed (`refused`).
  A broker that takes nothing (an outage, a queue that refuses everything) is never a reason to
  quarantine.
Each quarantined event is copied to the dead-letter exchange with a `reason` header once the
broker takes the copy; the rows behind it go on in their order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, ParamSpec, TypeVar

import aiormq.exceptions
import orjson
import structlog
from aiormq import spec
from prometheus_client import Histogram

from bridge import wire
from bridge.amqp import APP_ID, REPLAY_BACKOFF, Backoff, Publisher
from bridge.config import Settings
from bridge.errors import PublishError
from bridge.metrics import SpoolMetrics
from bridge.spool import Quarantined, Spool, Spooled, SpoolFull
from bridge.translate import OutgoingEvent

__all__ = ["EventSink", "SpoolFull", "SpoolMetrics", "dead_copy"]

POISON_ATTEMPTS = 3  # refusals of one row, while connected, before it is compared with another
DEAD_COPY_ATTEMPTS = 5  # attempts to send a quarantined row's dead-letter copy
MAX_COPIED_HEADERS = 4096  # bytes of a quarantined event's own headers kept in its dead copy
# Raised by aiormq/pamqp while encoding a frame, before anything is sent: never the broker.
_ENCODING_ERRORS = (ValueError, TypeError, OverflowError)

log = structlog.get_logger("bridge.sink")

Mode = Literal["broker", "spool"]
P = ParamSpec("P")
T = TypeVar("T")


def ordered_window(batch: list[Spooled]) -> list[Spooled]:
    """The longest prefix of `batch` with at most one event per call (per routing key for events
    without a call id): these may be in flight together. Two events of one call never are, so
    a failed publish can never let a later event of its call overtake it."""
    seen: set[str] = set()
    window = []
    for s in batch:
        key = f"call:{s.event.call_id}" if s.event.call_id else f"key:{s.event.routing_key}"
        if key in seen:
            break
        seen.add(key)
        window.append(s)
    return window


def is_refusal(exc: PublishError) -> bool:
    """Whether the broker refused this very message (a nack; the channel closed because of it:
    unknown exchange, precondition, access; the connection closed on its frame), as opposed to
    being slow or gone (a timeout, a lost connection), which says nothing about the message."""
    return isinstance(
        exc.__cause__,
        aiormq.exceptions.DeliveryError
        | aiormq.exceptions.ConnectionFrameError
        | aiormq.exceptions.ChannelNotFoundEntity
        | aiormq.exceptions.ChannelPreconditionFailed
        | aiormq.exceptions.ChannelAccessRefused,
    )


def cancelling() -> bool:
    """Whether the current task is being cancelled. A CancelledError seen while it is not comes
    from a future someone else cancelled (aiormq does so to the pending confirms of a connection
    it closes): that is a failed publish, not a reason to stop."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class EventSink:
    """Publishes accepted events with confirms, spooling them when the broker cannot take them.

    `spool` None means the spool is disabled: a failed publish then raises SpoolFull("disabled").
    """

    def __init__(
        self,
        publisher: Publisher,
        spool: Spool | None,
        metrics: SpoolMetrics,
        *,
        publish_timeout: float | None = None,
        confirm_latency: Histogram | None = None,
        replay_window: int = 64,
        backoff: tuple[float, float] = REPLAY_BACKOFF,
        clock: Callable[[], float] = time.time,
        poison_attempts: int = POISON_ATTEMPTS,
        dead_exchange: str = "simotel.dead",
    ) -> None:
        self.publisher = publisher
        self.spool = spool
        self.metrics = metrics
        self.publish_timeout = publish_timeout or publisher.timeout
        self.confirm_latency = confirm_latency
        self.replay_window = replay_window
        self.backoff = backoff
        self._clock = clock
        self._mode: Mode = "broker"
        self._lock = asyncio.Lock()  # held for every append and for leaving spool mode
        self._wake = asyncio.Event()  # something was spooled
        self._drained = asyncio.Event()  # broker mode, nothing spooled
        self._drained.set()
        self._stopping = asyncio.Event()  # close() was called
        self._accepting = True
        self._replayer: asyncio.Task[None] | None = None
        self._probe = False  # whether the last replay attempt failed
        self.poison_attempts = poison_attempts
        self.dead_exchange = dead_exchange
        # seq -> (refusals while connected, the last error) of the rows at the head
        self._refusals: dict[int, tuple[int, str]] = {}
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        metrics.oldest_age.set_function(self.oldest_age)

    @classmethod
    async def open(
        cls, settings: Settings, publisher: Publisher, metrics: SpoolMetrics, **kwargs: Any
    ) -> EventSink:
        """A started sink on the spool file of `settings.spool` (or none when disabled)."""
        kwargs.setdefault("dead_exchange", settings.amqp.exchanges.dead)
        sink = cls(publisher, None, metrics, **kwargs)
        if settings.spool.enabled:
            s = settings.spool
            sink.spool = await sink._run(
                Spool, s.path, max_messages=s.max_messages, max_bytes=s.max_bytes
            )
        await sink.start()
        return sink

    # -- the ingress side -------------------------------------------------------------------

    async def accept(self, event: OutgoingEvent) -> Mode:
        """Make `event` durable: confirmed by the broker, or written to the spool."""
        if not self._accepting:
            raise SpoolFull("closed", "the sink is closed")
        if self._mode == "broker" and self.publisher.ready:
            try:
                await self._publish(event)
                return "broker"
            except asyncio.CancelledError as exc:
                if cancelling():
                    raise
                error: BaseException = exc  # aiormq cancels pending confirms on a lost connection
            except ValueError as exc:
                # aiormq refuses it before sending (a routing key over 255 bytes): it never could
                # be published, so spooling it would only block the spool's head. translate
                # keeps such events out; this is the last line.
                raise SpoolFull("error", f"the event cannot be published: {exc}") from exc
            except Exception as exc:  # PublishError, or anything else: the event is not lost
                error = exc
            log.warning("publish failed, spooling", message_id=event.message_id, error=repr(error))
            return await self._append(event, "publish_failed")
        return await self._append(event, "behind_spool" if self._mode == "spool" else "broker_down")

    def status(self) -> dict[str, Any]:
        """For /readyz: where the next event goes, and the state of the spool."""
        spool = self.spool
        full = spool is not None and spool.full
        mode: str = self._mode if self.publisher.ready or spool is None else "spool"
        if mode == "spool" and full:
            mode = "full"
        return {
            "mode": mode,
            "spool_enabled": self.spool is not None,
            "spool_full": full,
            "spool_depth": self.depth,
            "oldest_age_s": round(self.oldest_age(), 3),
            "quarantined": 0 if spool is None else spool.quarantine_depth,
        }

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def depth(self) -> int:
        return 0 if self.spool is None else self.spool.depth

    def oldest_age(self) -> float:
        oldest = None if self.spool is None else self.spool.oldest_spooled_at
        return 0.0 if oldest is None else max(0.0, self._clock() - oldest)

    async def _publish(self, event: OutgoingEvent) -> None:
        latency = await self.publisher.publish_raw(
            event.exchange,
            event.routing_key,
            event.body,
            event.properties(),
            mandatory=False,  # the events exchange has an alternate exchange: nothing is dropped
            timeout=self.publish_timeout,
        )
        if self.confirm_latency is not None:
            self.confirm_latency.observe(latency)

    async def _append(self, event: OutgoingEvent, reason: str) -> Mode:
        spool = self.spool
        if spool is None:
            self.metrics.full.labels("disabled").inc()
            raise SpoolFull("disabled", "the broker cannot take the event and there is no spool")
        async with self._lock:
            try:
                await self._run(spool.append, event)
            except SpoolFull as exc:
                self.metrics.full.labels(exc.reason).inc()
                log.error("spool full, refusing event", message_id=event.message_id, error=str(exc))
                raise
            if self._mode == "broker":
                log.warning("events now go to the spool", reason=reason)
            self._mode = "spool"
            self._drained.clear()
        self.metrics.spooled.labels(reason).inc()
        self._gauges()
        self._wake.set()
        return "spool"

    # -- the replayer -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the replayer. A non-empty spool (left by a previous run) is replayed first."""
        if self.spool is not None and self.spool.depth:
            self._mode = "spool"
            self._drained.clear()
            log.info("replaying the spool left by a previous run", depth=self.spool.depth)
        self._gauges()
        if self.spool is not None and self._replayer is None:
            self._replayer = asyncio.create_task(self._replay_forever(), name="spool-replayer")

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until the sink is back in broker mode with an empty spool (for shutdown and
        tests). Returns False if the timeout passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
        except TimeoutError:
            return False
        return True

    async def _replay_forever(self) -> None:
        pauses = Backoff(*self.backoff)
        while not self._stopping.is_set():
            if self._mode == "broker":
                if self._dead_copies_due():
                    try:
                        await self._send_dead_copies()
                    except Exception:  # the replayer must outlive anything unexpected
                        log.exception("replayer: sending dead-letter copies failed")
                    if self._dead_copies_due():  # one failed: try again after a pause
                        await self._wait_for_broker(pauses.next())
                        continue
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                progressed = await self._replay_batch()
            except asyncio.CancelledError as exc:
                if cancelling():
                    raise
                self._probe = True
                self.metrics.replay_failures.inc()
                log.warning("replay cancelled by the connection, will retry", error=repr(exc))
                progressed = False
            except Exception as exc:
                self._probe = True
                self.metrics.replay_failures.inc()
                log.warning("replay failed, will retry", error=str(exc))
                progressed = False
            if progressed:
                pauses.reset()
                continue
            # Nothing went through: wait for the connection (or a close) with a capped backoff.
            pause = pauses.next()
            try:
                await self._wait_for_broker(pause)
            except Exception:  # the replayer must outlive anything unexpected: log and go on
                log.exception("replayer: waiting for the broker failed")
                await asyncio.sleep(pause)

    async def _replay_batch(self) -> bool:
        """Publish the oldest events and remove what was confirmed, in order. Returns whether
        anything was replayed or quarantined (or spool mode was left)."""
        spool = self.spool
        assert spool is not None
        if not self.publisher.broker.ready:
            return False
        batch, undecodable = await self._run(spool.next_batch, self.replay_window)
        if undecodable:
            self._count_quarantined("undecodable", undecodable)
            log.error("undecodable spool rows quarantined", count=undecodable)
        await self._send_dead_copies()
        if not batch:
            async with self._lock:
                if spool.depth:
                    return undecodable > 0  # the counters disagree with the file: back off
                # Under the lock: no append can slip in between this check and the flip.
                self._mode = "broker"
                self._drained.set()
            self._gauges()
            log.info("spool drained, events go to the broker again")
            return True
        window = ordered_window(batch)
        if self._probe:  # the last attempt failed: try the head alone before a whole window
            head = window[0]
            refused, _ = self._refusals.get(head.seq, (0, ""))
            if refused >= self.poison_attempts and len(batch) > 1:
                # Another call's event when there is one; else the next event of the same call
                # (if it passes while the head is refused, the head is what the broker refuses).
                return await self._compare(head, window[1] if len(window) > 1 else batch[1])
            window = window[:1]
        results = await asyncio.gather(
            *(self._publish(s.event) for s in window), return_exceptions=True
        )
        confirmed = 0
        failed: tuple[Spooled, BaseException] | None = None
        for s, r in zip(window, results, strict=True):
            if isinstance(r, BaseException):  # a CancelledError here is a confirm aiormq dropped
                log.warning("replay publish failed", seq=s.seq, error=repr(r)[:300])
                failed = (s, r)
                break
            confirmed += 1
        # Only a confirmed prefix leaves the spool; anything confirmed after a failure is
        # published again later (a duplicate with the same message_id, never a reordering).
        if confirmed:
            last = window[confirmed - 1].seq
            await self._run(spool.delete_through, last)
            self._refusals = {k: v for k, v in self._refusals.items() if k > last}
            self.metrics.replayed.inc(confirmed)
            self._gauges()
        self._probe = confirmed < len(window)
        if failed is not None:
            self.metrics.replay_failures.inc()
            row, error = failed
            if isinstance(error, _ENCODING_ERRORS):
                # The client library cannot even encode it: it never will.
                await self._quarantine(row, "unpublishable", f"{type(error).__name__}: {error}")
                self._probe = False
                return True
            if isinstance(error, PublishError) and is_refusal(error):
                refused, _ = self._refusals.get(row.seq, (0, ""))
                self._refusals[row.seq] = (refused + 1, f"{type(error).__name__}: {error}")
        return confirmed > 0

    async def _compare(self, head: Spooled, other: Spooled) -> bool:
        """The head was refused `poison_attempts` times while connected. Publish `other` alone:
        if the broker takes it, the head is poison and goes to the quarantine; if not, the
        broker takes nothing, which is not the head's fault (its count starts again)."""
        try:
            await self._publish(other.event)
        except asyncio.CancelledError as exc:
            if cancelling():
                raise
            error: BaseException | None = exc
        except Exception as exc:
            error = exc
        else:
            error = None
        spool = self.spool
        assert spool is not None
        if error is not None:
            log.warning("the broker refuses other events too: not poison", error=repr(error)[:300])
            self._refusals[head.seq] = (0, "")
            self.metrics.replay_failures.inc()
            return False
        await self._run(spool.delete, other.seq)
        self.metrics.replayed.inc()
        _, why = self._refusals.get(head.seq, (0, ""))
        await self._quarantine(head, "refused", why)
        self._probe = False
        return True

    async def _quarantine(self, row: Spooled, reason: str, detail: str) -> None:
        spool = self.spool
        assert spool is not None
        await self._run(spool.quarantine, row.seq, f"{reason}: {detail}")
        self._refusals.pop(row.seq, None)
        self._count_quarantined(reason, 1)
        log.error(
            "spooled event quarantined: the broker will not take it",
            seq=row.seq,
            message_id=row.event.message_id[:200],
            reason=reason,
            detail=detail[:300],
        )
        await self._send_dead_copies()

    def _count_quarantined(self, reason: str, n: int) -> None:
        self.metrics.quarantined.labels(reason).inc(n)
        self._gauges()

    def _dead_copies_due(self) -> bool:
        spool = self.spool
        return spool is not None and spool.dead_copies_pending > 0 and self.publisher.ready

    async def _send_dead_copies(self) -> None:
        """Copy quarantined events to the dead-letter exchange (oldest first, while connected);
        stop at the first failure. A copy that failed DEAD_COPY_ATTEMPTS times is given up."""
        spool = self.spool
        if spool is None or not self._dead_copies_due():
            return
        for q in await self._run(spool.pending_dead_copies, 16):
            routing_key, body, properties = dead_copy(q)
            try:
                await self.publisher.publish_raw(
                    self.dead_exchange,
                    routing_key,
                    body,
                    properties,
                    mandatory=False,
                    timeout=self.publish_timeout,
                )
            except asyncio.CancelledError as exc:
                if cancelling():
                    raise
                error: BaseException | None = exc
            except Exception as exc:
                error = exc
            else:
                error = None
            state = await self._run(
                spool.mark_dead_copy, q.seq, sent=error is None, give_up_after=DEAD_COPY_ATTEMPTS
            )
            self.metrics.dead_copies.labels("retry" if state == "pending" else state).inc()
            if error is not None:
                log.warning("dead-letter copy of a quarantined event failed", seq=q.seq,
                            state=state, error=repr(error)[:300])  # fmt: skip
                break

    async def _wait_for_broker(self, bound: float) -> None:
        """Return when the connection is back, close() is called, or `bound` seconds pass."""
        waits = [
            asyncio.ensure_future(asyncio.sleep(bound)),
            asyncio.ensure_future(self._stopping.wait()),
        ]
        broker = self.publisher.broker
        if not broker.ready:
            try:
                connected = broker.connection.connected
            except PublishError:  # never connected yet: wait for the first connection
                waits.append(asyncio.ensure_future(broker.wait_connected()))
            else:
                waits.append(asyncio.ensure_future(connected.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking spool call on the spool's own thread (one at a time, in order)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._disk, lambda: fn(*args, **kwargs))

    def _gauges(self) -> None:
        m = self.metrics
        m.depth.set(self.depth)
        m.bytes.set(0 if self.spool is None else self.spool.size_bytes)
        m.mode.set(1 if self._mode == "spool" else 0)
        m.quarantine_depth.set(0 if self.spool is None else self.spool.quarantine_depth)

    async def close(self, drain_timeout: float = 5.0) -> None:
        """Stop accepting, give the replayer `drain_timeout` seconds to empty the spool, then
        stop it. Whatever is left stays in the spool for the next start."""
        self._accepting = False
        pending = self.spool is not None and drain_timeout > 0 and not self._drained.is_set()
        if pending and not await self.wait_drained(drain_timeout):
            log.warning("closing with events spooled", depth=self.depth)
        self._stopping.set()
        self._wake.set()
        if self._replayer is not None:
            self._replayer.cancel()
            await asyncio.wait([self._replayer])  # its CancelledError is not ours to raise
            self._replayer = None
        if self.spool is not None:
            await self._run(self.spool.close)
        self._disk.shutdown(wait=False)  # the close above was its last job


def dead_copy(q: Quarantined) -> tuple[str, bytes, spec.Basic.Properties]:
    """(routing key, body, properties) of a quarantined event's copy to the dead-letter
    exchange: its body as spooled, a `reason` header, and only what is sure to fit in a frame
    (every name cut to a shortstr; its own headers only when small). Pure; any row, even one
    that does not decode, makes a copy."""
    body = q.body if isinstance(q.body, bytes) else str(q.body).encode("utf-8", "replace")
    headers: dict[str, Any] = {
        "reason": wire.cut(q.reason, wire.SHORTSTR_MAX),
        "quarantine_id": q.seq,
        "quarantined_at": q.quarantined_at,
    }
    for name in ("exchange", "routing_key", "message_id", "event", "source", "call_id"):
        value = getattr(q, name)
        if isinstance(value, str):
            headers[f"original_{name}"] = wire.cut(value, wire.SHORTSTR_MAX)
    own: Any = None
    if isinstance(q.headers, bytes) and len(q.headers) <= MAX_COPIED_HEADERS:
        try:
            own = orjson.loads(q.headers)
        except orjson.JSONDecodeError:
            own = None
    if isinstance(own, dict) and all(
        isinstance(k, str) and len(k) <= 128 and isinstance(v, str | int | float | bool)
        for k, v in own.items()
    ):
        headers = {**own, **headers}
    else:
        headers["headers_dropped"] = True
    routing_key = q.routing_key if isinstance(q.routing_key, str) else ""
    routing_key = (
        routing_key
        if routing_key and wire.cut(routing_key, wire.SHORTSTR_MAX) == routing_key
        else "quarantine"
    )
    message_id = q.message_id if isinstance(q.message_id, str) else ""
    properties = spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=wire.cut(message_id, 200) or f"quarantine-{q.seq}",
        message_type="quarantined-event",
        app_id=APP_ID,
        headers=headers,
    )
    return routing_key, body, properties
