"""The quick-start demo's third flow: commands in. A service that drives Simotel through the
bridge, plus a summary line of what the bridge did, read from its own `/metrics`.

It sends a user search, an agent pause (and resume) and an originate over RabbitMQ, the way any
microservice would (`bridge.client.send_command`: a command message with `reply_to`, given a
broker URL and the names), and prints one line per command; `simotel-bridge tail` shows the
results as they come back, and the originated call's webhooks then flow like any other call's.
Every `--summary-every` seconds it prints events/s, routed calls, command results, the spool's
depth and the calls the reconciler recovered (counters restart with the bridge).

    .venv/bin/python examples/demo_commands.py -c deploy/demo.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
import urllib.request
from datetime import datetime
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from bridge import logs
from bridge.client import send_command
from bridge.config import LogSettings, Settings, load_settings
from bridge.errors import BridgeError

# (pause before, action, data): a search, an agent pause and resume, then a call placed by API.
SCRIPT: tuple[tuple[float, str, dict[str, Any]], ...] = (
    (3.0, "pbx/users/search", {"alike": True, "conditions": {"number": "101"}}),
    (4.0, "pbx/queues/pauseagent", {"queue": "902", "agent": "101"}),
    (
        4.0,
        "call/originate/act",
        {"caller": "101", "callee": "09120000000", "context": "main_routing", "caller_id": "101"},
    ),
    (8.0, "pbx/queues/resumeagent", {"queue": "902", "agent": "101"}),
)


def _say(tag: str, text: str) -> None:
    colour = sys.stdout.isatty()
    when = datetime.now().strftime("%H:%M:%S")
    head = f"\x1b[35m{tag:<6}\x1b[0m" if colour else f"{tag:<6}"
    print(f"{when} {head} {' ' * 9}{text}", flush=True)


def scrape(url: str) -> dict[str, float]:
    """The bridge's metrics as {name{labels}: value}, summed over labels per name too."""
    with urllib.request.urlopen(url, timeout=2) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
            for key, label in sample.labels.items():
                name = f"{sample.name}{{{key}={label}}}"
                values[name] = values.get(name, 0.0) + sample.value
    return values


def summary_line(now: dict[str, float], before: dict[str, float], seconds: float) -> str:
    def delta(name: str) -> float:
        return now.get(name, 0.0) - before.get(name, 0.0)

    events = delta("simotel_bridge_webhooks_accepted_total")
    routed = now.get("simotel_bridge_component_requests_total{outcome=answered}", 0.0)
    fallbacks = now.get("simotel_bridge_component_requests_total", 0.0) - routed
    ok = now.get("simotel_bridge_commands_total{status=ok}", 0.0)
    done = now.get("simotel_bridge_commands_total", 0.0)
    recovered = now.get("simotel_bridge_reconcile_recovered_total", 0.0)
    return (
        f"events {events / seconds:.1f}/s · routed calls {routed:.0f} "
        f"(fallbacks {fallbacks:.0f}) · commands ok {ok:.0f}, not ok {done - ok:.0f} · "
        f"spool {now.get('simotel_bridge_spool_depth', 0.0):.0f} · "
        f"calls recovered {recovered:.0f}"
    )


async def run_commands(settings: Settings, stop: asyncio.Event) -> None:
    for pause, action, data in SCRIPT:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
        if stop.is_set():
            return
        _say("send", f"{action} {orjson.dumps(data).decode()}")
        try:
            result = await send_command(
                settings.amqp.endpoints()[0],
                action,
                data,
                source=next(iter(settings.sources)),
                exchange=settings.amqp.exchanges.commands,
                timeout=15,
            )
        except (BridgeError, TimeoutError) as exc:
            _say("send", f"{action}: no result ({type(exc).__name__}: {exc})")
        else:
            _say("send", f"{action}: {result.status} (the result is also on simotel.results)")


async def run_summary(url: str, every: float, stop: asyncio.Event) -> None:
    before: dict[str, float] = {}
    last = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            return
        try:
            now = await asyncio.to_thread(scrape, url)
        except OSError as exc:
            _say("stats", f"the bridge is not answering ({type(exc).__name__}): stopped?")
            continue
        moment = time.monotonic()
        if before:
            _say("stats", summary_line(now, before, moment - last))
        before, last = now, moment


async def main(settings: Settings, metrics_url: str, every: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.gather(run_commands(settings, stop), run_summary(metrics_url, every, stop))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Commands and a summary for the demo")
    parser.add_argument("-c", "--config", default="deploy/demo.yaml")
    parser.add_argument("--metrics", default="http://127.0.0.1:8080/metrics")
    parser.add_argument("--summary-every", type=float, default=10.0)
    args = parser.parse_args()
    logs.configure(LogSettings(level="warning"))  # the screen is for the demo's own lines
    asyncio.run(main(load_settings(args.config, environ={}), args.metrics, args.summary_every))
