"""Conventions the rest of the suite relies on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BROKER_FIXTURES

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_that_uses_the_broker_is_marked(request: pytest.FixtureRequest) -> None:
    unmarked = [
        item.nodeid
        for item in request.session.items
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("broker") is None
    ]
    assert unmarked == []


def test_python_dash_m_bridge_is_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    from bridge import __version__

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"simotel-bridge {__version__}"
    assert __version__ != "0+unknown"
