"""Soak benchmark for issue 5 (nothing accepted is ever lost). Not part of the test suite.

Runs the bridge as users run it (`python -m bridge.cli run -c FILE`: ingress, component RPC and
command worker in one child process) against a private RabbitMQ node of its own
(tests/helpers/broker_node.py; the system broker is never touched) and the built-in Simotel
simulator's API v4 (served by this script), then for N minutes sends event webhooks over HTTP
and commands over AMQP at moderate steady rates, restarts the broker once in the middle, and
reports:

  webhooks
    lost          webhooks answered 200 that are not on the queue afterwards (must be 0)
    duplicates    extra copies (same message_id, same body) from replays
    order         calls whose events did not arrive in the order they were sent
    latency       p50 / p99 / max of the webhook answers, overall and during the outage
  commands (a mix of originates, which are not retry-safe, and retry-safe reads and agent
  pauses, each with a message_id; a publish that is not confirmed is re-published with the
  same message_id, as a careful client does)
    sent          commands the broker confirmed
    results       distinct command ids with a result on simotel.results
    lost          confirmed commands without a result (must be 0)
    duplicates    extra copies of a result (same message_id)
    run twice     originates the simulator executed more than once (must be 0)
    latency       p50 / p99 / max from the first publish attempt to the first result
  memory          resident set size of the bridge process at start and at the end

Usage: .venv/bin/python bench/soak.py [--minutes 10] [--rate 50] [--calls 20] [--kill]
                                      [--command-rate 5] [--command-latency-ms 50]
Exit status 1 if anything answered 200 or any confirmed command was lost, events were
reordered, or an originate ran twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import orjson
import yaml
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge import logs  # noqa: E402
from bridge.commands import parse_result  # noqa: E402
from bridge.config import LogSettings  # noqa: E402
from bridge.simulator import Faults, SimState, SimulatorOptions, simulator  # noqa: E402
from bridge.topology import command_key  # noqa: E402
from tests.helpers.broker_node import PrivateBroker, free_port  # noqa: E402
from tests.helpers.sink import check_delivery, declare_audit, percentile  # noqa: E402

AUTH = ("simotel", "soak-secret")
REPLAYED = "simotel_bridge_spool_replayed_total"
RESULTS_QUEUE = "soak.results"  # durable: results published while the soak is cut off wait
ORIGINATE = "call/originate/act"
# Ten commands in a row: four originates (not retry-safe), three reads, three agent pauses.
COMMAND_MIX = "OSPOSOPSOP"
PUBLISH_TIMEOUT = 5.0  # seconds one command publish may take before it is published again
PUBLISH_GIVE_UP = 120.0  # seconds after which a command that was never confirmed is dropped


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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


# -- the commands ---------------------------------------------------------------------------


def callee(n: int) -> str:
    """Every originate dials a number of its own, so the simulator's Cdrs tell them apart."""
    return f"09{n:09d}"


def command(n: int) -> tuple[str, str, dict[str, Any]]:
    """The n-th command of the mix: (message_id, action, data)."""
    kind = COMMAND_MIX[n % len(COMMAND_MIX)]
    if kind == "O":
        data = {"caller": "101", "callee": callee(n), "context": "main", "caller_id": "101"}
        return f"soak-{n}", ORIGINATE, data
    if kind == "S":
        return f"soak-{n}", "pbx/users/search", {"alike": "true"}
    return f"soak-{n}", "pbx/queues/pauseagent", {"queue": "902", "agent": "102"}


def originates_run(state: SimState) -> dict[str, int]:
    """callee -> how many times the simulator executed an originate to it (one Cdr each)."""
    runs: dict[str, int] = {}
    for cdr in state.table("cdr"):
        if cdr.get("originated_call_id"):
            runs[str(cdr["dst"])] = runs.get(str(cdr["dst"]), 0) + 1
    return runs


