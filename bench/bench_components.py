"""Component round trip through the bridge, beside a direct handler, in one run.

    .venv/bin/python bench/bench_components.py [--quick]

Three processes on this machine and the local RabbitMQ (a throwaway vhost, deleted at the end):

  server     uvicorn + the ingress app twice: `/webhooks/...` answers through ComponentRpc
             (HTTP -> RabbitMQ -> responder -> RabbitMQ -> HTTP); `/direct/webhooks/...` is the
             same app whose component handler calls the same routing function in-process.
  responder  bridge.client.Responder subscribed to the four components.
  client     this process: httpx, closed loops at 1 and 50 callers, then an open loop at a
             fixed rate; latency is measured by the client, request sent -> answer read.

The four fixture requests are sent in turn. Prints markdown tables; takes about 30-40 s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402
import httpx  # noqa: E402
import orjson  # noqa: E402
import uvloop  # noqa: E402

from bridge.client import (  # noqa: E402
    Answer,
    ComponentRequest,
    ExtenApiAnswer,
    IvrApiAnswer,
    SmartApiAnswer,
    TrunkApiAnswer,
)
from bridge.client.smartapi import Exit, GetData, PlayAnnouncement  # noqa: E402
from bridge.components import COMPONENTS, DEFAULT_MAX_IN_FLIGHT, validate_answer  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
AMQP_HOST = os.environ.get("SIMOTEL_BRIDGE_TEST_AMQP_HOST", "127.0.0.1:5672")
AUTH = ("simotel", "bench")
DEADLINE_MS = 800


async def route(req: ComponentRequest) -> Answer:
    """The routing decision both paths make (a stand-in for a team's service)."""
    if req.component == "SmartApi":
        return SmartApiAnswer(
            [PlayAnnouncement("welcome-file"), GetData("enter-data-file", 10, 1), Exit("go-s2")]
        )
    if req.component == "ExtenApi":
        return ExtenApiAnswer("120" if req.src.startswith("0915") else "100")
    if req.component == "TrunkApi":
        return TrunkApiAnswer("NasimTrunk", req.dst, 300)
    return IvrApiAnswer(req.data or "0")


def settings_data(url: str) -> dict[str, Any]:
    return {
        "amqp": {"url": url},
        "log": {"level": "warning", "format": "json"},
        "sources": {"simotel": {"webhook": {"username": AUTH[0], "password": AUTH[1]}}},
        "spool": {"enabled": False},
    }


# --- the server process ---------------------------------------------------------------------


class DirectComponents:
    """The equivalent handler without the bridge: same request value, same routing function,
    same answer validation."""

    async def handle(
        self,
        source: str,
        component: str,
        fields: dict[str, Any],
        *,
        received_at: float | None = None,
    ) -> dict[str, Any]:
        req = ComponentRequest(
            source=source,
            component=component,
            app_name=str(fields.get("app_name", "")),
            src=str(fields.get("src", "")),
            dst=str(fields.get("dst", "")),
            data=str(fields.get("data", "")),
            unique_id=str(fields.get("unique_id", "")),
            originated_call_id=None,
            fields=fields,
            deadline=None,
        )
        return validate_answer(component, (await route(req)).to_json())


async def serve(url: str) -> None:
    import uvicorn
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from bridge import logs
    from bridge.amqp import Broker, Publisher
    from bridge.components import ComponentMetrics, ComponentRpc
    from bridge.config import load_settings
    from bridge.ingress import create_app
    from bridge.metrics import Metrics
    from bridge.sink import EventSink, SpoolMetrics

    settings = load_settings(data=settings_data(url), environ={})
    logs.configure(settings.log)
    broker = Broker(settings.amqp)
    await broker.connect()
    publisher = Publisher(broker)
    await publisher.start()
    metrics = Metrics(CollectorRegistry())
    limit = int(os.environ.get("BENCH_MAX_IN_FLIGHT", DEFAULT_MAX_IN_FLIGHT))
    rpc = ComponentRpc(broker, settings, ComponentMetrics(metrics.registry), max_in_flight=limit)
    await rpc.start()
    sink = EventSink(publisher, None, SpoolMetrics(CollectorRegistry()))
    bridge_app = create_app(settings, sink=sink, metrics=metrics, components=rpc)
    direct_app = create_app(settings, sink=sink, metrics=Metrics(), components=DirectComponents())
    app = Starlette(routes=[Mount("/direct", app=direct_app), Mount("/", app=bridge_app)])
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off", timeout_keep_alive=300
    )
    server = uvicorn.Server(config)
    # Listening before uvicorn starts: connections wait in the backlog, so "ready" is true.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    print("ready", sock.getsockname()[1], flush=True)
    await server.serve(sockets=[sock])
    await rpc.close()
    await publisher.close()
    await broker.close()


