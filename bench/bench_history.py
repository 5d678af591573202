"""History benchmark: disk taken by the `simotel.history` stream per event, and how fast a
window is read back.

Publishes N events (default 100,000) built exactly as the ingress builds them (the Cdr fixture
as body, the bridge's properties and headers) to `simotel.events` in a fresh vhost whose
topology includes the stream, then:
  - sums the sizes of the stream's files (segments and indexes) in the broker's data directory
    (`<data>/mnesia/<node>/stream/<vhost>_simotel.history_*`; needs read access to it), and
    extrapolates to a million events;
  - reads the whole window back with bridge.client.history_window and reports the rate.
Usage: .venv/bin/python bench/bench_history.py [--events 100000] [--data /var/lib/rabbitmq]
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import ROOT, fresh_vhost

from bridge import topology
from bridge.client import history_window
from bridge.config import AmqpSettings, HistorySettings
from bridge.translate import Payload, build_event

CDR = orjson.loads((ROOT / "tests" / "fixtures" / "event-Cdr.json").read_bytes())
IN_FLIGHT = 500


async def publish(url: str, count: int) -> tuple[float, int]:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel, AmqpSettings(), HistorySettings())
        exchange = await channel.get_exchange("simotel.events", ensure=False)
        body_bytes = 0
        start = time.monotonic()
        pending: set[asyncio.Future[object]] = set()
        for i in range(count):
            fields = dict(CDR, unique_id=f"1700000000.{i}")
            event = build_event("simotel.events", "simotel", "Cdr", Payload(fields, "json"))
            body_bytes += len(event.body)
            pending.add(
                asyncio.ensure_future(exchange.publish(event.to_message(), event.routing_key))
            )
            if len(pending) >= IN_FLIGHT:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for d in done:
                    d.result()
        if pending:
            await asyncio.wait(pending)
        return time.monotonic() - start, body_bytes


def stream_bytes(data: Path, vhost: str) -> tuple[int, list[str]]:
    dirs = glob.glob(str(data / "mnesia" / "*" / "stream" / f"{vhost}_*"))
    total, files = 0, []
    for d in dirs:
        for name in os.listdir(d):
            total += os.path.getsize(os.path.join(d, name))
            files.append(name)
    return total, files


async def read_back(url: str, since: datetime) -> tuple[int, float]:
    start = time.monotonic()
    n = 0
    async for _ in history_window(url, since):
        n += 1
    return n, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--data", type=Path, default=Path("/var/lib/rabbitmq"))
    parser.add_argument("--read", type=int, default=1, help="0: skip the read-back")
    args = parser.parse_args()
    with fresh_vhost() as url:
        vhost = url.rsplit("/", 1)[1]
        since = datetime.now(UTC) - timedelta(seconds=5)
        seconds, body = asyncio.run(publish(url, args.events))
        print(
            f"published {args.events:,} Cdr events ({body / args.events:.0f} B body each) "
            f"in {seconds:.1f}s ({args.events / seconds:,.0f}/s, confirmed)"
        )
        size, files = stream_bytes(args.data, vhost)
        if size:
            per = size / args.events
            print(f"stream on disk: {size:,} B in {len(files)} files ({', '.join(sorted(files))})")
            print(f"  {per:.0f} B per event -> {per * 1e6 / 2**20:,.0f} MiB per million events")
        else:
            print(f"stream files not found under {args.data} (no read access?)")
        if not args.read:
            return
        n, read_s = asyncio.run(read_back(url, since))
        print(f"read back {n:,} events with history_window in {read_s:.1f}s ({n / read_s:,.0f}/s)")


if __name__ == "__main__":
    main()
