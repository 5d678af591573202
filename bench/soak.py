"""Soak benchmark for issue 5 (nothing accepted is ever lost). Not part of the test suite.

Runs the ingress (create_app + the spool sink, served by uvicorn in a child process) against a
private RabbitMQ node of its own (tests/brokernode.py; the system broker is never touched), sends
event webhooks over HTTP at a moderate steady rate for N minutes, restarts the broker once in
the middle, then reports:

  lost          webhooks answered 200 that are not on the queue afterwards (must be 0)
  duplicates    extra copies (same message_id, same body) from replays
  order         calls whose events did not arrive in the order they were sent
  latency       p50 / p99 / max of the webhook answers, overall and during the outage
  memory        resident set size of the bridge process at start and at the end

Usage: .venv/bin/python bench/soak.py [--minutes 10] [--rate 50] [--calls 20] [--kill]
Exit status 1 if anything answered 200 was lost or reordered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.brokernode import PrivateBroker, free_port  # noqa: E402
from tests.sinkkit import check_delivery, declare_audit, percentile  # noqa: E402

AUTH = ("simotel", "soak-secret")
REPLAYED = "simotel_bridge_spool_replayed_total"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- the bridge process ---------------------------------------------------------------------


async def serve(config: str) -> None:
    """The ingress with the spool sink, as `simotel-bridge ingress` will run it."""
    import uvicorn

    from bridge import logs
    from bridge.amqp import Broker, Publisher
    from bridge.config import load_settings
    from bridge.ingress import create_app
    from bridge.metrics import Metrics
    from bridge.sink import EventSink, SpoolMetrics

    settings = load_settings(config)
    logs.configure(settings.log)
    broker = Broker(settings.amqp, name="soak")
    await broker.connect()
    publisher = Publisher(broker)
    await publisher.start()
    metrics = Metrics()
    sink = await EventSink.open(
        settings, publisher, SpoolMetrics(metrics.registry), confirm_latency=metrics.confirm_latency
    )
    app = create_app(settings, sink=sink, metrics=metrics, broker_ready=lambda: broker.ready)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=settings.http.port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
    )
    try:
        await server.serve()
    finally:
        await sink.close(drain_timeout=10)
        await publisher.close()
        await broker.close()


# -- the load -------------------------------------------------------------------------------


class Load:
    def __init__(self, client: httpx.AsyncClient, calls: int, rate: float) -> None:
        self.client = client
        self.calls = calls
        self.interval = calls / rate  # each call sends one event every `interval` seconds
        self.sent: dict[str, list[str]] = {}
        self.statuses: dict[str, int] = {}
        self.samples: list[tuple[float, float]] = []  # (sent at, latency)
        self.stop = asyncio.Event()

    async def call(self, i: int) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.interval * i / self.calls  # spread the calls evenly
        n = 0
        while not self.stop.is_set():
            await asyncio.sleep(max(0.0, due - loop.time()))
            call = f"soak{i}-{n // 50}"  # a "call" is 50 events, then a new call id
            body = orjson.dumps({"event_name": "NewState", "unique_id": call, "n": n})
            started = loop.time()
            try:
                r = await self.client.post(
                    "/webhooks/simotel/events",
                    content=body,
                    headers={"content-type": "application/json"},
                    auth=AUTH,
                )
                status = str(r.status_code)
            except httpx.HTTPError as exc:
                r, status = None, type(exc).__name__
            self.samples.append((started, loop.time() - started))
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if r is not None and r.status_code == 200:
                self.sent.setdefault(call, []).append(r.json()["message_id"])
            n += 1
            due += self.interval

    async def run(self) -> None:
        await asyncio.gather(*(self.call(i) for i in range(self.calls)))


async def read_all(url: str, timeout: float) -> list[Any]:
    """Consume everything in the audit queue (bounded by `timeout`)."""
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=1000)
        queue = await ch.declare_queue("audit", durable=True, passive=True)
        expected = queue.declaration_result.message_count or 0
        got: list[Any] = []
        done = asyncio.Event()

        async def on_message(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            got.append(m)
            if len(got) >= expected:
                done.set()

        if expected:
            await queue.consume(on_message, no_ack=True)
            async with asyncio.timeout(timeout):
                await done.wait()
        return got
    finally:
        await conn.close()


async def sample(client: httpx.AsyncClient, pid: int, peaks: dict[str, float]) -> None:
    """Once a second: the bridge's RSS and spool depth, keeping the peaks."""
    while True:
        peaks["rss"] = max(peaks["rss"], rss_mb(pid))
        with contextlib.suppress(httpx.HTTPError):
            depth = (await client.get("/readyz")).json().get("spool_depth", 0)
            peaks["depth"] = max(peaks["depth"], float(depth))
        await asyncio.sleep(1.0)


