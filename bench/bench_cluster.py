"""Scale-out benchmark of the ingress: N `simotel-bridge ingress` processes behind one port
(`http.reuse_port: true`, each on its own spool), against the single process in the same run.

Each run sends the Cdr webhook with Basic auth from wrk (Debian package `wrk`) at a fixed number
of connections; every request is answered only after the broker confirmed its publish. Runs go
in the order given, the single process first and again last, so drift on a shared machine shows;
`--rounds R` repeats the sequence R times and adds the median of each process count.

Usage: .venv/bin/python bench/bench_cluster.py [--processes 1,2] [--rounds 1] [--seconds 10]
       [--connections 64]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import PYTHON, WrkResult, free_port, fresh_vhost, process, wait_http, wrk
from bench_ingress import CDR, prepare, purge


@contextlib.contextmanager
def ingresses(url: str, tmp: Path, count: int) -> Iterator[int]:
    """`count` ingress processes on one port (reuse_port when more than one)."""
    port = free_port()
    with contextlib.ExitStack() as stack:
        for i in range(count):
            env = {
                "SIMOTEL_BRIDGE__AMQP__URL": url,
                "SIMOTEL_BRIDGE__HTTP__PORT": str(port),
                "SIMOTEL_BRIDGE__HTTP__REUSE_PORT": "true" if count > 1 else "false",
                "SIMOTEL_BRIDGE__SPOOL__PATH": str(tmp / f"spool-{count}-{i}.sqlite3"),
                "SIMOTEL_BRIDGE__SOURCES__SIMOTEL__WEBHOOK__USERNAME": "simotel",
                "SIMOTEL_BRIDGE__SOURCES__SIMOTEL__WEBHOOK__PASSWORD": "bench-secret",
                "SIMOTEL_BRIDGE__LOG__FORMAT": "json",
                "SIMOTEL_BRIDGE__LOG__LEVEL": "warning",
            }
            stack.enter_context(process([PYTHON, "-m", "bridge.cli", "ingress"], env=env))
            # Each process is up before the next starts (the first answers /healthz for all).
            wait_http(f"http://127.0.0.1:{port}/healthz")
        yield port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    counts = [int(x) for x in args.processes.split(",")]
    if counts[0] != 1:
        counts.insert(0, 1)
    counts = counts * args.rounds + [1]  # the baseline again, last
    auth = "Basic " + base64.b64encode(b"simotel:bench-secret").decode()
    headers = {"Content-Type": "application/json", "Authorization": auth}
    results: list[tuple[int, WrkResult]] = []
    with fresh_vhost() as url, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(prepare(url))
        for count in counts:
            with ingresses(url, Path(tmp), count) as port:
                r = wrk(
                    f"http://127.0.0.1:{port}/webhooks/simotel/events",
                    connections=args.connections, seconds=args.seconds,
                    body=CDR, headers=headers,
                )  # fmt: skip
            results.append((count, r))
            asyncio.run(purge(url))
    base = results[0][1].requests_per_s
    print(
        f"## Ingress processes behind one port, {args.connections} connections, "
        f"{args.seconds}s each\n"
    )
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; broker on the same machine\n"
    )
    print("| processes | req/s | vs 1 process (first run) | p50 ms | p99 ms | errors | non-2xx |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for count, r in results:
        print(
            f"| {count} | {r.requests_per_s:,.0f} | {r.requests_per_s / base:.2f} | "
            f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | {r.non_2xx} |"
        )
    medians = {
        c: statistics.median(r.requests_per_s for n, r in results if n == c)
        for c in dict.fromkeys(n for n, _ in results)
    }
    print()
    for c, m in medians.items():
        print(f"median req/s with {c} process(es): {m:,.0f} ({m / medians[1]:.2f} x 1 process)")


if __name__ == "__main__":
    main()
