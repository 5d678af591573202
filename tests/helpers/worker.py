"""Test helpers for the worker: a fake Simotel served over real HTTP (Starlette + uvicorn on
127.0.0.1, port 0) that records every request it receives, and a small AMQP client that
publishes commands and collects results and dead letters from the real broker.

Every wait here is on the thing itself (a request arriving, a message arriving) with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import uvicorn
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bridge import topology
from bridge.amqp import Broker, Publisher
from bridge.commands import Result, parse_result
from bridge.config import Settings
from bridge.dedupe import StateStore
from bridge.worker import Worker, WorkerMetrics, make_clients, run_worker
from tests.helpers.env import make_settings

API_USER, API_PASS, API_KEY = "apiuser", "api-secret", "the-api-key"
WAIT = 10.0  # bound on any single wait in these tests


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None
    form: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)  # arrival time


Answer = Callable[[Received], Awaitable[Response]]


def reply(
    status: int = 200, doc: Any = None, *, body: bytes | None = None, ctype: str = ""
) -> Answer:
    async def answer(_: Received) -> Response:
        if body is not None:
            return Response(
                body, status_code=status, media_type=ctype or "application/octet-stream"
            )
        return Response(orjson.dumps(doc), status_code=status, media_type="application/json")

    return answer


def ok(data: Any = "", message: str = "") -> Answer:
    return reply(200, {"success": 1, "message": message, "data": data})


def held(gate: asyncio.Event, then: Answer | None = None) -> Answer:
    """Answer only once `gate` is set (or never, if the client gives up first)."""

    async def answer(req: Received) -> Response:
        await gate.wait()
        return await (then or ok())(req)

    return answer


class FakeSimotel:
    """Answers `/<prefix>/<path>` with the answers queued for `<path>` (the last one repeats),
    by default a success envelope, and records each request as Simotel received it."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.answers: dict[str, list[Answer]] = {}
        self.gates: list[asyncio.Event] = []
        self._arrived = asyncio.Condition()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.url = ""

    def on(self, path: str, *answers: Answer) -> None:
        self.answers[path] = list(answers)

    def gate(self) -> asyncio.Event:
        event = asyncio.Event()
        self.gates.append(event)
        return event

    def to(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path.endswith("/" + path)]

    async def wait_for(self, path: str, count: int = 1, timeout: float = WAIT) -> list[Received]:
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.to(path)) >= count)
        return self.to(path)

    async def _endpoint(self, request: Request) -> Response:
        body = await request.body()
        rec = Received(request.method, request.url.path, dict(request.headers), body)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            rec.json = orjson.loads(body)
        elif ctype.startswith("multipart/form-data"):
            async with request.form() as form:
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        content = await value.read()
                        rec.files[key] = (value.filename or "", value.content_type or "", content)
                    else:
                        rec.form[key] = value
        async with self._arrived:
            self.requests.append(rec)
            self._arrived.notify_all()
        path = request.path_params["path"]
        queue = self.answers.get(path)
        if not queue:
            return await ok()(rec)
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        return await answer(rec)

    async def start(self, prefix: str = "api/v4") -> str:
        app = Starlette(
            routes=[Route(f"/{prefix}/{{path:path}}", self._endpoint, methods=["POST", "PUT"])]
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/{prefix}/"
        return self.url

    async def stop(self) -> None:
        for gate in self.gates:
            gate.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, WAIT)


def api_settings(url: str, **overrides: Any) -> dict[str, Any]:
    api: dict[str, Any] = {
        "base_url": url,
        "username": API_USER,
        "password": API_PASS,
        "api_key": API_KEY,
        "auth": "both",
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
        "report_timeout": 10.0,
        "max_retries": 3,
        "retry_base_delay": 0.01,
        "retry_max_delay": 0.05,
        "rate_limit": 0,
    }
    api.update(overrides)
    return api