def summary(samples: list[tuple[float, float]]) -> str:
    lat = [s[1] for s in samples]
    if not lat:
        return "none"
    return (
        f"n={len(lat)} p50={percentile(lat, 50) * 1000:.1f}ms "
        f"p99={percentile(lat, 99) * 1000:.1f}ms max={max(lat) * 1000:.1f}ms"
    )


async def soak(args: argparse.Namespace, node: PrivateBroker, workdir: Path) -> int:
    await declare_audit(node.url)
    peaks = {"rss": 0.0, "depth": 0.0}
    port = free_port()
    config = workdir / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "amqp": {"url": node.url, "publish_timeout": 1.0, "heartbeat": 5},
                "http": {"host": "127.0.0.1", "port": port},
                "log": {"level": "warning", "format": "json"},
                "sources": {"simotel": {"webhook": {"username": AUTH[0], "password": AUTH[1]}}},
                "spool": {"path": str(workdir / "spool.sqlite3")},
            }
        )
    )
    with (workdir / "bridge.log").open("wb") as log:
        bridge = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "serve", str(config), cwd=ROOT, stderr=log, stdout=log
        )
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
            deadline = time.monotonic() + 30
            while True:  # bounded wait for the server to answer
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or bridge.returncode is not None:
                    raise RuntimeError(f"the bridge did not start; see {workdir}/bridge.log")
                await asyncio.sleep(0.1)
            rss_start = rss_mb(bridge.pid)
            load = Load(client, args.calls, args.rate)
            runner = asyncio.create_task(load.run())
            sampler = asyncio.create_task(sample(client, bridge.pid, peaks))
            duration = args.minutes * 60
            t0 = time.monotonic()
            await asyncio.sleep(duration / 2)
            outage_start = asyncio.get_running_loop().time()
            await asyncio.to_thread(node.stop, kill=args.kill)
            down_for = time.monotonic()
            starting = asyncio.create_task(asyncio.to_thread(node.start))
            await asyncio.sleep(1.0)
            ready = (await client.get("/readyz")).json()
            restart_s = await starting
            down_for = time.monotonic() - down_for
            outage_end = asyncio.get_running_loop().time()
            await asyncio.sleep(max(0.0, duration - (time.monotonic() - t0)))
            load.stop.set()
            await runner
            sampler.cancel()
            drain_deadline = time.monotonic() + 120
            while (status := (await client.get("/readyz")).json())["spool_depth"] or status[
                "mode"
            ] != "broker":
                if time.monotonic() > drain_deadline:
                    raise RuntimeError(f"the spool did not drain: {status}")
                await asyncio.sleep(0.2)
            rss_end = rss_mb(bridge.pid)
            metrics = (await client.get("/metrics")).text
    finally:
        bridge.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(20):
                await bridge.wait()
        except TimeoutError:
            bridge.kill()
            await bridge.wait()
    messages = await read_all(node.url, timeout=120)
    delivery = check_delivery(load.sent, messages)
    answered = sum(len(v) for v in load.sent.values())
    during = [s for s in load.samples if outage_start <= s[0] <= outage_end + 5]
    replayed = next((ln.split()[-1] for ln in metrics.splitlines() if ln.startswith(REPLAYED)), "?")
    print(f"soak: {args.minutes} min at {args.rate}/s over {args.calls} concurrent calls, "
          f"broker {'SIGKILLed' if args.kill else 'stopped'} at half time for {down_for:.1f}s "
          f"(node start {restart_s:.1f}s)")  # fmt: skip
    print(f"  answered 200: {answered}  other answers: "
          f"{ {k: v for k, v in load.statuses.items() if k != '200'} }")  # fmt: skip
    print(f"  on the queue: {len(messages)}  lost: {len(delivery.missing)}  "
          f"duplicates: {delivery.duplicates}  calls out of order: {len(delivery.out_of_order)}  "
          f"replayed from spool: {replayed}")  # fmt: skip
    print(f"  latency all: {summary(load.samples)}")
    print(f"  latency during outage (+5s): {summary(during)}")
    print(f"  readyz during outage: {ready}")
    print(f"  bridge RSS: start {rss_start:.1f} MB, end {rss_end:.1f} MB, "
          f"peak {peaks['rss']:.1f} MB; spool depth peak {peaks['depth']:.0f}")  # fmt: skip
    return 0 if delivery.ok and not delivery.missing else 1


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        asyncio.run(serve(sys.argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="duration (default 10)")
    p.add_argument("--rate", type=float, default=50.0, help="webhooks per second (default 50)")
    p.add_argument("--calls", type=int, default=20, help="calls sending side by side")
    p.add_argument("--kill", action="store_true", help="SIGKILL the broker instead of stopping it")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bridge-soak-") as tmp:
        (Path(tmp) / "rabbit").mkdir()
        node = PrivateBroker(Path(tmp) / "rabbit")
        try:
            node.start()
            return asyncio.run(soak(args, node, Path(tmp)))
        finally:
            node.kill()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