class Commands:
    """Publishes commands at a steady rate to simotel.commands and collects their results from
    a durable queue bound to simotel.results, over one robust connection (it reconnects after
    the broker restart, and its consumer is restored)."""

    def __init__(self, conn: AbstractRobustConnection, rate: float) -> None:
        self.conn = conn
        self.interval = 1.0 / rate
        self.first_try: dict[str, float] = {}  # message_id -> first publish attempt (loop time)
        self.actions: dict[str, str] = {}
        self.confirmed: set[str] = set()
        self.dropped: set[str] = set()  # never confirmed within PUBLISH_GIVE_UP
        self.republished = 0
        self.why: Counter[str] = Counter()  # why publishes were not confirmed
        self.results: dict[str, list[tuple[float, bytes]]] = {}  # message_id -> (arrival, body)
        self.redelivered = 0  # copies the broker delivered to us again (not the bridge's)
        self.stop = asyncio.Event()
        self._publishing: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        self.channel = await self.conn.channel(publisher_confirms=True)
        await self.channel.set_qos(prefetch_count=100)
        self.exchange = await self.channel.get_exchange("simotel.commands", ensure=False)
        # declare_queue (not get_queue): a queue the robust channel knows is consumed again
        # after a reconnect.
        queue = await self.channel.declare_queue(RESULTS_QUEUE, durable=True, passive=True)
        await queue.consume(self._on_result)

    async def _on_result(self, message: AbstractIncomingMessage) -> None:
        arrival = asyncio.get_running_loop().time()
        if message.redelivered:
            self.redelivered += 1
        async with self._changed:
            self.results.setdefault(message.message_id or "?", []).append((arrival, message.body))
            self._changed.notify_all()
        # A result whose ack is lost with the connection comes again (counted as redelivered).
        with contextlib.suppress(*aio_pika.exceptions.CONNECTION_EXCEPTIONS):
            await message.ack()

    async def _publish(self, n: int) -> None:
        mid, action, data = command(n)
        loop = asyncio.get_running_loop()
        self.first_try[mid] = started = loop.time()
        self.actions[mid] = action
        message = aio_pika.Message(
            orjson.dumps({"action": action, "data": data}),
            content_type="application/json",
            message_id=mid,
            correlation_id=mid,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        task = asyncio.current_task()
        assert task is not None
        while True:
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    await self.exchange.publish(
                        message, command_key("simotel", action), mandatory=True
                    )
                self.confirmed.add(mid)
                return
            except asyncio.CancelledError:
                if task.cancelling():
                    raise
                # aiormq cancels the confirms pending when the connection drops
                self.why["confirm cancelled"] += 1
            except TimeoutError:
                self.why["timeout"] += 1
            except Exception as exc:  # not confirmed: publish the same message_id again
                self.why[type(exc).__name__] += 1
            if loop.time() - started > PUBLISH_GIVE_UP:
                self.dropped.add(mid)
                return
            self.republished += 1
            await asyncio.sleep(1.0)  # back-off before re-publishing, not a wait

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        n = 0
        while not self.stop.is_set():
            task = asyncio.create_task(self._publish(n))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)
            n += 1
            due += self.interval
            await asyncio.sleep(max(0.0, due - loop.time()))  # pacing, not waiting
        if self._publishing:
            await asyncio.wait(set(self._publishing))  # each bounded by PUBLISH_GIVE_UP

    async def wait_results(self, timeout: float) -> None:
        """Until every confirmed command has a result, or `timeout` passes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self.confirmed <= self.results.keys())

    def latencies(self) -> list[tuple[float, float]]:
        """(first publish attempt, seconds to the first result) of every answered command."""
        return [
            (self.first_try[mid], min(a for a, _ in copies) - self.first_try[mid])
            for mid, copies in self.results.items()
            if mid in self.first_try
        ]


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


async def declare_results(url: str) -> None:
    """A durable queue taking every command result (it survives broker restarts)."""
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        queue = await ch.declare_queue(RESULTS_QUEUE, durable=True)
        await queue.bind("simotel.results", routing_key="#")
    finally:
        await conn.close()


async def soak(args: argparse.Namespace, node: PrivateBroker, workdir: Path) -> int:
    options = SimulatorOptions(
        port=0,
        event_url=None,  # the webhooks are the soak's own; the simulator only serves API v4
        seed=5,
        faults=Faults(latency_ms=args.command_latency_ms),
        originate_delay=0.0,
        originate_answer_rate=1.0,  # every originate executed leaves exactly one Cdr
        time_scale=0.0,
    )
    async with simulator(options) as sim:
        return await soak_with(args, node, workdir, options, sim.api_url, sim.state)


async def soak_with(
    args: argparse.Namespace,
    node: PrivateBroker,
    workdir: Path,
    options: SimulatorOptions,
    api_url: str,
    state: SimState,
) -> int:
    await declare_audit(node.url)
    await declare_results(node.url)
    peaks = {"rss": 0.0, "depth": 0.0}
    port = free_port()
    config = workdir / "config.yaml"
    api = {
        "base_url": api_url,
        "username": options.username,
        "password": options.password,
        "api_key": options.api_key,
        "rate_limit": 0,
    }
    config.write_text(
        yaml.safe_dump(
            {
                "amqp": {"url": node.url, "publish_timeout": 1.0, "heartbeat": 5},
                "http": {"host": "127.0.0.1", "port": port},
                "log": {"level": "warning", "format": "json"},
                "sources": {
                    "simotel": {"webhook": {"username": AUTH[0], "password": AUTH[1]}, "api": api}
                },
                "spool": {"path": str(workdir / "spool.sqlite3")},
                "worker": {"state_path": str(workdir / "worker-state.sqlite3")},
            }
        )
    )
    with (workdir / "bridge.log").open("wb") as log:
        bridge = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.cli", "run", "-c", str(config),
            cwd=ROOT, stderr=log, stdout=log,
        )  # fmt: skip
    conn = await aio_pika.connect_robust(node.url)
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
            commands = Commands(conn, args.command_rate)
            await commands.start()
            runner = asyncio.create_task(load.run())
            commander = asyncio.create_task(commands.run())
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
            commands.stop.set()
            await runner
            await commander
            await commands.wait_results(args.settle)
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
        await conn.close()
        if bridge.returncode is None:
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
    print(f"soak: {args.minutes} min at {args.rate}/s over {args.calls} concurrent calls "
          f"and {args.command_rate} commands/s, broker {'SIGKILLed' if args.kill else 'stopped'} "
          f"at half time for {down_for:.1f}s (node start {restart_s:.1f}s)")  # fmt: skip
    print("webhooks")
    print(f"  answered 200: {answered}  other answers: "
          f"{ {k: v for k, v in load.statuses.items() if k != '200'} }")  # fmt: skip
    print(f"  on the queue: {len(messages)}  lost: {len(delivery.missing)}  "
          f"duplicates: {delivery.duplicates}  calls out of order: {len(delivery.out_of_order)}  "
          f"replayed from spool: {replayed}")  # fmt: skip
    print(f"  latency all: {summary(load.samples)}")
    print(f"  latency during outage (+5s): {summary(during)}")
    print(f"  readyz during outage: {ready}")
    commands_ok = report_commands(commands, state, outage_start, outage_end, bridge.returncode)
    print(f"bridge RSS: start {rss_start:.1f} MB, end {rss_end:.1f} MB, "
          f"peak {peaks['rss']:.1f} MB; spool depth peak {peaks['depth']:.0f}")  # fmt: skip
    return 0 if delivery.ok and not delivery.missing and commands_ok else 1


def report_commands(
    commands: Commands,
    state: SimState,
    outage_start: float,
    outage_end: float,
    exit_code: int | None,
) -> bool:
    """Print the command part of the report; False if a command was lost or ran twice."""
    sent = commands.confirmed
    lost = sent - commands.results.keys()
    copies = sum(len(v) for v in commands.results.values())
    statuses: dict[str, int] = {}
    answers: dict[str, str] = {}
    for mid, got in commands.results.items():
        result = parse_result(got[0][1], "application/json", {})
        answers[mid] = result.status
        statuses[result.status] = statuses.get(result.status, 0) + 1
    runs = originates_run(state)
    originates = [mid for mid in sent if commands.actions[mid] == ORIGINATE]
    n_of = {mid: int(mid.split("-")[1]) for mid in originates}
    twice = [mid for mid in originates if runs.get(callee(n_of[mid]), 0) > 1]
    ok_not_run = [
        mid for mid in originates if answers.get(mid) == "ok" and not runs.get(callee(n_of[mid]))
    ]
    samples = commands.latencies()
    during = [s for s in samples if outage_start <= s[0] <= outage_end + 5]
    print("commands")
    print(f"  sent (confirmed): {len(sent)}  re-published: {commands.republished}  "
          f"never confirmed: {len(commands.dropped)}  "
          f"not confirmed because: {dict(commands.why)}")  # fmt: skip
    print(f"  results: {len(commands.results.keys() & sent)}  lost: {len(lost)}  "
          f"duplicate results: {copies - len(commands.results)} "
          f"(of which redelivered to the soak's consumer: {commands.redelivered})  "
          f"statuses: {statuses}")  # fmt: skip
    executed = sum(1 for mid in originates if runs.get(callee(n_of[mid])))
    print(f"  originates sent: {len(originates)}  executed: {executed}  "
          f"executed more than once: {len(twice)}  "
          f"ok but not executed: {len(ok_not_run)}")  # fmt: skip
    print(f"  round trip all: {summary(samples)}")
    print(f"  round trip sent during outage (+5s): {summary(during)}")
    if lost:
        print(f"  LOST: {sorted(lost, key=lambda m: int(m.split('-')[1]))[:20]}")
    if twice:
        print(f"  RUN TWICE: {twice[:20]}")
    if exit_code not in (0, None):
        print(f"  the bridge exited with {exit_code}")
    return not lost and not twice


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="duration (default 10)")
    p.add_argument("--rate", type=float, default=50.0, help="webhooks per second (default 50)")
    p.add_argument("--calls", type=int, default=20, help="calls sending side by side")
    p.add_argument("--kill", action="store_true", help="SIGKILL the broker instead of stopping it")
    p.add_argument(
        "--command-rate", type=float, default=5.0, help="commands per second (default 5)"
    )
    p.add_argument(
        "--command-latency-ms",
        type=int,
        default=50,
        help="the simulated Simotel's answer time (default 50)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=120.0,
        help="seconds to wait at the end for the last results (default 120)",
    )
    args = p.parse_args()
    logs.configure(LogSettings(level="error", format="console"))  # the simulator's lines
    for noisy in ("aiormq", "aio_pika"):  # the soak's own reconnects are expected
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
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