def worker_settings(
    amqp_url: str,
    tmp_path: Path,
    url: str,
    *,
    worker: dict[str, Any] | None = None,
    amqp: dict[str, Any] | None = None,
    **api: Any,
) -> Settings:
    return make_settings(
        amqp_url,
        tmp_path,
        amqp={"url": amqp_url, "publish_timeout": 5.0, **(amqp or {})},
        sources={
            "simotel": {
                "webhook": {"username": "simotel", "password": "secret"},
                "api": api_settings(url, **api),
            }
        },
        worker={"state_path": str(tmp_path / "worker.sqlite3"), **(worker or {})},
    )


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[asyncio.Event]:
    """The worker in this event loop; on exit it is stopped gracefully (bounded)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, settings.worker.shutdown_grace + WAIT)


@contextlib.asynccontextmanager
async def assembled_worker(
    settings: Settings,
    make_publisher: Callable[[Broker], Publisher] = Publisher,
    *,
    registry: CollectorRegistry | None = None,
    **options: Any,
) -> AsyncIterator[Worker]:
    """The worker put together as `run_worker` does, with a publisher of the test's choosing
    (e.g. one that fails some publishes before the real ones), its metrics on `registry`, and
    `Worker` options."""
    broker = Broker(settings.amqp, name="test worker")
    await broker.connect()
    metrics = WorkerMetrics(registry or CollectorRegistry())
    publisher = make_publisher(broker)
    clients = make_clients(settings, metrics)
    store = StateStore(settings.worker.state_path, ttl_seconds=3600, owner="test")
    worker = Worker(settings, broker, publisher, clients, store, metrics, **options)
    try:
        await publisher.start()
        await worker.start()
        yield worker
    finally:
        await worker.shutdown()
        for client in clients.values():
            await client.aclose()
        store.close()
        await publisher.close()
        await broker.close()


class Bus:
    """The test's side of the broker: publishes commands with a reply queue, collects replies
    (by correlation id), every result on `simotel.results`, and every dead letter."""

    def __init__(self, connection: AbstractRobustConnection, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.replies: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}
        self.results: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.dead: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.reply_queue = ""

    async def start(self, *, consume_dead: bool = True) -> Bus:
        self.channel = await self.connection.channel(publisher_confirms=True)
        await topology.declare(self.channel, self.settings.amqp)
        ex = self.settings.amqp.exchanges
        replies = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        self.reply_queue = replies.name
        await replies.consume(self._on_reply, no_ack=True)
        results = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await results.bind(ex.results, "#")
        await results.consume(self.results.put, no_ack=True)
        if consume_dead:
            dead = await self.channel.get_queue(self.settings.amqp.queues.dead, ensure=False)
            await dead.consume(self.dead.put, no_ack=True)
        return self

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self.replies.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message)

    async def send(
        self,
        action: str | None = None,
        data: Any = None,
        *,
        body: bytes | None = None,
        message_id: str | None = None,
        routing_key: str | None = None,
        headers: dict[str, Any] | None = None,
        reply: bool = True,
        **props: Any,
    ) -> str:
        """Publish a command to the commands exchange; returns its correlation id."""
        if body is None:
            body = orjson.dumps({"action": action, "data": {} if data is None else data})
        correlation_id = uuid.uuid4().hex
        if reply:
            self.replies[correlation_id] = asyncio.get_running_loop().create_future()
        key = routing_key or ("simotel." + (action or "x").replace("/", "."))
        exchange = await self.channel.get_exchange(self.settings.amqp.exchanges.commands)
        await exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                message_id=message_id,
                correlation_id=correlation_id,
                reply_to=self.reply_queue if reply else None,
                headers=headers or {},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                **props,
            ),
            key,
            mandatory=True,
        )
        return correlation_id

    async def reply(self, correlation_id: str, timeout: float = WAIT) -> AbstractIncomingMessage:
        return await asyncio.wait_for(self.replies[correlation_id], timeout)

    async def result(self, correlation_id: str, timeout: float = WAIT) -> Result:
        message = await self.reply(correlation_id, timeout)
        return parse_result(message.body, message.content_type, dict(message.headers or {}))

    async def call(self, action: str, data: Any = None, **kw: Any) -> Result:
        return await self.result(await self.send(action, data, **kw))

    async def next_dead(self, timeout: float = WAIT) -> AbstractIncomingMessage:
        return await asyncio.wait_for(self.dead.get(), timeout)

    async def queued_commands(self) -> list[AbstractIncomingMessage]:
        """The commands left in the queue (e.g. handed back by a stopped worker), taken out.
        A sentinel is published behind them and everything is consumed up to it, so this
        waits on the queue itself rather than on a guess of how long the broker needs."""
        channel = await self.connection.channel(publisher_confirms=True)
        try:
            name = self.settings.amqp.queues.commands
            sentinel = uuid.uuid4().hex
            await channel.default_exchange.publish(aio_pika.Message(b"", message_id=sentinel), name)
            queue = await channel.get_queue(name, ensure=False)
            left: list[AbstractIncomingMessage] = []
            async with asyncio.timeout(WAIT), queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    if message.message_id == sentinel:
                        break
                    left.append(message)
            return left
        finally:
            await channel.close()


def header(message: AbstractIncomingMessage, key: str) -> Any:
    value = (message.headers or {}).get(key)
    return value.decode() if isinstance(value, bytes) else value


async def test_fake_simotel_records_requests() -> None:
    """The fake itself: it answers what is queued, records exactly what arrived."""
    import httpx

    fake = FakeSimotel()
    url = await fake.start()
    fake.on("pbx/users/search", reply(503, {"success": 0}), ok([1]))
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            first = await client.post("pbx/users/search", json={"alike": "true"})
            second = await client.post("pbx/users/search", json={"alike": "false"})
            third = await client.post("pbx/faxes/upload", files={"file": ("f.tif", b"II*")})
        assert (first.status_code, second.json()["data"]) == (503, [1])
        assert [r.json for r in fake.to("pbx/users/search")] == [
            {"alike": "true"},
            {"alike": "false"},
        ]
        assert third.status_code == 200
        assert fake.to("pbx/faxes/upload")[0].files["file"][0::2] == ("f.tif", b"II*")
    finally:
        await fake.stop()


# --- a worker as a real process (`python -m bridge.cli worker -c FILE`) ---------------------

ORIGINATE = {"caller": "557", "callee": "0915", "context": "out", "caller_id": "557"}
START = 30.0  # bound for a worker process to start and reach the fake Simotel


class WorkerProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bridge.cli",
                "worker",
                "-c",
                str(self.config),
                stdout=out,
                stderr=out,
            )

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(self.proc.wait(), 10) == -signal.SIGKILL

    async def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 30)