async def respond(url: str) -> None:
    from bridge.client import Responder

    connection = await aio_pika.connect_robust(url)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with Responder(connection, prefetch=256) as responder:
        for component in COMPONENTS:
            await responder.subscribe(component, "*", route)
        print("ready", flush=True)
        await stop.wait()
    await connection.close()


# --- the client (this process) --------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


REQUESTS = [
    (c, json.loads((FIXTURES / f"component-{c}-request.json").read_text())) for c in COMPONENTS
]


class Client:
    """A minimal keep-alive HTTP/1.1 client: the load generator shares two CPUs with the server,
    the responder and RabbitMQ, so it must cost far less per request than httpx does."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.fallbacks = 0  # answers that are the default fallback {"ok": "0"}
        auth = base64.b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
        self.requests: dict[tuple[str, int], bytes] = {}
        for prefix in ("", "/direct"):
            for i, (component, fields) in enumerate(REQUESTS):
                body = orjson.dumps(fields)
                self.requests[prefix, i] = (
                    f"POST {prefix}/webhooks/simotel/components/{component} HTTP/1.1\r\n"
                    f"Host: bench\r\nAuthorization: Basic {auth}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body

    async def call(self, prefix: str, i: int) -> float:
        conn = (
            self.idle.pop() if self.idle else await asyncio.open_connection("127.0.0.1", self.port)
        )
        reader, writer = conn
        started = time.perf_counter()
        writer.write(self.requests[prefix, i % len(REQUESTS)])
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        body = await reader.readexactly(length)
        elapsed = time.perf_counter() - started
        self.idle.append(conn)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{prefix or 'bridge'} answered {head[:12]!r} {body!r}")
        if orjson.loads(body).get("ok") != "1":
            self.fallbacks += 1
        return elapsed

    async def get(self, path: str) -> str:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:
            return (await client.get(path)).text

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def closed_loop(client: Client, prefix: str, callers: int, n: int) -> list[float]:
    latencies: list[float] = []
    counter = iter(range(n))

    async def caller() -> None:
        for i in counter:
            latencies.append(await client.call(prefix, i))

    await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies


async def open_loop(
    client: Client, prefix: str, rate: float, seconds: float
) -> tuple[list[float], float]:
    """Send at a fixed rate whatever the answers do; returns latencies and the achieved rate."""
    n = int(rate * seconds)
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    tasks = []
    for i in range(n):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the load, not waiting for a result
        tasks.append(asyncio.create_task(client.call(prefix, i)))
    latencies = await asyncio.gather(*tasks)
    return list(latencies), n / (loop.time() - t0)


async def raw_rpc(url: str, confirms: bool, n: int) -> list[float]:
    """Sequential round trips with raw aio-pika to the responder, to compare a channel with
    publisher confirms (awaiting the confirm) with one without."""
    conn = await aio_pika.connect_robust(url)
    ch = await conn.channel(publisher_confirms=confirms, on_return_raises=confirms)
    pending: dict[str, asyncio.Future[bytes]] = {}

    async def on_reply(m: aio_pika.abc.AbstractIncomingMessage) -> None:
        f = pending.pop(m.correlation_id or "", None)
        if f is not None:
            f.set_result(m.body)

    reply_queue = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)
    await reply_queue.consume(on_reply, no_ack=True)
    ex = await ch.get_exchange("simotel.components", ensure=False)
    body = orjson.dumps(REQUESTS[1][1])
    out = []
    for _ in range(n):
        cid = uuid.uuid4().hex
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        pending[cid] = fut
        started = time.perf_counter()
        msg = aio_pika.Message(
            body, correlation_id=cid, message_id=cid, reply_to="amq.rabbitmq.reply-to",
            expiration=0.8, headers={"source": "simotel", "component": "ExtenApi"},
        )  # fmt: skip
        await ex.publish(msg, "simotel.ExtenApi.x", mandatory=True)
        await asyncio.wait_for(fut, 1.0)
        out.append(time.perf_counter() - started)
    await conn.close()
    return out


def outcomes(metrics_text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("simotel_bridge_component_requests_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = counts.get(outcome, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([exe, *args], check=True, capture_output=True, timeout=60)


def start(role: str, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, __file__, role, *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the child exits (EOF) if it cannot start
    words = line.split()
    if not words or words[0] != "ready":
        proc.kill()
        raise RuntimeError(f"{role} did not start")
    return proc, words[1:]


async def bench(url: str, port: int, quick: bool) -> None:
    scale = 0.3 if quick else 1.0
    rows: list[tuple[str, str, list[float], int]] = []
    client = Client(port)
    try:
        for prefix in ("/direct", ""):
            await closed_loop(client, prefix, 10, 400)  # warm up connections and channels
        for callers, n in ((1, int(1000 * scale)), (50, int(6000 * scale))):
            for name, prefix in (("direct", "/direct"), ("bridge", "")):
                before_fb = client.fallbacks
                lat = await closed_loop(client, prefix, callers, n)
                rows.append((name, f"{callers} caller(s)", lat, client.fallbacks - before_fb))
        rate_rows = []
        for name, prefix in (("direct", "/direct"), ("bridge", "")):
            before = outcomes(await client.get("/metrics"))
            lat, achieved = await open_loop(client, prefix, 500, 8 * scale)
            after = outcomes(await client.get("/metrics"))
            diff = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            late = sum(1 for x in lat if x * 1000 > DEADLINE_MS)
            rate_rows.append((name, achieved, lat, late, diff))
    finally:
        client.close()
    raw = {c: await raw_rpc(url, c, int(1000 * scale)) for c in (True, False)}

    report(rows, rate_rows, raw)


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def report(
    rows: list[tuple[str, str, list[float], int]],
    rate_rows: list[tuple[str, float, list[float], int, dict[str, float]]],
    raw: dict[bool, list[float]],
) -> None:
    def ms(values: list[float]) -> tuple[str, str, str]:
        return f"{pct(values, 0.5):.2f}", f"{pct(values, 0.99):.2f}", f"{max(values) * 1000:.2f}"

    print("\n### Component round trip (client-measured, ms)\n")
    print(row("path", "load", "requests", "p50", "p99", "max", "fallbacks"))
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, load, lat, fallbacks in rows:
        print(row(name, load, len(lat), *ms(lat), fallbacks))
    print()
    print(row("load", "bridge adds at p50", "bridge adds at p99"))
    print("|---|---:|---:|")
    for i in range(0, len(rows), 2):
        d, b = rows[i][2], rows[i + 1][2]
        p50, p99 = pct(b, 0.5) - pct(d, 0.5), pct(b, 0.99) - pct(d, 0.99)
        print(row(rows[i][1], f"{p50:.2f}", f"{p99:.2f}"))
    print(f"\n### Open loop at 500 requests/s (deadline {DEADLINE_MS} ms)\n")
    print(row("path", "sent", "achieved rate", "p50", "p99", "max", "after deadline", "outcomes"))
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, achieved, lat, late, diff in rate_rows:
        outs = ", ".join(f"{k} {int(v)}" for k, v in sorted(diff.items()) if v)
        outs = outs if name == "bridge" else "-"
        print(row(name, len(lat), f"{achieved:.0f}/s", *ms(lat), late, outs))
    print("\n### Raw AMQP round trip to the responder, 1 caller (ms)\n")
    print(row("channel", "p50", "p99", "max", "returned mandatory publish"))
    print("|---|---:|---:|---:|---|")
    print(row("publisher confirms, await confirm", *ms(raw[True]), "raises at once"))
    print(row("no confirms", *ms(raw[False]), "never seen (aiormq drops Basic.Return)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "role", nargs="?", default="bench", choices=["bench", "server", "responder"]
    )
    parser.add_argument("args", nargs="*")
    parser.add_argument("--quick", action="store_true", help="about a third of the requests")
    ns = parser.parse_args()
    if ns.role == "server":
        uvloop.run(serve(ns.args[0]))
        return
    if ns.role == "responder":
        uvloop.run(respond(ns.args[0]))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` cleans up
    vhost = f"bench-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", vhost)
    procs: list[subprocess.Popen[str]] = []
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        url = f"amqp://guest:guest@{AMQP_HOST}/{vhost}"
        server, (port,) = start("server", url)
        procs.append(server)
        procs.append(start("responder", url)[0])
        started = time.perf_counter()
        uvloop.run(bench(url, int(port), ns.quick))
        took = time.perf_counter() - started
        print(f"\n(measured in {took:.0f} s; python {sys.version.split()[0]}, uvloop)")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        rabbitmqctl("delete_vhost", vhost)


if __name__ == "__main__":
    main()
