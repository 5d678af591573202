"""The broker connection and the confirmed publisher every role uses.

`Broker` owns one robust connection (heartbeats, reconnection with backoff, channels and
consumers restored after a reconnect). With several broker URLs (`amqp.urls`, a cluster's
nodes) every connection attempt goes to the next URL in turn, so the same connection moves to
another node when its node goes away; only `host:port` of a URL is ever logged.

`Publisher` publishes on a channel with publisher confirms and `on_return_raises`, so a publish
either comes back confirmed or raises `PublishError` within its timeout: it never hangs,
whatever the broker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import aio_pika
import aio_pika.exceptions
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractRobustChannel,
    AbstractRobustConnection,
    UnderlayConnection,
)
from aio_pika.connection import make_url
from aiormq import spec
from yarl import URL

from bridge import topology
from bridge.config import AmqpSettings, HistorySettings, SourceSettings
from bridge.errors import ConfigError, PublishError
from bridge.errors import Unroutable as Unroutable  # re-exported: defined in bridge.errors
from bridge.wire import APP_ID as APP_ID  # re-exported: defined in bridge.wire
from bridge.wire import json_message as json_message

log = structlog.get_logger("bridge.amqp")


def endpoint(url: URL | str) -> str:
    """`host:port` of a broker URL, without credentials or vhost: the only part that is logged."""
    u = URL(url) if isinstance(url, str) else url
    return f"{u.host}:{u.port}"


async def connect_first(
    urls: Sequence[str], *, robust: bool = False, **kwargs: Any
) -> AbstractConnection:
    """A connection to the first of `urls` (amqp.endpoints()) that answers, for the tools and the
    reconciler's lock; the roles use `Broker`, which also moves on when its node goes away."""
    failure: BaseException | None = None
    for url in urls:
        try:
            connection: AbstractConnection
            if robust:
                connection = await aio_pika.connect_robust(url, **kwargs)
            else:
                connection = await aio_pika.connect(url, **kwargs)
            return connection
        except (OSError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
            failure = exc
            # The exception's text may quote the URL: only host:port is reported.
            log.warning("broker unreachable", node=endpoint(url), error=type(exc).__name__)
    if failure is None:
        raise ValueError("no broker URL")
    raise failure


class Backoff:
    """The retry schedule of every loop that waits for the broker: `base` seconds, doubled after
    each failure up to `cap`, each pause drawn from its upper part (`jitter` = 0.2: 80-100 %) so
    a fleet of bridges does not retry in lockstep. `reset()` after a success.

    The schedules in use are named below, so what each loop does can be read in one place."""

    def __init__(
        self,
        base: float,
        cap: float,
        *,
        jitter: float = 0.2,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.base = base
        self.cap = max(cap, base)
        self.jitter = jitter
        self._rand = rand
        self._delay = base

    def next(self) -> float:
        """The pause before the next attempt; the one after it is twice as long (capped)."""
        delay = self._delay
        self._delay = min(delay * 2, self.cap)
        return delay * (1 - self.jitter * self._rand())

    def reset(self) -> None:
        self._delay = self.base

    async def wait(
        self, stop: asyncio.Event | None = None, *, at_most: float | None = None
    ) -> None:
        """Pause for `next()` seconds (no longer than `at_most`), or until `stop` is set."""
        pause = self.next() if at_most is None else min(self.next(), max(at_most, 0.0))
        if stop is None:
            await asyncio.sleep(pause)  # a retry pause, by design
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(pause):
                await stop.wait()


# The schedules of the loops that wait for the broker (seconds: first pause, longest pause).
CONNECT_BACKOFF = (0.5, 30.0)  # Broker.connect(wait=False) until the broker first answers
RECONSUME_BACKOFF = (0.5, 10.0)  # consuming again on a reopened channel
RESULT_BACKOFF = (0.25, 5.0)  # publishing a command's result again until it is confirmed
REPLAY_BACKOFF = (0.1, 5.0)  # the spool's replayer while nothing goes through


async def keep_consuming(
    consume: Callable[[], Awaitable[None]],
    *,
    what: str,
    stopped: Callable[[], bool],
    on_failure: Callable[[], None] | None = None,
    attempt_timeout: float = 10.0,
    backoff: Backoff | None = None,
) -> bool:
    """Call `consume` until it works (True) or `stopped()` (False): each attempt bounded by
    `attempt_timeout`, failures retried with RECONSUME_BACKOFF. `on_failure` runs after each
    failed attempt (e.g. to drop a channel aiormq closed underneath its robust wrapper).

    aio-pika restores a consumer only on a queue it declared itself: a consumer on a queue that
    is looked up (a quorum queue still recovering after a broker crash must not hold up the
    whole reconnection) or on the direct reply-to pseudo-queue is consumed again with this,
    from a reopen callback (`on_reopen`)."""
    pauses = backoff or Backoff(*RECONSUME_BACKOFF)
    while not stopped():
        try:
            async with asyncio.timeout(attempt_timeout):
                await consume()
            return True
        except Exception as exc:
            log.warning(f"cannot consume {what} yet, retrying", error=repr(exc))
            if on_failure is not None:
                on_failure()
        await pauses.wait()
    return False


def on_reopen(
    channel: AbstractChannel,
    consume: Callable[[], Awaitable[None]],
    tasks: set[asyncio.Task[Any]],
    *,
    what: str,
    stopped: Callable[[], bool],
    on_failure: Callable[[], None] | None = None,
) -> None:
    """Consume again (`keep_consuming`, in the background, the task kept in `tasks`) whenever
    the robust `channel` reopens after a reconnect. A plain channel is never reopened."""
    if not isinstance(channel, AbstractRobustChannel):
        return

    def reopened(_: object) -> None:
        if stopped():
            return
        task = asyncio.create_task(
            keep_consuming(consume, what=what, stopped=stopped, on_failure=on_failure),
            name=f"reconsume-{what}",
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    channel.reopen_callbacks.add(reopened)


def topology_refused(exc: aiormq.exceptions.ChannelPreconditionFailed) -> ConfigError:
    """The broker has a queue or exchange declared with other arguments than ours, e.g. a quorum
    queue created with another `amqp.quorum_replicas`. Its text names the argument, not secrets."""
    detail = str(exc.args[0] if exc.args else exc)[:300]
    return ConfigError(
        [("amqp", f"the broker refused the topology ({detail}); see docs/scaling.md")]
    )


class _BackoffConnection(aio_pika.RobustConnection):
    """A robust connection whose reconnect attempts grow sparser the longer the broker has been
    gone: about every second at first, at most every `RECONNECT_CAP` seconds, with jitter so a
    fleet of bridges does not reconnect in lockstep. aio-pika reads `reconnect_interval` before
    each attempt; here it is computed from the time the connection was lost."""

    RECONNECT_BASE = 1.0
    RECONNECT_CAP = 30.0
    _lost_at: float | None = None

    # Every broker URL to try (a cluster's nodes); each connection attempt, the first one
    # included, goes to the next in turn, so a node that went away is not waited on.
    _urls: tuple[URL, ...] = ()
    _next = 0

    def use_urls(self, urls: tuple[URL, ...], start: int = 0) -> None:
        self._urls = urls
        self._next = start

    @property
    def transport(self) -> UnderlayConnection | None:
        return self._transport

    @transport.setter
    def transport(self, value: UnderlayConnection | None) -> None:
        # aio-pika clears the transport at the start of every connection attempt (and on
        # close): the one hook it offers before it reads `self.url` to connect.
        self._transport = value
        if value is None and self._urls:
            self.url = self._urls[self._next % len(self._urls)]
            self._next += 1

    @property
    def endpoint(self) -> str:
        """host:port of the node this connection is for: what logs may show of a URL."""
        return endpoint(self.url)

    @property
    def reconnect_interval(self) -> float:
        lost = self._lost_at
        outage = 0.0 if lost is None else time.monotonic() - lost
        delay = min(self.RECONNECT_CAP, max(self.RECONNECT_BASE, outage / 4))
        return delay * random.uniform(0.8, 1.0)

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        self.RECONNECT_BASE = float(value)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        await super()._on_connection_close(closing)

    async def _on_connected(self) -> None:
        await super()._on_connected()
        self._lost_at = None


class Broker:
    """One robust connection for the process. `ready` reflects whether it is usable now.

    `connect()` waits for the broker (bounded by `amqp.connect_timeout`) and fails if it does not
    answer; `connect(wait=False)` returns at once and keeps trying in the background with
    exponential backoff, for an ingress that spools until the broker is there."""

    def __init__(
        self,
        settings: AmqpSettings,
        name: str = "simotel-bridge",
        *,
        history: HistorySettings | None = None,
        sources: Mapping[str, SourceSettings] | None = None,
    ) -> None:
        self.settings = settings
        # The history stream is declared with the topology only when its settings are given;
        # with the sources, so are the queues their features need (reconciliation), again after
        # every reconnect.
        self.history = history
        self.sources = sources
        self.name = name
        self._connection: AbstractRobustConnection | None = None
        self._up = asyncio.Event()
        self._connector: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._declare = True

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise PublishError("the broker is not connected yet")
        return self._connection

    @property
    def ready(self) -> bool:
        c = self._connection
        return c is not None and not c.is_closed and c.connected.is_set()

    async def connect(self, *, declare: bool = True, wait: bool = True) -> None:
        """Connect and declare the topology (now, or in the background with `wait=False`)."""
        if wait:
            await self._connect_once(declare)
            return
        self._connector = asyncio.create_task(self._connect_forever(declare), name="amqp-connect")

    async def wait_connected(self) -> None:
        """Return once the first connection (and topology declaration) has succeeded."""
        await self._up.wait()

    async def connected_unless(self, stop: asyncio.Event) -> bool:
        """Wait for the first connection or for `stop`, whichever comes first; True when
        connected (a role that needs the broker starts then, or not at all)."""
        connected = asyncio.ensure_future(self.wait_connected())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([connected, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            connected.cancel()
            stopping.cancel()
        return not stop.is_set()

    async def _connect_once(self, declare: bool) -> None:
        """Try each configured URL in turn until one answers (each attempt bounded by
        `amqp.connect_timeout`); raise `PublishError` when none does."""
        urls = tuple(
            make_url(
                url,
                heartbeat=self.settings.heartbeat,
                reconnect_interval=_BackoffConnection.RECONNECT_BASE,
            )
            for url in self.settings.endpoints()
        )
        failures: list[str] = []
        for start in range(len(urls)):
            try:
                await self._connect_to(urls, start, declare)
                return
            except PublishError as exc:
                failures.append(str(exc))
                if len(urls) > 1:
                    log.warning("broker node unreachable", node=endpoint(urls[start]))
        raise PublishError("; ".join(failures))

    async def _connect_to(self, urls: tuple[URL, ...], start: int, declare: bool) -> None:
        # Made here rather than by connect_robust, so that an attempt that fails or times out
        # is closed: an abandoned robust connection would go on connecting in the background.
        connection = _BackoffConnection(
            urls[start], client_properties={"connection_name": self.name}
        )
        connection.use_urls(urls, start)
        try:
            # The timeout given to connect() also bounds every later reconnect attempt: without
            # one, an attempt whose handshake never completes (a node still booting after a
            # crash) hangs, and the connection never comes back.
            async with asyncio.timeout(self.settings.connect_timeout + 1):
                await connection.connect(timeout=self.settings.connect_timeout)
        except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
            await connection.close()
            # The exception's text may quote the URL: only host:port is reported.
            raise PublishError(
                f"cannot connect to the broker at {endpoint(urls[start])}: {type(exc).__name__}"
            ) from exc
        except BaseException:
            await connection.close()
            raise
        try:
            if declare:
                channel = await connection.channel()
                try:
                    await topology.declare(
                        channel, self.settings, self.history, sources=self.sources
                    )
                finally:
                    await close_quietly(channel)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            # The definitions are the cluster's, not the node's: no other URL would do better.
            await connection.close()
            raise topology_refused(exc) from exc
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        connection.reconnect_callbacks.add(self._reconnected)
        self._declare = declare
        self._up.set()
        log.info("broker connected", connection=self.name, node=connection.endpoint)

    @property
    def node(self) -> str | None:
        """host:port of the node connected to now, or None."""
        c = self._connection
        if c is None or not self.ready or not isinstance(c, _BackoffConnection):
            return None
        return c.endpoint

    def _reconnected(self, connection: Any) -> None:
        """After every reconnect (to the same node or another of the cluster): declare the
        topology again, so a broker that lost its definitions (a new node, a reset) gets them
        back without a restart of the bridge. In the background and bounded: aio-pika awaits
        this callback inside its reconnection, and a quorum queue still recovering after a
        crash can make a declaration wait."""
        node = connection.endpoint if isinstance(connection, _BackoffConnection) else None
        log.info("broker reconnected", connection=self.name, node=node)
        if not self._declare:
            return
        task = asyncio.ensure_future(self._declare_again())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _declare_again(self) -> None:
        try:
            async with asyncio.timeout(30):
                channel = await self.connection.channel()
                try:
                    await topology.declare(
                        channel, self.settings, self.history, sources=self.sources
                    )
                finally:
                    await channel.close()
        except Exception as exc:  # the next reconnect tries again
            log.warning("declaring the topology after a reconnect failed", error=repr(exc))

    async def _connect_forever(self, declare: bool) -> None:
        pauses = Backoff(*CONNECT_BACKOFF)
        while True:
            try:
                await self._connect_once(declare)
                return
            except ConfigError as exc:  # an operator can fix the queue: keep trying, loudly
                log.error("the broker refused the topology, retrying", error=str(exc))
            except (PublishError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
                log.warning("broker unreachable, retrying", error=str(exc))
            await pauses.wait()

    async def channel(
        self, *, prefetch: int | None = None, confirms: bool = True
    ) -> AbstractChannel:
        ch = await self.connection.channel(publisher_confirms=confirms, on_return_raises=confirms)
        if prefetch is not None:
            await ch.set_qos(prefetch_count=prefetch)
        return ch

    async def close(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
            await asyncio.gather(self._connector, return_exceptions=True)
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()


class Publisher:
    """Persistent, mandatory, confirmed publishes on one channel, each bounded by a timeout."""

    def __init__(self, broker: Broker, timeout: float | None = None) -> None:
        self.broker = broker
        self.timeout = timeout if timeout is not None else broker.settings.publish_timeout
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        """The broker connection is up (a closed channel is reopened by the next publish)."""
        return self.broker.ready

    async def start(self) -> None:
        """Open the channel now if the broker is there; otherwise the first publish does."""
        if self.broker.ready:
            self._channel = await self.broker.channel()

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: aio_pika.Message,
        *,
        mandatory: bool = True,
        timeout: float | None = None,
    ) -> float:
        """Publish and wait for the broker's confirm. Returns the confirm latency in seconds.
        Raises `Unroutable` when a mandatory publish comes back, `PublishError` otherwise."""
        return await self.publish_raw(
            exchange,
            routing_key,
            message.body,
            message.properties,
            mandatory=mandatory,
            timeout=timeout,
        )

    async def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.Basic.Properties,
        *,
        mandatory: bool = True,
        timeout: float | None = None,
    ) -> float:
        """`publish` for a body and ready-made properties: the hot path of the ingress.

        It goes to the channel underneath aio-pika's robust wrapper (re-fetched every time, so
        it follows reconnects) and does not wait for the frame to drain into the socket before
        releasing the channel to the next publisher: the broker's confirm is what is awaited,
        and the number in flight is bounded by the callers. Both save measurable CPU per event.
        """
        limit = self.timeout if timeout is None else timeout
        started = time.perf_counter()
        channel: AbstractChannel | None = None
        try:
            async with asyncio.timeout(limit):
                channel = self._channel
                if channel is None or channel.is_closed:
                    async with self._lock:
                        if self._channel is None or self._channel.is_closed:
                            self._channel = await self.broker.channel()
                    channel = self._channel
                underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                await underlay.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=mandatory,
                    wait=False,
                )
        except aio_pika.exceptions.PublishError as exc:
            raise Unroutable(f"no queue bound to {exchange}/{routing_key}") from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishError(f"broker refused the message: {exc!r}") from exc
        except TimeoutError as exc:
            self._forget(channel)
            raise PublishError(f"not confirmed within {limit:.3g}s") from exc
        except (*aio_pika.exceptions.CONNECTION_EXCEPTIONS,) as exc:
            self._forget(channel)
            raise PublishError(f"broker connection failed: {exc!r}") from exc
        except asyncio.CancelledError as exc:
            # aiormq cancels the pending confirms of a connection that dropped; only a
            # cancellation of this task itself is a cancellation.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            self._forget(channel)
            raise PublishError("the connection dropped before the confirm") from exc
        return time.perf_counter() - started

    def _forget(self, channel: AbstractChannel | None) -> None:
        """A publish failed while the connection is up: do not trust this channel again.

        aio-pika restores a robust channel after a reconnect, but not always: a channel whose
        close callback failed while the connection went down can stay un-restored, and every
        publish on it then times out for the rest of the process (seen after a broker
        SIGKILL). The next publish opens a fresh channel instead. While the broker is down the
        channel is kept: a reconnect restores it, or the first failure after it is forgotten.
        """
        if channel is None or channel is not self._channel or not self.broker.ready:
            return
        self._channel = None
        log.warning("publisher channel replaced after a failed publish")
        task = asyncio.ensure_future(close_quietly(channel))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()


async def close_quietly(channel: AbstractChannel) -> None:
    """Close a channel that may be broken, bounded, ignoring errors."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await channel.close()
