"""Ingress benchmark: event webhooks per second and latency at 64 concurrent connections, beside
two ceilings measured in the same run on the same machine:

  raw-publish   aio-pika persistent publishes with confirms, 64 in flight, to the same exchange
                and queue the bridge publishes to (the broker's ceiling for this traffic)
  bare-http     a Starlette handler that reads the body and answers 200, publishing nothing,
                served by uvicorn the same way the bridge is (the HTTP stack's ceiling)
  peer          the ingress a user would write with FastStream instead: a Starlette handler
                doing `await broker.publish(...)` (persistent, mandatory, confirmed), Basic auth
                (needs the optional extra `bench`: pip install -e '.[bench]')
  bridge        `simotel-bridge ingress`, the same Cdr payload with Basic auth, each request
                answered only after the broker confirmed its publish (default configuration:
                spool on, history stream on, access log sampled)

The load comes from wrk (Debian package `wrk`), which costs far less CPU than a Python client.
Usage: .venv/bin/python bench/bench_ingress.py [--seconds 10] [--connections 64] [--rounds 3]
       [--workers 2] [--no-bare]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import PYTHON, ROOT, WrkResult, free_port, fresh_vhost, process, wait_http, wrk

CDR = (ROOT / "tests" / "fixtures" / "event-Cdr.json").read_bytes()

BARE_APP = """
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

async def hook(request):
    await request.body()
    return Response(b'{"status":"accepted"}', media_type="application/json")

app = Starlette(routes=[Route("/webhooks/simotel/events", hook, methods=["GET", "POST"])])
"""

# The ingress a user would write with FastStream: Starlette, Basic auth, and
# `await broker.publish(...)` of a persistent, mandatory message (FastStream's RabbitBroker
# opens its channel with publisher confirms, so the 200 follows the broker's confirm).
PEER_APP = """
import hmac, os, uuid
from contextlib import asynccontextmanager
from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

broker = RabbitBroker(os.environ["PEER_AMQP_URL"], log_level=30)
EVENTS = RabbitExchange("simotel.events", type=ExchangeType.TOPIC, declare=False)
EXPECTED = "Basic c2ltb3RlbDpiZW5jaC1zZWNyZXQ="  # simotel:bench-secret

async def hook(request):
    if not hmac.compare_digest(request.headers.get("authorization", ""), EXPECTED):
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    body = await request.body()
    message_id = str(uuid.uuid4())
    await broker.publish(body, exchange=EVENTS, routing_key="simotel.Cdr", persist=True,
                         mandatory=True, content_type="application/json", message_id=message_id)
    return JSONResponse({"status": "accepted", "message_id": message_id})

async def healthz(request):
    return JSONResponse({"status": "alive"})

@asynccontextmanager
async def lifespan(app):
    await broker.connect()
    yield
    await broker.stop()

app = Starlette(routes=[Route("/webhooks/simotel/events", hook, methods=["POST"]),
                        Route("/healthz", healthz)], lifespan=lifespan)
