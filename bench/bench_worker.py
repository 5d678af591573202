"""Benchmark of the command worker: commands per second through RabbitMQ and the worker against a
fake Simotel, beside a plain httpx loop with the same concurrency against the same server.

    .venv/bin/python bench/bench_worker.py [--seconds 6] [--concurrency 32]

Needs the local RabbitMQ (a throw-away vhost is created with rabbitmqctl and deleted). The fake
Simotel runs in its own process (uvicorn), the worker in its own (`simotel-bridge worker`),
so the figures include real HTTP, real AMQP and the worker's SQLite state store. Commands are
queued first, then the worker is started; throughput is counted from the first result to the
last. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge import topology  # noqa: E402
from bridge.config import load_settings  # noqa: E402

AMQP_HOST = os.environ.get("SIMOTEL_BRIDGE_TEST_AMQP_HOST", "127.0.0.1:5672")
SLOW_DELAY = 0.2
ANSWER = orjson.dumps({"success": 1, "message": "", "data": [{"_id": "1", "number": "101"}]})


# --- the fake Simotel (child process) --------------------------------------------------------


def serve(fd: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def answer(request: Request) -> Response:
        await request.body()
        if request.path_params["speed"] == "slow":
            await asyncio.sleep(SLOW_DELAY)
        return Response(ANSWER, media_type="application/json")

    app = Starlette(routes=[Route("/{speed}/api/v4/{path:path}", answer, methods=["POST"])])
    uvicorn.run(app, fd=fd, log_level="warning", access_log=False, lifespan="off")


# --- helpers ---------------------------------------------------------------------------------


def rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([exe, *args], check=True, capture_output=True, timeout=60)


async def ceiling(base: str, concurrency: int, seconds: float) -> float:
    """Requests per second of a plain httpx loop, `concurrency` requests at a time."""
    count = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, auth=("u", "p")) as client:

        async def loop() -> None:
            nonlocal count
            while time.perf_counter() < stop_at:
                r = await client.post(
                    "pbx/users/search", json={"alike": "true"}, headers={"X-APIKEY": "k"}
                )
                r.raise_for_status()
                count += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


async def through_worker(
    amqp_url: str,
    base: str,
    tmp: Path,
    action: str,
    data: dict[str, Any],
    count: int,
    prefetch: int,
) -> tuple[float, dict[str, int]]:
    """Queue `count` commands, start a worker process, time the results. Returns (commands per
    second, statuses)."""
    config = tmp / f"config-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "amqp": {"url": amqp_url},
                "http": {"port": 0},
                "log": {"level": "warning", "format": "json"},
                "sources": {
                    "simotel": {
                        "webhook": {"allow_unauthenticated": True},
                        "api": {
                            "base_url": base,
                            "username": "u",
                            "password": "p",
                            "api_key": "k",
                            "rate_limit": 0,
                        },
                    }
                },
                "worker": {
                    "prefetch": prefetch,
                    "state_path": str(tmp / f"state-{config.stem}.sqlite3"),
                },
            }
        )
    )
    settings = load_settings(config, environ={})
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel, settings.amqp)
        results = await channel.declare_queue(exclusive=True, auto_delete=True)
        await results.bind(settings.amqp.exchanges.results, "#")
        exchange = await channel.get_exchange(settings.amqp.exchanges.commands)
        body = orjson.dumps({"action": action, "data": data})
        key = topology.command_key("simotel", action)
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(body, message_id=uuid.uuid4().hex, delivery_mode=2), key
                    )
                    for _ in range(start, min(count, start + 500))
                )
            )
        done = asyncio.Event()
        stamps: list[float] = []
        statuses: dict[str, int] = {}

        async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            stamps.append(time.perf_counter())
            status = orjson.loads(message.body)["status"]
            statuses[status] = statuses.get(status, 0) + 1
            if len(stamps) >= count:
                done.set()

        await results.consume(on_result, no_ack=True)
        with (tmp / "worker.log").open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge.cli", "worker", "-c", str(config),
                stdout=log, stderr=log, cwd=ROOT,
            )  # fmt: skip
        try:
            await asyncio.wait_for(done.wait(), 120)
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), statuses
    finally:
        await connection.close()


async def bench(seconds: float, concurrency: int, port: int, amqp_url: str) -> None:
    fast, slow = f"http://127.0.0.1:{port}/fast/api/v4/", f"http://127.0.0.1:{port}/slow/api/v4/"
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        search = {"alike": "true"}
        top = await ceiling(fast, concurrency, seconds)
        n = max(200, int(top * seconds * 0.6))
        rate, st = await through_worker(
            amqp_url, fast, tmp, "pbx/users/search", search, n, concurrency
        )
        rows.append(
            ("instant Simotel, pbx/users/search (retry-safe)", f"{n}", f"{rate:,.0f}/s",
             f"{rate / top:.2f} of plain httpx ({top:,.0f}/s); {st}")
        )  # fmt: skip
        orig = {"caller": "557", "callee": "0915", "context": "out", "caller_id": "557"}
        rate2, st2 = await through_worker(
            amqp_url, fast, tmp, "call/originate/act", orig, n, concurrency
        )
        rows.append(
            ("instant Simotel, call/originate/act (not retry-safe)", f"{n}", f"{rate2:,.0f}/s",
             f"{rate2 / top:.2f} of plain httpx ({top:,.0f}/s); {st2}")
        )  # fmt: skip
        ideal = concurrency / SLOW_DELAY
        top_slow = await ceiling(slow, concurrency, seconds)
        n3 = int(ideal * seconds)
        rate3, st3 = await through_worker(
            amqp_url, slow, tmp, "pbx/users/search", search, n3, concurrency
        )
        rows.append(
            (f"{SLOW_DELAY * 1000:.0f} ms Simotel, pbx/users/search", f"{n3}",
             f"{rate3:,.0f}/s",
             f"{rate3 / (0.9 * ideal):.2f} × target 0.9 × {concurrency} / {SLOW_DELAY} s "
             f"= {0.9 * ideal:.0f}/s; plain httpx: {top_slow:,.0f}/s; {st3}")
        )  # fmt: skip
    cpus = os.cpu_count()
    print(f"\nconcurrency (worker.prefetch and httpx tasks) = {concurrency}, {cpus} CPUs\n")
    print("| scenario | commands | worker throughput | compared with |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--serve-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fd is not None:
        serve(args.serve_fd)
        return
    sock = socket.socket()
    # uvicorn takes an inherited fd for a Unix socket and so never sets TCP_NODELAY on what it
    # accepts; set it here (accepted sockets inherit it), or every answer waits ~40 ms on
    # Nagle and delayed ACKs and the fake Simotel, not the worker, is what gets measured.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve-fd", str(sock.fileno())], pass_fds=[sock.fileno()]
    )
    vhost = f"bench-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    started = time.perf_counter()
    try:
        amqp_url = f"amqp://guest:guest@{AMQP_HOST}/{vhost}"
        asyncio.run(bench(args.seconds, args.concurrency, sock.getsockname()[1], amqp_url))
    finally:
        server.terminate()
        server.wait(10)
        sock.close()
        rabbitmqctl("delete_vhost", vhost)
    print(f"\n(measured in {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
