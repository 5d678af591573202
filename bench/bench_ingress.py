"""Ingress benchmark: event webhooks per second and latency at 64 concurrent connections, beside
two ceilings measured in the same run on the same machine:

  raw-publish   aio-pika persistent publishes with confirms, 64 in flight, to the same exchange
                and queue the bridge publishes to (the broker's ceiling for this traffic)
  bare-http     a Starlette handler that reads the body and answers 200, publishing nothing,
                served by uvicorn the same way the bridge is (the HTTP stack's ceiling)
  bridge        `simotel-bridge ingress`, the same Cdr payload with Basic auth, each request
                answered only after the broker confirmed its publish

The load comes from wrk (Debian package `wrk`), which costs far less CPU than a Python client.
Usage: .venv/bin/python bench/bench_ingress.py [--seconds 10] [--connections 64]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import PYTHON, ROOT, free_port, fresh_vhost, process, wait_http, wrk

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


async def prepare(url: str) -> None:
    """Declare the topology and a durable queue bound to every event, as a consumer would."""
    from bridge.amqp import Broker
    from bridge.config import load_settings

    source = {"webhook": {"allow_unauthenticated": True}}
    settings = load_settings(
        data={"amqp": {"url": url}, "sources": {"simotel": source}}, environ={}
    )
    broker = Broker(settings.amqp)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    secs, conns = args.seconds, args.connections
    auth = "Basic " + base64.b64encode(b"simotel:bench-secret").decode()
    headers = {"Content-Type": "application/json", "Authorization": auth}

    with fresh_vhost() as url, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(prepare(url))
        raw_rate, raw_p50, raw_p99 = asyncio.run(raw_publish(url, secs, conns))
        asyncio.run(purge(url))

        bare_dir = Path(tmp)
        (bare_dir / "bare_app.py").write_text(BARE_APP)
        port = free_port()
        with process(
            [PYTHON, "-m", "uvicorn", "--app-dir", str(bare_dir), "bare_app:app",
             "--port", str(port), "--log-level", "warning", "--no-access-log"]
        ):  # fmt: skip
            wait_http(f"http://127.0.0.1:{port}/webhooks/simotel/events")
            bare = wrk(
                f"http://127.0.0.1:{port}/webhooks/simotel/events",
                connections=conns, seconds=secs, body=CDR, headers=headers,
            )  # fmt: skip

        port = free_port()
        env = {
            "SIMOTEL_BRIDGE__AMQP__URL": url,
            "SIMOTEL_BRIDGE__HTTP__PORT": str(port),
            "SIMOTEL_BRIDGE__SPOOL__PATH": str(Path(tmp) / "spool.sqlite3"),
            "SIMOTEL_BRIDGE__SOURCES__SIMOTEL__WEBHOOK__USERNAME": "simotel",
            "SIMOTEL_BRIDGE__SOURCES__SIMOTEL__WEBHOOK__PASSWORD": "bench-secret",
            "SIMOTEL_BRIDGE__LOG__FORMAT": "json",
        }
        with process([PYTHON, "-m", "bridge.cli", "ingress"], env=env):
            wait_http(f"http://127.0.0.1:{port}/healthz")
            bridge = wrk(
                f"http://127.0.0.1:{port}/webhooks/simotel/events",
                connections=conns, seconds=secs, body=CDR, headers=headers,
            )  # fmt: skip

    ratio_raw = bridge.requests_per_s / raw_rate
    ratio_bare = bridge.requests_per_s / bare.requests_per_s
    print(f"## Ingress, {conns} connections, {secs}s each, Cdr payload ({len(CDR)} bytes)\n")
    print(f"Machine: {platform.machine()}, {__import__('os').cpu_count()} cores, "
          f"Python {platform.python_version()}\n")  # fmt: skip
    print("| run | req/s | p50 ms | p99 ms | errors | non-2xx |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| raw aio-pika confirmed publish ({conns} in flight) | {raw_rate:,.0f} | "
          f"{raw_p50:.2f} | {raw_p99:.2f} | - | - |")  # fmt: skip
    print(f"| bare Starlette handler | {bare.requests_per_s:,.0f} | {bare.p50_ms:.2f} | "
          f"{bare.p99_ms:.2f} | {bare.errors} | {bare.non_2xx} |")  # fmt: skip
    print(f"| simotel-bridge ingress | {bridge.requests_per_s:,.0f} | {bridge.p50_ms:.2f} | "
          f"{bridge.p99_ms:.2f} | {bridge.errors} | {bridge.non_2xx} |")  # fmt: skip
    print(f"\nbridge / raw publish = {ratio_raw:.2f} (goal >= 0.8); "
          f"bridge / bare HTTP = {ratio_bare:.2f}; "
          f"bridge p99 = {bridge.p99_ms:.1f} ms (goal < 50)")  # fmt: skip


if __name__ == "__main__":
    main()
