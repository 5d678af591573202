"""A late consumer catching up from the event history: reads the CDRs of a time window from the
`simotel.history` stream with `bridge.client.history_window` (which needs only aio-pika and
orjson) and prints a summary per disposition, de-duplicating on `message_id` as any consumer of
the bridge should (a replayed or re-published event keeps its id).

    .venv/bin/python examples/cdr_backfill.py --amqp amqp://guest:guest@127.0.0.1/ --since 1d
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections import Counter

import orjson

from bridge.client import history_window, parse_when


async def main(url: str, since: str, until: str | None, pattern: str) -> None:
    seen: set[str] = set()
    calls: Counter[str] = Counter()
    billsec: Counter[str] = Counter()
    async for message in history_window(
        url, parse_when(since), parse_when(until) if until else None, pattern
    ):
        if message.message_id in seen:
            continue
        seen.add(message.message_id or "")
        cdr = orjson.loads(message.body)
        disposition = str(cdr.get("disposition", "?"))
        calls[disposition] += 1
        with contextlib.suppress(TypeError, ValueError):  # Simotel sends numbers or strings
            billsec[disposition] += int(cdr.get("billsec") or 0)
    for disposition, n in calls.most_common():
        print(f"{disposition:<12} {n:>7} calls {billsec[disposition]:>9} s billed")
    print(f"{len(seen)} CDRs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1/")
    parser.add_argument("--since", default="1d", help="10m, 2h, 1d or ISO 8601")
    parser.add_argument("--until", help="default: now")
    parser.add_argument("--pattern", default="*.Cdr")
    args = parser.parse_args()
    asyncio.run(main(args.amqp, args.since, args.until, args.pattern))
