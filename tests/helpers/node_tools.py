"""The Node.js tools some tests use (the official AsyncAPI parser, the Compose specification's
schema), installed on first use by scripts/ensure-node-tools into .cache/node-tools, pinned by
tests/node-tools/package-lock.json. A test that needs them skips, with the reason, only when
Node.js is not installed; any other failure to install them fails the test."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE_MISSING = 3  # scripts/ensure-node-tools' exit status when node is not installed


@cache
def _install() -> tuple[Path | None, str]:
    done = subprocess.run(
        [str(ROOT / "scripts" / "ensure-node-tools")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode == NODE_MISSING:
        return None, done.stderr.strip()
    assert done.returncode == 0, f"scripts/ensure-node-tools failed:\n{done.stderr}"
    return Path(done.stdout.strip()), ""


def node_modules() -> Path:
    """The node_modules directory with the tools; skips the test when node is absent."""
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed: the npm-packaged checks cannot run")
    path, reason = _install()
    if path is None:
        pytest.skip(reason)
    return path
