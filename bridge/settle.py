"""Settling a command delivery: the one place that acks, hands back (nack + requeue) or
dead-letters a command (`Settler.settle`).

    no result            -> hand back; on the last delivery the queue allows
                            (`x-delivery-count` = `amqp.commands_delivery_limit`) a
                            `delivery_limit` result instead, so the broker never dead-letters a
                            command without a result while the worker can still publish one
    a result             -> publish it (and the reply, and a dead letter unless ok/failed),
                            each until the broker confirms it, then ack
    still not confirmed  -> hand back (after `publish_retry_for` seconds of RESULT_BACKOFF, on
                            shutdown, or when the delivery's channel is gone)

A result the broker refuses (it cannot be encoded, or it was nacked or made the broker close the
channel or connection REFUSALS_BEFORE_SAFE_RESULT times) is replaced by a small one without its
response (reason `result_unpublishable`) and a dead letter, so it can neither loop nor be handed
back again and again.

Every message published for a command has a stable `message_id` derived from the command's:
`{command_id}` for the result and the reply, `{command_id}:dead` for the dead letter, so a
result published twice (after a hand-back and a redelivery) can be de-duplicated.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Collection

import aio_pika
import aio_pika.exceptions
import structlog
from aio_pika.abc import AbstractIncomingMessage

from bridge import wire
from bridge.amqp import RESULT_BACKOFF, Backoff, Publisher, Unroutable, json_message
from bridge.commands import (
    MAX_HEADER_TEXT,
    UNPUBLISHABLE,
    Command,
    Envelope,
    InvalidCommand,
    Result,
    copied_headers,
    delivery_count,
    describe_invalid,
    is_last_delivery,
    make_delivery_limit,
    needs_dead_letter,
    parse_command,
    result_key,
    result_message,
    safe_id,
    safe_result,
)
from bridge.config import Settings
from bridge.errors import PublishError
from bridge.metrics import WorkerMetrics
from bridge.sink import is_refusal
from bridge.state import StateStore

log = structlog.get_logger("bridge.worker")

PUBLISH_RETRY_FOR = 30.0  # seconds a result is re-published before the command is handed back
PUBLISH_RETRY_DELAY = RESULT_BACKOFF[0]  # first pause between attempts; doubled each time
REFUSALS_BEFORE_SAFE_RESULT = 3  # refusals of one result before a safe one replaces it
# Raised by aiormq/pamqp while encoding a frame, before anything is sent: never the broker.
ENCODING_ERRORS = (ValueError, TypeError, OverflowError)

Step = Callable[[], Awaitable[None]]


class Settler:
    """Settles the worker's deliveries. `stopped` is set when the worker stops: a result that
    is not confirmed by then is handed back at once."""

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        store: StateStore,
        metrics: WorkerMetrics,
        sources: Collection[str],
        stopped: asyncio.Event,
        *,
        publish_retry_for: float = PUBLISH_RETRY_FOR,
        publish_retry_delay: float = PUBLISH_RETRY_DELAY,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.store = store
        self.metrics = metrics
        self.sources = sources
        self.stopped = stopped
        self.publish_retry_for = publish_retry_for
        self.publish_retry_delay = publish_retry_delay
        q = settings.amqp.queues
        self._own_queues = frozenset({q.commands, q.dead, q.unrouted})

    async def settle(
        self, message: AbstractIncomingMessage, env: Envelope, result: Result | None
    ) -> Result | None:
        """THE decision for a delivery (see the module docstring). Returns the result that was
        published and acked, or None when the command was handed back."""
        if result is None:
            if not is_last_delivery(env, self.settings.amqp.commands_delivery_limit):
                await self._hand_back(message)
                return None
            result = await self._delivery_limit_result(env)
            log.warning("last delivery allowed: settling instead of handing back")
        published = await self._publish(message, env, result)
        if published is None:
            await self._hand_back(message)
            return None
        await _finish(message, ack=True)
        self.metrics.settled(published.source, published.status)
        log.info(
            "command settled",
            status=published.status,
            reason=published.reason,
            http_status=published.http_status,
            attempts=published.attempts,
            duration_ms=published.duration_ms,
        )
        return published

    async def _hand_back(self, message: AbstractIncomingMessage) -> None:
        self.metrics.handed_back.inc()
        await _finish(message, ack=False)

    async def _publish(
        self, message: AbstractIncomingMessage, env: Envelope, result: Result
    ) -> Result | None:
        """Publish the result, the reply and the dead letter until each is confirmed. Returns
        the result published (a safe one if the broker refused the first), or None when the
        retries ran out, the worker is stopping, or the delivery's channel is gone (the broker
        then redelivers it, and the stored result is published again)."""
        steps = self._steps(env, result)
        task = asyncio.current_task()
        assert task is not None
        give_up_at = time.monotonic() + self.publish_retry_for
        pauses = Backoff(self.publish_retry_delay, RESULT_BACKOFF[1])
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
                return result
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
            stopping = self.stopped.is_set()
            if stopping or left <= 0 or _channel_gone(message):
                log.warning(
                    "result not confirmed, handing the command back",
                    error=error,
                    attempts=attempt,
                    stopping=stopping,
                )
                return None
            log.warning("result not confirmed, retrying", error=error, attempt=attempt)
            await pauses.wait(self.stopped, at_most=left)

    def _steps(self, env: Envelope, result: Result) -> list[Step]:
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

        steps: list[Step] = [to_results]
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
        action, source = describe_invalid(env, self.sources)
        deliveries = delivery_count(env) + 1
        try:
            cmd: Command | None = parse_command(env, self.sources)
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


async def _finish(message: AbstractIncomingMessage, *, ack: bool) -> None:
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


def _channel_gone(message: AbstractIncomingMessage) -> bool:
    """Whether the channel a delivery came on is closed (aio-pika raises, rather than
    answering, once it is): its unacked deliveries are going back to the queue."""
    try:
        return message.channel.is_closed
    except aio_pika.exceptions.ChannelInvalidStateError:
        return True


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
