"""The quick start as a user sees it: `scripts/demo --for N` shows all three flows (events, live
routing, commands and their results) within its first minute, and prints nothing that looks like
a failure."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(180)
def test_demo_shows_events_routing_and_commands_in_its_first_minute() -> None:
    if _busy(8080) or _busy(8081):
        pytest.skip("the demo's ports 8080/8081 are taken on this machine")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("SIMOTEL_BRIDGE_CONFIG", None)
    done = subprocess.run(
        ["scripts/demo", "--for", "45"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    kinds: dict[str, int] = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):  # tail prints JSON lines when its output is not a terminal
            record = orjson.loads(line)
            kind = "result" if record["exchange"] == "simotel.results" else "event"
        else:
            kind = line.split()[1]
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds.get("event", 0) >= 10, kinds
    assert kinds.get("route", 0) >= 3, kinds
    assert kinds.get("send", 0) >= 3, kinds
    assert kinds.get("result", 0) >= 3, kinds
    assert kinds.get("stats", 0) >= 1, kinds
    # Every line on stderr is the scripts' own progress: no tracebacks, no tool output.
    for line in done.stderr.splitlines():
        assert line.split(":", 1)[0] in {"setup", "ensure-rabbitmq", "demo"}, line
