"""Benchmark of worker scale-out: commands per second with 1, 2 and 4 worker processes against the
simulator answering every request after 50 ms, with the command state in one shared SQLite file
versus one PostgreSQL database; and what the state store's claim costs per command.

    .venv/bin/python bench/bench_scale.py [--commands 600] [--prefetch 16] [--workers 1,2,4]

Needs the local RabbitMQ (a throw-away vhost per run, created with rabbitmqctl and deleted) and
PostgreSQL (a throw-away database, created and dropped; SIMOTEL_BRIDGE_TEST_PG, by default
postgresql://postgres@127.0.0.1:5432). The simulator (`simotel-bridge simulate --latency-ms 50
--no-webhooks`) and each worker (`simotel-bridge worker`) are processes of their own. Every command
is `call/originate/act` with a fresh `message_id`, the path that uses the state store most (read,
durable claim, durable result). The workers are started first; once all say "worker consuming",
the commands are published and throughput is counted from the first result to the last. Each
figure is printed beside the single-process figure of the same backend from the same run. Prints
markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import psycopg
import yaml

from bridge import topology
from bridge.config import load_settings
from bridge.state.postgres import PostgresStateStore
from bridge.state.sqlite import SqliteStateStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import PYTHON, ROOT, free_port, fresh_vhost, process, wait_http

PG_SERVER = os.environ.get("SIMOTEL_BRIDGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
LATENCY_MS = 50
ACTION = "call/originate/act"
ORIGINATE = {"caller": "557", "callee": "0915", "context": "out", "caller_id": "557"}


@contextmanager
def fresh_database() -> Iterator[str]:
    name = f"sbbench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def config_for(
    tmp: Path, name: str, amqp_url: str, api: str, prefetch: int, state: dict[str, Any]
) -> Path:
    path = tmp / name / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(
            {
                "amqp": {"url": amqp_url},
                "http": {"port": 0},
                "log": {"level": "info", "format": "json"},
                "sources": {
                    "simotel": {
                        "webhook": {"allow_unauthenticated": True},
                        "api": {
                            "base_url": api,
                            "username": "u",
                            "password": "p",
                            "api_key": "k",
                            "rate_limit": 0,
                        },
                    }
                },
                "worker": {"prefetch": prefetch, **state},
            }
        )
    )
    return path


async def wait_logged(log: Path, needle: str, timeout: float = 60) -> None:
    def logged() -> bool:
        return log.exists() and needle in log.read_text()

    async with asyncio.timeout(timeout):
        while True:
            if await asyncio.to_thread(logged):
                return
            await asyncio.sleep(0.05)  # another process's log: nothing to await


async def run_workers(
    amqp_url: str,
    api: str,
    tmp: Path,
    workers: int,
    prefetch: int,
    count: int,
    state: dict[str, Any],
) -> tuple[float, dict[str, int]]:
    """Start `workers` processes, publish `count` originates, time their results. Returns
    (commands per second, statuses)."""
    run = tmp / uuid.uuid4().hex[:6]
    configs = [config_for(run, f"w{i}", amqp_url, api, prefetch, state) for i in range(workers)]
    settings = load_settings(configs[0], environ={})
    connection = await aio_pika.connect_robust(amqp_url)
    procs: list[asyncio.subprocess.Process] = []
    try:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel, settings.amqp)
        results = await channel.declare_queue(exclusive=True, auto_delete=True)
        await results.bind(settings.amqp.exchanges.results, "#")
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
        for config in configs:
            with (config.parent / "worker.log").open("ab") as log:
                argv = [PYTHON, "-m", "bridge.cli", "worker", "-c", str(config)]
                procs.append(
                    await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log, cwd=ROOT)
                )
        for config in configs:
            await wait_logged(config.parent / "worker.log", '"event":"worker consuming"')
        exchange = await channel.get_exchange(settings.amqp.exchanges.commands)
        body = orjson.dumps({"action": ACTION, "data": ORIGINATE})
        key = topology.command_key("simotel", ACTION)
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(body, message_id=uuid.uuid4().hex, delivery_mode=2), key
                    )
                    for _ in range(start, min(count, start + 500))
                )
            )
        await asyncio.wait_for(done.wait(), 300)
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), statuses
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 30)
        await connection.close()


async def claim_cost(store: Any, rounds: int, concurrency: int) -> tuple[list[float], float]:
    """Median microseconds of each of get, start (the durable claim) and finish (durable) of one
    command, one command at a time; then full commands per second with `concurrency` at once."""
    result = orjson.dumps({"command_id": "x", "status": "ok", "response": {"data": "ok"}})
    steps: list[list[float]] = [[], [], []]
    for _ in range(rounds):
        mid = uuid.uuid4().hex
        t0 = time.perf_counter()
        await store.get(mid)
        t1 = time.perf_counter()
        assert await store.start(mid, "simotel", ACTION)
        t2 = time.perf_counter()
        await store.finish(mid, "simotel", ACTION, result)
        t3 = time.perf_counter()
        for i, d in enumerate((t1 - t0, t2 - t1, t3 - t2)):
            steps[i].append(d * 1e6)

    async def loop(n: int) -> None:
        for _ in range(n):
            mid = uuid.uuid4().hex
            await store.get(mid)
            assert await store.start(mid, "simotel", ACTION)
            await store.finish(mid, "simotel", ACTION, result)

    t = time.perf_counter()
    await asyncio.gather(*(loop(rounds // concurrency) for _ in range(concurrency)))
    rate = (rounds // concurrency) * concurrency / (time.perf_counter() - t)
    return [statistics.median(s) for s in steps], rate


async def ceiling(api: str, concurrency: int, seconds: float) -> float:
    """Originates per second of a plain httpx loop against the same simulator: what the machine
    and the simulator allow, with no broker and no worker in between."""
    count = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=api, limits=limits, auth=("u", "p")) as client:

        async def loop() -> None:
            nonlocal count
            while time.perf_counter() < stop_at:
                r = await client.post(ACTION, json=ORIGINATE, headers={"X-APIKEY": "k"})
                r.raise_for_status()
                count += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


async def bench(args: argparse.Namespace, api: str, amqp_url: str, pg_url: str) -> None:
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ideal_one = args.prefetch / (LATENCY_MS / 1000)
        backends: dict[str, Any] = {
            "SQLite (one shared file)": {"state_path": str(tmp / "shared.sqlite3")},
            "PostgreSQL": {"state_url": pg_url, "state_pool_size": args.pool},
        }
        for label, state in backends.items():
            base = 0.0
            for n in args.workers:
                count = args.commands
                rate, st = await run_workers(amqp_url, api, tmp, n, args.prefetch, count, state)
                base = base or rate
                rows.append(
                    f"| {label} | {n} | {count} | {rate:,.0f}/s | {rate / base:.2f} × "
                    f"1 process ({base:,.0f}/s) | {ideal_one * n:,.0f}/s | {st} |"
                )
        most = args.prefetch * max(args.workers)
        top = await ceiling(api, most, 4.0)
        micro: list[str] = []
        pg = await PostgresStateStore.open(pg_url, ttl_seconds=3600, owner="bench", pool_size=8)
        sq = SqliteStateStore(tmp / "micro.sqlite3", ttl_seconds=3600, owner="bench")
        try:
            for label, store in (("PostgreSQL", pg), ("SQLite", sq)):
                (get, start, finish), rate = await claim_cost(store, args.rounds, 8)
                micro.append(
                    f"| {label} | {get:,.0f} µs | {start:,.0f} µs | {finish:,.0f} µs | "
                    f"{get + start + finish:,.0f} µs | {rate:,.0f}/s |"
                )
        finally:
            await pg.aclose()
            await sq.aclose()
    print(
        f"\n{os.cpu_count()} CPUs (shared), worker.prefetch = {args.prefetch}, Simotel answers "
        f"after {LATENCY_MS} ms, call/originate/act with a fresh message_id each\n"
    )
    print("| state | worker processes | commands | throughput | vs single process | ideal "
          "(processes × prefetch / 50 ms) | statuses |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nCeiling: a plain httpx loop, {most} requests at a time, against the same simulator: "
          f"{top:,.0f} originates/s\n")  # fmt: skip
    print(f"State store alone: {args.rounds} commands one at a time (medians), then 8 at a time\n")
    print("| store | get | start (durable claim) | finish (durable) | per command | "
          "commands/s (8 concurrent) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    print("\n".join(micro))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commands", type=int, default=600, help="commands per run")
    parser.add_argument("--prefetch", type=int, default=16)
    parser.add_argument("--pool", type=int, default=4, help="worker.state_pool_size")
    parser.add_argument("--rounds", type=int, default=400, help="claim microbenchmark commands")
    parser.add_argument(
        "--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4]
    )
    args = parser.parse_args()
    port = free_port()
    started = time.perf_counter()
    simulator = [
        PYTHON, "-m", "bridge.cli", "simulate", "--port", str(port),
        "--latency-ms", str(LATENCY_MS), "--no-webhooks", "--log-level", "warning",
        "--username", "u", "--password", "p", "--api-key", "k",
    ]  # fmt: skip
    with process(simulator), fresh_vhost() as amqp_url, fresh_database() as pg_url:
        api = f"http://127.0.0.1:{port}/api/v4/"
        wait_http(api)
        asyncio.run(bench(args, api, amqp_url, pg_url))
    print(f"\n(measured in {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
