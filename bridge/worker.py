"""The command worker (docs/contract.md §3, §4): consumes `simotel.commands`, calls Simotel,
publishes the result, and only then acknowledges the command.

    delivery -> _handle -> _process (validate, de-duplicate, deadline, lane, execute)
             -> _settle  (publish result + reply + dead letter, wait for confirms, ack)

`_settle` is the one place that acks, hands back (nack + requeue) or dead-letters a command.
A result the broker does not confirm is published again with exponential backoff (for up to
`publish_retry_for` seconds, or until shutdown) before the command is handed back; a command is
also handed back on shutdown, or when something unexpected broke. On the last delivery the
quorum queue allows (`x-delivery-count` = `amqp.commands_delivery_limit`), a command that would
be handed back is settled instead, with a `delivery_limit` result and a dead letter, so the
broker never dead-letters a command without a result while the worker can still publish one.

Every message published for a command has a stable `message_id` derived from the command's:
`{command_id}` for the result and the reply, `{command_id}:dead` for the dead letter, so a
result published twice (after a hand-back and a redelivery) can be de-duplicated.

Lanes: report searches (Endpoint.lane == "slow") run in their own pool of
`worker.report_prefetch`, everything else in a pool of `worker.prefetch`, so slow searches never
hold up click-to-call or agent commands. The consumer window is `2 * prefetch +
report_prefetch`: room for the fast pool, the slow pool and `prefetch` commands waiting for a
slot.

Run it alone with `simotel-bridge worker -c config.yaml`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import UTC
from typing import Any

import aio_pika.exceptions
import httpx
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    ConsumerTag,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bridge import wire
from bridge.amqp import Broker, Publisher, Unroutable, close_quietly, json_message
from bridge.commands import (
    MAX_HEADER_TEXT,
    STATUSES,
    Command,
    Envelope,
    InvalidCommand,
    Result,
    build_request,
    copied_headers,
    delivery_count,
    describe_invalid,
    is_expired,
    is_last_delivery,
    make_delivery_limit,
    make_result,
    needs_dead_letter,
    parse_command,
    result_key,
    result_message,
    safe_id,
)
from bridge.config import Settings
from bridge.errors import ConfigError, PublishError
from bridge.simotel import SimotelClient
from bridge.sink import is_refusal
from bridge.state import StateStore, open_state_store

log = structlog.get_logger("bridge.worker")

_PURGE_EVERY = 3600.0
PUBLISH_RETRY_FOR = 30.0  # seconds a result is re-published before the command is handed back
PUBLISH_RETRY_DELAY = 0.25  # first pause between attempts; doubled each time
PUBLISH_RETRY_MAX_DELAY = 5.0
REFUSALS_BEFORE_SAFE_RESULT = 3  # refusals of one result before a safe one replaces it
UNPUBLISHABLE = "result_unpublishable"
# Raised by aiormq/pamqp while encoding a frame, before anything is sent: never the broker.
ENCODING_ERRORS = (ValueError, TypeError, OverflowError)


class WorkerMetrics:
    """The worker's Prometheus metrics, registered on the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.commands = Counter(
            "simotel_bridge_commands_total",
            "Commands settled, by source and result status.",
            ["source", "status"],
            registry=registry,
        )
        self.duplicates = Counter(
            "simotel_bridge_command_duplicates_total",
            "Commands answered with the result of an earlier command with the same message_id.",
            registry=registry,
        )
        self.handed_back = Counter(
            "simotel_bridge_commands_handed_back_total",
            "Commands returned to the queue (shutdown, unconfirmed result, unexpected error).",
            registry=registry,
        )
        self.publish_failures = Counter(
            "simotel_bridge_result_publish_failures_total",
            "Attempts to publish a result (or its reply or dead letter) the broker did not "
            "confirm; each is retried with backoff before the command is handed back.",
            registry=registry,
        )
        self.unpublishable = Counter(
            "simotel_bridge_results_unpublishable_total",
            "Results the broker refused (too large, cannot be encoded, nacked): replaced by a "
            "result without its response (reason result_unpublishable) and a dead letter.",
            registry=registry,
        )
        self.in_flight = Gauge(
            "simotel_bridge_commands_in_flight",
            "Commands being executed, by lane.",
            ["lane"],
            registry=registry,
        )
        self.simotel_latency = Histogram(
            "simotel_bridge_simotel_request_seconds",
            "Duration of one HTTP request to Simotel, by source and endpoint kind.",
            ["source", "kind"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        for status in STATUSES:  # make every status visible at 0
            self.commands.labels(source="_", status=status)


def envelope_of(message: AbstractIncomingMessage, received_at: float) -> Envelope:
    ts = message.timestamp
    if ts is not None and ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    expiration = message.expiration
    return Envelope(
        body=message.body,
        routing_key=message.routing_key or "",
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        headers=dict(message.headers or {}),
        expiration=float(expiration) if isinstance(expiration, int | float) else None,
        timestamp=ts.timestamp() if ts is not None else None,
        redelivered=bool(message.redelivered),
        received_at=received_at,
    )


class Worker:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        publisher: Publisher,
        clients: Mapping[str, SimotelClient],
        store: StateStore,
        metrics: WorkerMetrics,
        *,
        publish_retry_for: float = PUBLISH_RETRY_FOR,
        publish_retry_delay: float = PUBLISH_RETRY_DELAY,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.publisher = publisher
        self.clients = clients
        self.store = store
        self.metrics = metrics
        self.publish_retry_for = publish_retry_for
        self.publish_retry_delay = publish_retry_delay
        w = settings.worker
        self._lanes = {
            "fast": asyncio.Semaphore(w.prefetch),
            "slow": asyncio.Semaphore(w.report_prefetch),
        }
        self._tasks: set[asyncio.Task[None]] = set()
        self._parked: set[asyncio.Task[Any]] = set()
        self._inflight: dict[str, asyncio.Future[Result | None]] = {}
        self._stopping = False
        self._stopped = asyncio.Event()  # set with _stopping: wakes publish retries up
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: ConsumerTag | None = None
        self._purged_at = 0.0
        q = settings.amqp.queues
        self._own_queues = frozenset({q.commands, q.dead, q.unrouted})

    @property
    def window(self) -> int:
        w = self.settings.worker
        return 2 * w.prefetch + w.report_prefetch

    async def start(self) -> None:
        await self._purge()
        self._channel = await self.broker.channel(prefetch=self.window, confirms=False)
        await self._consume()
        # aio-pika does not restore this consumer (the queue is looked up, not declared, so a
        # quorum queue that is still recovering after a broker crash cannot hold up the whole
        # reconnection): consume again, in the background, whenever the channel reopens.
        if isinstance(self._channel, AbstractRobustChannel):
            self._channel.reopen_callbacks.add(self._on_reopened)

    async def _consume(self) -> None:
        assert self._channel is not None
        self._queue = await self._channel.get_queue(
            self.settings.amqp.queues.commands, ensure=False
        )
        self._tag = await self._queue.consume(self._on_message)
        log.info("worker consuming", queue=self._queue.name, window=self.window)

    def _on_reopened(self, _: object) -> None:
        if self._stopping:
            return
        task = asyncio.create_task(self._consume_again(), name="worker-reconsume")
        self._parked.add(task)
        task.add_done_callback(self._parked.discard)

    async def _consume_again(self) -> None:
        """Consume on the reopened channel, retrying (each attempt bounded) until it works or
        the worker stops: the queue may still be recovering right after a broker restart."""
        delay = 0.5
        while not self._stopping:
            try:
                async with asyncio.timeout(10):
                    if self._channel is None:
                        self._channel = await self.broker.channel(
                            prefetch=self.window, confirms=False
                        )
                        if isinstance(self._channel, AbstractRobustChannel):
                            self._channel.reopen_callbacks.add(self._on_reopened)
                    await self._consume()
                return
            except Exception as exc:
                log.warning("cannot consume yet, retrying", error=repr(exc), retry_in_s=delay)
                # aiormq closes a channel whose consume RPC timed out, while the robust wrapper
                # still looks open: the next attempt gets a channel of its own.
                old, self._channel = self._channel, None
                if old is not None:
                    closing = asyncio.create_task(close_quietly(old))
                    self._parked.add(closing)
                    closing.add_done_callback(self._parked.discard)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def shutdown(self) -> None:
        """Stop consuming, hand back what has not started, let the rest finish within
        `shutdown_grace`, cancel what is left (handed back), close the channel."""
        self._stopping = True
        self._stopped.set()
        if self._queue is not None and self._tag is not None:
            try:
                async with asyncio.timeout(5):
                    await self._queue.cancel(self._tag)
            except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
                log.warning("cannot cancel the consumer", error=repr(exc))
        for task in list(self._parked):
            task.cancel()
        if self._tasks:
            grace = self.settings.worker.shutdown_grace
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            if pending:
                log.warning("shutdown grace over, handing back commands", count=len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5)
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()  # anything still unacked goes back to the queue
        log.info("worker stopped")

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        structlog.contextvars.clear_contextvars()
        env = envelope_of(message, time.time())
        structlog.contextvars.bind_contextvars(message_id=env.message_id)
        try:
            result = await self._process(env)
        except asyncio.CancelledError:
            log.info("command handed back", why="shutdown")
            await self._settle(message, env, None)
            raise
        except Exception:
            log.exception("command handling failed, handing back")
            result = None
        await self._settle(message, env, result)

    async def _process(self, env: Envelope) -> Result | None:
        fallback = uuid.uuid4().hex
        sources = self.clients.keys()
        try:
            cmd = parse_command(env, sources, fallback_id=fallback)
        except InvalidCommand as exc:
            action, source = describe_invalid(env, sources)
            return Result(
                command_id=safe_id(env.message_id) if env.message_id else fallback,
                action=action,
                source=source,
                status="rejected",
                error=exc.detail,
                reason=exc.reason,
            )
        structlog.contextvars.bind_contextvars(source=cmd.source, action=cmd.action)
        mid = cmd.message_id
        if mid is None:
            return await self._execute(cmd)
        first = self._inflight.get(mid)
        if first is not None:  # the same message_id is being executed here right now
            self.metrics.duplicates.inc()
            return await asyncio.shield(first)
        future: asyncio.Future[Result | None] = asyncio.get_running_loop().create_future()
        self._inflight[mid] = future
        result: Result | None = None
        try:
            result = await self._once(cmd, mid)
        finally:
            del self._inflight[mid]
            future.set_result(result)
        return result

    async def _once(self, cmd: Command, mid: str) -> Result | None:
        """At most once per message_id: the stored result, `unknown`, or a fresh execution."""
        record = await self.store.get(mid)
        if record is not None:
            if (record.source, record.action) != (cmd.source, cmd.action):
                return make_rejected(cmd, "message_id_reused", "message_id used by another command")
            if record.state == "done" and record.result is not None:
                self.metrics.duplicates.inc()
                log.info("duplicate message_id: answering with the first result")
                return Result.from_json(record.result)
            if not cmd.retry_safe:
                unknown = make_unknown(cmd)
                await self.store.finish(mid, cmd.source, cmd.action, unknown.to_json())
                return unknown
        result = await self._execute(cmd)
        if result is not None and not cmd.endpoint.is_download:
            await self.store.finish(
                mid, cmd.source, cmd.action, result.to_json(), durable=not cmd.retry_safe
            )
        return result

    async def _execute(self, cmd: Command) -> Result | None:
        """Run the command in its lane; None when it must be handed back (shutdown)."""
        started = time.perf_counter()
        if is_expired(cmd.deadline, time.time()):
            return make_expired(cmd)
        lane = self._lanes[cmd.endpoint.lane]
        task = asyncio.current_task()
        assert task is not None
        self._parked.add(task)
        try:
            await lane.acquire()
        finally:
            self._parked.discard(task)
        try:
            if self._stopping:
                return None
            if not cmd.retry_safe:
                assert cmd.message_id is not None  # parse_command requires it
                if not await self.store.start(cmd.message_id, cmd.source, cmd.action):
                    return make_unknown(cmd)  # another worker claimed it meanwhile
            gauge = self.metrics.in_flight.labels(lane=cmd.endpoint.lane)
            gauge.inc()
            try:
                client = self.clients[cmd.source]
                execution = await client.execute(
                    cmd.endpoint, build_request(cmd), deadline=cmd.deadline
                )
            finally:
                gauge.dec()
        finally:
            lane.release()
        duration_ms = round((time.perf_counter() - started) * 1000)
        return make_result(cmd, execution.outcome, execution.attempts, duration_ms)

    async def _settle(
        self, message: AbstractIncomingMessage, env: Envelope, result: Result | None
    ) -> None:
        """THE decision for a delivery: no result -> hand back (on the last allowed delivery,
        a `delivery_limit` result instead); else publish the result (and the reply, and a dead
        letter unless ok/failed), retrying until the broker confirms them, then ack. A result
        that stays unconfirmed hands the command back."""
        if result is None:
            if not is_last_delivery(env, self.settings.amqp.commands_delivery_limit):
                self.metrics.handed_back.inc()
                await self._finish(message, ack=False)
                return
            result = await self._delivery_limit_result(env)
            log.warning("last delivery allowed: settling instead of handing back")
        if not await self._publish_result(message, env, result):
            self.metrics.handed_back.inc()
            await self._finish(message, ack=False)
            return
        await self._finish(message, ack=True)
        self.metrics.commands.labels(source=result.source or "_", status=result.status).inc()
        log.info(
            "command settled",
            status=result.status,
            reason=result.reason,
            http_status=result.http_status,
            attempts=result.attempts,
            duration_ms=result.duration_ms,
        )
        await self._purge()

    async def _publish_result(
        self, message: AbstractIncomingMessage, env: Envelope, result: Result
    ) -> bool:
        """Publish the result, the reply and the dead letter until each is confirmed. Failed
        attempts are retried with exponential backoff for up to `publish_retry_for` seconds;
        False when that runs out, the worker is stopping, or the delivery's channel is gone
        (the broker then redelivers it, and the stored result is published again).

        A result the broker refuses (it cannot be encoded, or it was nacked or made the broker
        close the channel or connection REFUSALS_BEFORE_SAFE_RESULT times) is replaced by a
        small one without its response (reason `result_unpublishable`) and a dead letter, so
        it can neither loop nor be handed back again and again."""
        steps = self._steps(env, result)
        task = asyncio.current_task()
        assert task is not None
        give_up_at = time.monotonic() + self.publish_retry_for
        delay = self.publish_retry_delay
        attempt = 0
        refusals = 0
        while True:
            attempt += 1
            cancelling = task.cancelling()
            refused = False
            try:
                while steps:  # what is confirmed is not published again
                    await steps[0]()
                    steps.pop(0)
                    refusals = 0
                return True
            except PublishError as exc:
                error = str(exc)
                refused = is_refusal(exc)
            except asyncio.CancelledError:
                if task.cancelling() > cancelling:
                    raise  # this task is being cancelled
                # aiormq cancels the pending confirms when the connection drops
                error = "confirm cancelled: the connection was lost"
            except ENCODING_ERRORS as exc:  # raised before sending: it can never be published
                error = f"{type(exc).__name__}: {exc}"[:300]
                refused, refusals = True, REFUSALS_BEFORE_SAFE_RESULT
            except Exception as exc:
                log.exception("publishing the result failed")
                error = repr(exc)
            self.metrics.publish_failures.inc()
            refusals += refused
            if refusals >= REFUSALS_BEFORE_SAFE_RESULT and result.reason != UNPUBLISHABLE:
                log.error("the broker refuses this result: publishing a safe one", error=error)
                self.metrics.unpublishable.inc()
                result = safe_result(result, error)
                steps = self._steps(env, result)
                refusals = 0
                continue
            left = give_up_at - time.monotonic()
            if self._stopping or left <= 0 or _channel_gone(message):
                log.warning(
                    "result not confirmed, handing the command back",
                    error=error,
                    attempts=attempt,
                    stopping=self._stopping,
                )
                return False
            pause = min(delay, left)
            log.warning(
                "result not confirmed, retrying", error=error, attempt=attempt, retry_in=pause
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._stopped.wait()
            delay = min(delay * 2, PUBLISH_RETRY_MAX_DELAY)

    def _steps(self, env: Envelope, result: Result) -> list[Callable[[], Awaitable[None]]]:
        """The publishes that settle a command: result, reply, dead letter (as needed)."""
        key = result_key(result.source, result.action)
        body, ctype, headers = result_message(result, env.headers)
        amqp = self.settings.amqp

        def result_msg() -> aio_pika.Message:
            return json_message(
                body,
                message_id=result.command_id,
                type="result",
                headers=headers,
                timestamp=time.time(),
                correlation_id=env.correlation_id,
                content_type=ctype,
            )

        async def to_results() -> None:
            await self.publisher.publish(amqp.exchanges.results, key, result_msg(), mandatory=False)

        async def to_reply_to() -> None:
            assert env.reply_to
            try:
                await self.publisher.publish("", env.reply_to, result_msg(), mandatory=True)
            except Unroutable:
                log.warning("reply_to queue is gone, result only on the results exchange")
            except PublishError as exc:
                if result.reason != UNPUBLISHABLE or not is_refusal(exc):
                    raise
                # Even the safe result is refused there: that queue takes nothing from us.
                log.warning("reply_to queue refuses the result, only on the results exchange")

        async def to_dead() -> None:
            await self.publisher.publish(amqp.exchanges.dead, key, dead_letter(env, result))

        steps: list[Callable[[], Awaitable[None]]] = [to_results]
        if env.reply_to and env.reply_to not in self._own_queues:
            steps.append(to_reply_to)
        elif env.reply_to:
            # A result published into the command queue would come back as a (rejected)
            # command: one message could make the worker answer itself.
            log.warning("reply_to names one of the bridge's own queues: no reply sent")
        if needs_dead_letter(result.status) or result.reason == UNPUBLISHABLE:
            steps.append(to_dead)
        return steps

    async def _delivery_limit_result(self, env: Envelope) -> Result:
        """The answer for a command on its last allowed delivery: its stored result if it has
        one, else `delivery_limit` (`unknown` if it is not retry-safe and may have been sent).
        It is stored, so a later duplicate of its message_id gets the same answer."""
        sources = self.clients.keys()
        action, source = describe_invalid(env, sources)
        deliveries = delivery_count(env) + 1
        try:
            cmd: Command | None = parse_command(env, sources)
        except InvalidCommand:
            cmd = None
        mid = cmd.message_id if cmd is not None else None
        if cmd is None or mid is None:
            command_id = safe_id(env.message_id) if env.message_id else uuid.uuid4().hex
            return make_delivery_limit(
                command_id, action, source, deliveries=deliveries, may_have_run=False
            )
        try:
            record = await self.store.get(mid)
        except Exception:
            log.exception("state store unreadable")
            record = None
            may_have_run = not cmd.retry_safe
        else:
            may_have_run = not cmd.retry_safe and record is not None
        if record is not None and record.state == "done" and record.result is not None:
            return Result.from_json(record.result)
        result = make_delivery_limit(
            mid, cmd.action, cmd.source, deliveries=deliveries, may_have_run=may_have_run
        )
        try:
            await self.store.finish(mid, cmd.source, cmd.action, result.to_json())
        except Exception:
            log.exception("cannot store the delivery_limit result")
        return result

    async def _finish(self, message: AbstractIncomingMessage, *, ack: bool) -> None:
        try:
            if ack:
                await message.ack()
            else:
                await message.nack(requeue=True)
        except (
            aio_pika.exceptions.MessageProcessError,
            *aio_pika.exceptions.CONNECTION_EXCEPTIONS,
        ):
            log.warning("cannot settle: the channel is gone, the broker will redeliver")

    async def _purge(self) -> None:
        now = time.time()
        if now - self._purged_at >= _PURGE_EVERY:
            self._purged_at = now
            try:
                removed = await self.store.purge(now)
            except Exception:
                log.exception("cannot purge the state store")
                return
            if removed:
                log.info("state store purged", removed=removed)


def _channel_gone(message: AbstractIncomingMessage) -> bool:
    """Whether the channel a delivery came on is closed (aio-pika raises, rather than
    answering, once it is): its unacked deliveries are going back to the queue."""
    try:
        return message.channel.is_closed
    except aio_pika.exceptions.ChannelInvalidStateError:
        return True


def safe_result(result: Result, why: str) -> Result:
    """What is published instead of a result the broker refuses: the same command, status and
    HTTP status, without its response or file, saying why (reason `result_unpublishable`)."""
    return replace(
        result,
        response=None,
        file=None,
        content_type=None,
        error=wire.cut(f"the result could not be published, its response is left out: {why}", 500),
        reason=UNPUBLISHABLE,
    )


def make_rejected(cmd: Command, reason: str, detail: str) -> Result:
    return Result(cmd.command_id, cmd.action, cmd.source, "rejected", error=detail, reason=reason)


def make_unknown(cmd: Command) -> Result:
    return Result(
        cmd.command_id,
        cmd.action,
        cmd.source,
        "unknown",
        error="interrupted while in flight: it may or may not have run, so it is not sent again",
        reason="interrupted",
    )


def make_expired(cmd: Command) -> Result:
    return Result(
        cmd.command_id,
        cmd.action,
        cmd.source,
        "expired",
        error="deadline passed",
        reason="deadline",
    )


def dead_letter(env: Envelope, result: Result) -> aio_pika.Message:
    """The original command, with `reason` and `status` headers (and the result's error). Its
    own headers are copied only when small, every text is cut: the dead letter must fit a frame
    whatever the command carried."""
    headers = {
        **copied_headers(env.headers),
        "reason": result.reason or result.status,
        "status": result.status,
        "error": None if result.error is None else wire.cut(result.error, MAX_HEADER_TEXT),
        "command_id": result.command_id,
        "source": result.source,
        "action": result.action,
    }
    return json_message(
        env.body,
        message_id=f"{result.command_id}:dead",
        type="dead-command",
        headers={k: v for k, v in headers.items() if v is not None},
        timestamp=time.time(),
        correlation_id=env.correlation_id,
    )


def make_clients(
    settings: Settings,
    metrics: WorkerMetrics,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, SimotelClient]:
    """One client per source with API settings, sized for both lanes."""
    size = settings.worker.prefetch + settings.worker.report_prefetch
    clients: dict[str, SimotelClient] = {}
    for name, source in settings.sources.items():
        if source.api is None:
            continue

        def observe(kind: str, seconds: float, name: str = name) -> None:
            metrics.simotel_latency.labels(source=name, kind=kind).observe(seconds)

        clients[name] = SimotelClient(
            name, source.api, max_connections=size, transport=transport, observe=observe
        )
    return clients


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    broker: Broker | None = None,
    metrics: WorkerMetrics | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> None:
    """Run the worker until `stop` is set, then shut down gracefully. A given `broker` (shared
    with the other roles of `run`) is used and left open; otherwise one is made and closed."""
    if not any(s.api is not None for s in settings.sources.values()):
        raise ConfigError([("sources", "no source has api settings: the worker cannot call one")])
    own_broker = broker is None
    if broker is None:
        broker = Broker(settings.amqp, name="simotel-bridge worker")
        await broker.connect()
    metrics = metrics or WorkerMetrics(CollectorRegistry())
    publisher = Publisher(broker)
    clients = make_clients(settings, metrics, transport)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    store = await open_state_store(settings.worker, owner=owner)
    worker = Worker(settings, broker, publisher, clients, store, metrics)
    try:
        await publisher.start()
        await worker.start()
        await stop.wait()
    finally:
        await worker.shutdown()
        for client in clients.values():
            await client.aclose()
        await store.aclose()
        await publisher.close()
        if own_broker:
            await broker.close()
