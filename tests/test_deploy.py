"""deploy/ checked offline (no container engine here): the broker definitions export against a
real broker, the Dockerfile (hadolint), the Compose file (the Compose specification's schema),
the Kubernetes manifests (kubernetes-validate), the dashboard's and alert rules' metric names
against a running bridge's /metrics, and the image's command line under a throwaway user."""

from __future__ import annotations

import json
import shutil
import subprocess
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
