"""The reconciliation settings: defaults, validation, environment overrides, topology."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge import topology
from bridge.config import load_settings
from bridge.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
API = {"base_url": "http://pbx/api/v4/", "username": "u", "password": "p", "api_key": "k"}


def _source(**reconcile: object) -> dict[str, object]:
    return {"webhook": {"allow_unauthenticated": True}, "api": API, "reconcile": reconcile}


def test_defaults_are_off_and_documented() -> None:
    settings = load_settings(ROOT / "config.example.yaml", environ={})
    r = settings.sources["simotel"].reconcile
    assert (r.enabled, r.interval_s, r.grace_s, r.from_) == (False, 60.0, 120.0, "now")
    assert (
        topology.build(settings.amqp, sources=settings.sources).queues
        == topology.build(settings.amqp).queues
    )


def test_values_are_checked_with_their_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(data={"sources": {"a": _source(enabled=True, interval_s=0)}}, environ={})
    assert any("reconcile.interval_s" in key for key, _ in err.value.problems)
    with pytest.raises(ConfigError) as err:
        load_settings(data={"sources": {"a": _source(**{"from": "../x y"})}}, environ={})
    assert any(key.endswith("reconcile.from") for key, _ in err.value.problems)
    no_api = {"webhook": {"allow_unauthenticated": True}, "reconcile": {"enabled": True}}
    with pytest.raises(ConfigError) as err:
        load_settings(data={"sources": {"a": no_api}}, environ={})
    assert "api settings" in str(err.value)


def test_environment_overrides_and_the_seen_queue() -> None:
    env = {
        "SIMOTEL_BRIDGE__SOURCES__TEHRAN__RECONCILE__ENABLED": "true",
        "SIMOTEL_BRIDGE__SOURCES__TEHRAN__RECONCILE__FROM": "beginning",
    }
    settings = load_settings(data={"sources": {"tehran": _source()}}, environ=env)
    r = settings.sources["tehran"].reconcile
    assert r.enabled and r.from_ == "beginning"
    topo = topology.build(settings.amqp, sources=settings.sources)
    (queue,) = [q for q in topo.queues if q.name == "simotel.reconcile.tehran"]
    assert queue.arguments == {"x-max-length": 1_000_000}
    keys = {(b.exchange, b.routing_key) for b in topo.bindings if b.queue == queue.name}
    assert keys == {("simotel.events", "tehran.Cdr"), ("simotel.events", "tehran.CdrQueue")}


def test_the_reconcile_command_refuses_what_it_cannot_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bridge.cli import main

    config = ROOT / "config.example.yaml"  # reconciliation is off there
    assert main(["reconcile", "--once", "-c", str(config)]) == 2
    assert "reconcile.enabled" in capsys.readouterr().err
    assert main(["reconcile", "--from", "../etc", "-c", str(config)]) == 2
    assert "--from" in capsys.readouterr().err
    assert main(["reconcile", "-c", str(config)]) == 2  # the role: a configuration problem
    assert "reconcile.enabled" in capsys.readouterr().err
