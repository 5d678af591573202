"""The test environment: where the shared RabbitMQ is, Simotel's documented payloads, settings
for one test, and rabbitmqctl (for the per-test vhosts of `tests/conftest.py`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bridge.config import Settings, load_settings

# Simotel's documented payloads (events and component requests/answers), one JSON file each.
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

AMQP_HOST = os.environ.get("SIMOTEL_BRIDGE_TEST_AMQP_HOST", "127.0.0.1:5672")


def rabbitmqctl_path() -> str:
    return shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"


def rabbitmqctl(*args: str) -> None:
    subprocess.run([rabbitmqctl_path(), *args], check=True, capture_output=True, timeout=60)


def make_settings(amqp_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for tests: one source `simotel` (webhook simotel/secret) unless overridden."""
    data: dict[str, Any] = {
        "amqp": {"url": amqp_url, "publish_timeout": 5.0},
        "http": {"host": "127.0.0.1", "port": 0},
        "log": {"level": "warning", "format": "json"},
        "sources": {
            "simotel": {"webhook": {"username": "simotel", "password": "secret"}},
        },
        "spool": {"path": str(tmp_path / "spool.sqlite3")},
        "worker": {"state_path": str(tmp_path / "worker.sqlite3")},
    }
    for key, value in overrides.items():
        data[key] = value
    return load_settings(data=data, environ={})
