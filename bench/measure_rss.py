"""Resident memory of each role under light load, for container memory requests and limits.

    .venv/bin/python bench/measure_rss.py [--seconds 40]

For `run`, `ingress` and `worker` in turn, on this machine and the local RabbitMQ (a throwaway
vhost): the role with deploy/demo.yaml, the built-in simulator sending calls (webhooks and
component requests, 60 calls a minute) and serving API v4, the demo responder answering the
components, and one command a second sent to the worker. Prints VmRSS at the end and VmHWM
(the peak) of the role's process, in MiB. The figures are written down in deploy/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import ROOT, free_port, fresh_vhost, process, wait_http
from bridge.config import load_settings
from bridge.send import send_command

BIN = str(Path(sys.executable).parent / "simotel-bridge")


def memory(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


async def commands(amqp_url: str, seconds: float) -> int:
    settings = load_settings(
        data={
            "amqp": {"url": amqp_url},
            "sources": {"simotel": {"webhook": {"username": "u", "password": "p"}}},
        },
        environ={},
    )
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        await send_command(settings, "pbx/users/search", {}, timeout=10)
        sent += 1
        await asyncio.sleep(1.0)  # pacing: one command a second
    return sent


def measure(role: str, seconds: float) -> str:
    with fresh_vhost() as amqp_url, tempfile.TemporaryDirectory() as tmp:
        port, api_port = free_port(), free_port()
        env = {
            "SIMOTEL_BRIDGE__AMQP__URL": amqp_url,
            "SIMOTEL_BRIDGE__HTTP__PORT": str(port),
            "SIMOTEL_BRIDGE__SPOOL__PATH": os.path.join(tmp, "spool.sqlite3"),
            "SIMOTEL_BRIDGE__WORKER__STATE_PATH": os.path.join(tmp, "state.sqlite3"),
            "SIMOTEL_BRIDGE__SOURCES__SIMOTEL__API__BASE_URL": f"http://127.0.0.1:{api_port}/api/v4/",
            "SIMOTEL_BRIDGE__LOG__FORMAT": "json",
        }  # fmt: skip
        simulate = [BIN, "simulate", "--port", str(api_port), "--rate", "60", "--seed", "1",
                    "--event-url", f"http://127.0.0.1:{port}/webhooks/simotel/events"]  # fmt: skip
        if role == "worker":
            simulate.append("--no-webhooks")
        responder = [
            sys.executable,
            str(ROOT / "examples" / "demo_dialplan.py"),
            "--amqp",
            amqp_url,
        ]
        with process([BIN, role, "-c", str(ROOT / "deploy" / "demo.yaml")], env) as bridge:
            wait_http(f"http://127.0.0.1:{port}/readyz")
            with process(responder), process(simulate):
                sent = 0
                if role != "ingress":
                    sent = asyncio.run(commands(amqp_url, seconds))
                else:
                    time.sleep(seconds)  # light load for a while: the measurement itself
                rss, peak = memory(bridge.pid)
        return (
            f"{role:8} rss {rss:6.1f} MiB  peak {peak:6.1f} MiB  ({sent} commands, {seconds:.0f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args()
    for role in ("run", "ingress", "worker"):
        print(measure(role, args.seconds), flush=True)


if __name__ == "__main__":
    main()