"""


async def raw_publish(url: str, seconds: float, in_flight: int) -> tuple[float, float, float]:
    """Confirmed persistent publishes, `in_flight` at a time; returns (rate, p50 ms, p99 ms)."""
    conn = await aio_pika.connect_robust(url)
    ch = await conn.channel(publisher_confirms=True)
    ex = await ch.get_exchange("simotel.events", ensure=False)
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    count = 0

    async def lane() -> None:
        nonlocal count
        while time.perf_counter() < stop_at:
            msg = aio_pika.Message(
                CDR, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, content_type="application/json"
            )
            t0 = time.perf_counter()
            await ex.publish(msg, "simotel.Cdr", mandatory=False)
            latencies.append(time.perf_counter() - t0)
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    await conn.close()
    q = statistics.quantiles(latencies, n=100)
    return count / elapsed, q[49] * 1000, q[98] * 1000


async def prepare(url: str, history: bool = True) -> None:
    """Declare the topology (with the history stream unless `history` is off, as the bridge
    does) and a durable queue bound to every event, as a consumer would: every run's publishes
    are routed to the same queues."""
    from bridge.amqp import Broker
    from bridge.config import load_settings

    source = {"webhook": {"allow_unauthenticated": True}}
    settings = load_settings(
        data={"amqp": {"url": url}, "sources": {"simotel": source},
              "history": {"enabled": history}}, environ={}
    )  # fmt: skip
    broker = Broker(settings.amqp, history=settings.history)
    await broker.connect()
    ch = await broker.channel(confirms=False)
    q = await ch.declare_queue("bench.events", durable=True, arguments={"x-max-length": 200_000})
    await q.bind("simotel.events", "#")
    await broker.close()


async def purge(url: str) -> None:
    conn = await aio_pika.connect_robust(url)
    ch = await conn.channel()
    q = await ch.get_queue("bench.events", ensure=False)
    await q.purge()
    await conn.close()


def _peer_available() -> bool:
    try:
        import faststream.rabbit  # noqa: F401
    except ImportError:
        return False
    return True


def _row(name: str, r: WrkResult) -> str:
    return (f"| {name} | {r.requests_per_s:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.errors} | {r.non_2xx} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="raw, peer, bridge this many times")
    ap.add_argument("--workers", type=int, default=1, help="the bridge's http.workers")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare Starlette run")
    ap.add_argument("--no-history", action="store_true", help="no simotel.history stream")
    args = ap.parse_args()
    secs, conns = args.seconds, args.connections
    if not _peer_available():
        raise SystemExit(
            "The FastStream peer needs the optional extra `bench`:\n"
            "  .venv/bin/pip install -e '.[bench]'   (or: pip install 'faststream[rabbit]')"
        )
    auth = "Basic " + base64.b64encode(b"simotel:bench-secret").decode()
    headers = {"Content-Type": "application/json", "Authorization": auth}
    url_path = "/webhooks/simotel/events"
    raws: list[tuple[float, float, float]] = []
    peers: list[WrkResult] = []
    bridges: list[WrkResult] = []
    bare: WrkResult | None = None
    loads: list[float] = []

    with fresh_vhost() as url, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(prepare(url, history=not args.no_history))
        apps = Path(tmp)
        (apps / "bare_app.py").write_text(BARE_APP)
        (apps / "peer_app.py").write_text(PEER_APP)

        def uvicorn(module: str, port: int, env: dict[str, str] | None = None) -> Any:
            return process(
                [PYTHON, "-m", "uvicorn", "--app-dir", str(apps), module, "--port", str(port),
                 "--loop", "uvloop", "--http", "httptools", "--log-level", "warning",
                 "--no-access-log"], env=env,
            )  # fmt: skip

        def load(port: int) -> WrkResult:
            return wrk(f"http://127.0.0.1:{port}{url_path}", connections=conns, seconds=secs,
                       body=CDR, headers=headers)  # fmt: skip

        if not args.no_bare:
            port = free_port()
            with uvicorn("bare_app:app", port):
                wait_http(f"http://127.0.0.1:{port}{url_path}")
                bare = load(port)

        for _ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            raws.append(asyncio.run(raw_publish(url, secs, conns)))
            asyncio.run(purge(url))

            port = free_port()
            with uvicorn("peer_app:app", port, env={"PEER_AMQP_URL": url}):
                wait_http(f"http://127.0.0.1:{port}/healthz")
                peers.append(load(port))
            asyncio.run(purge(url))

            port = free_port()
            env = {
                "SIMOTEL_BRIDGE__AMQP__URL": url,
                "SIMOTEL_BRIDGE__HTTP__PORT": str(port),
                "SIMOTEL_BRIDGE__HTTP__WORKERS": str(args.workers),
                "SIMOTEL_BRIDGE__SPOOL__PATH": str(Path(tmp) / "spool.sqlite3"),
                "SIMOTEL_BRIDGE__SOURCES__SIMOTEL__WEBHOOK__USERNAME": "simotel",
                "SIMOTEL_BRIDGE__SOURCES__SIMOTEL__WEBHOOK__PASSWORD": "bench-secret",
                "SIMOTEL_BRIDGE__LOG__FORMAT": "json",
                "SIMOTEL_BRIDGE__HISTORY__ENABLED": "false" if args.no_history else "true",
            }
            with process([PYTHON, "-m", "bridge.cli", "ingress"], env=env):
                wait_http(f"http://127.0.0.1:{port}/healthz")
                if args.workers > 1:
                    time.sleep(3)  # let every child bind before the load starts
                bridges.append(load(port))
            asyncio.run(purge(url))

    print(f"## Ingress, {conns} connections, {secs}s each, Cdr payload ({len(CDR)} bytes), "
          f"bridge http.workers={args.workers}, history stream "
          f"{'off' if args.no_history else 'on'}\n")  # fmt: skip
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; load average (1 min) at each round's start: "
          f"{', '.join(f'{x:.1f}' for x in loads)}\n")  # fmt: skip
    print("| run | req/s | p50 ms | p99 ms | errors | non-2xx |")
    print("|---|---:|---:|---:|---:|---:|")
    if bare is not None:
        print(_row("bare Starlette handler (no publish)", bare))
    for i, (raw, peer, bridge) in enumerate(zip(raws, peers, bridges, strict=True), 1):
        print(f"| {i}: raw aio-pika confirmed publish ({conns} in flight) | {raw[0]:,.0f} | "
              f"{raw[1]:.2f} | {raw[2]:.2f} | - | - |")  # fmt: skip
        print(_row(f"{i}: FastStream peer (RabbitBroker.publish)", peer))
        print(_row(f"{i}: simotel-bridge ingress", bridge))
    print()
    print("| round | bridge / peer | bridge / raw | bridge p99 ms |")
    print("|---|---:|---:|---:|")
    vs_peer = [b.requests_per_s / p.requests_per_s for b, p in zip(bridges, peers, strict=True)]
    vs_raw = [b.requests_per_s / r[0] for b, r in zip(bridges, raws, strict=True)]
    for i, b in enumerate(bridges):
        print(f"| {i + 1} | {vs_peer[i]:.2f} | {vs_raw[i]:.2f} | {b.p99_ms:.1f} |")
    med = statistics.median
    print(f"| median | **{med(vs_peer):.2f}** (goal >= 1.5) | **{med(vs_raw):.2f}** (goal >= 0.7) "
          f"| **{med(b.p99_ms for b in bridges):.1f}** (goal < 50) |")  # fmt: skip
    print(f"\nMedian req/s: raw {med(r[0] for r in raws):,.0f}, "
          f"peer {med(p.requests_per_s for p in peers):,.0f}, "
          f"bridge {med(b.requests_per_s for b in bridges):,.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
