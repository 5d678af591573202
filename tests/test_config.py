"""Configuration: YAML, environment overrides, validation with keys, secrets kept out of sight."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridge.config import load_settings
from bridge.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_is_valid_and_documents_the_contract_essentials() -> None:
    settings = load_settings(ROOT / "config.example.yaml", environ={})
    assert settings.amqp.url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 8080)
    src = settings.sources["simotel"]
    assert src.webhook.username == "simotel"
    assert src.api is not None and src.api.base_url == "http://simotel.example/api/v4/"


def test_environment_overrides_every_level() -> None:
    env = {
        "SIMOTEL_BRIDGE__AMQP__URL": "amqp://u:p@broker:5672/vh",
        "SIMOTEL_BRIDGE__HTTP__PORT": "9090",
        "SIMOTEL_BRIDGE__SOURCES__SIMOTEL__API__API_KEY": "from-env",
        "SIMOTEL_BRIDGE__SOURCES__TEHRAN_2__WEBHOOK__ALLOW_UNAUTHENTICATED": "true",
        "OTHER__HTTP__PORT": "1",
    }
    settings = load_settings(ROOT / "config.example.yaml", environ=env)
    assert settings.amqp.url.get_secret_value() == "amqp://u:p@broker:5672/vh"
    assert settings.http.port == 9090
    api = settings.sources["simotel"].api
    assert api is not None and api.api_key is not None
    assert api.api_key.get_secret_value() == "from-env"
    assert settings.sources["tehran_2"].webhook.allow_unauthenticated is True


def test_environment_matches_a_dashed_source_name() -> None:
    data = {"sources": {"tehran-1": {"webhook": {"username": "a", "password": "b"}}}}
    env = {"SIMOTEL_BRIDGE__SOURCES__TEHRAN_1__WEBHOOK__PASSWORD": "c"}
    settings = load_settings(data=data, environ=env)
    password = settings.sources["tehran-1"].webhook.password
    assert password is not None and password.get_secret_value() == "c"


def test_every_problem_is_reported_with_its_key() -> None:
    data = {
        "amqp": {"publish_timeout": 0},
        "http": {"port": "eighty", "trusted_proxies": ["not-a-cidr"]},
        "sources": {
            "Bad Name": {"webhook": {"allow_unauthenticated": True}},
            "ok": {
                "webhook": {"username": "u"},
                "api": {"base_url": "ftp://x", "auth": "basic"},
                "components": {"deadline_ms": 800, "fallbacks": {"Nope": {}}},
            },
        },
        "unknown_key": 1,
    }
    with pytest.raises(ConfigError) as info:
        load_settings(data=data, environ={})
    keys = {key for key, _ in info.value.problems}
    assert {
        "amqp.publish_timeout",
        "http.port",
        "http.trusted_proxies",
        "sources.ok.webhook",
        "sources.ok.api.base_url",
        "sources.ok.components.fallbacks",
        "unknown_key",
    } <= keys
    messages = dict(info.value.problems)
    assert "username and password go together" in messages["sources.ok.webhook"]


def test_bad_source_name_and_missing_credentials() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(data={"sources": {"Bad Name": {}}}, environ={})
    assert any("source name" in msg for _, msg in info.value.problems)
    with pytest.raises(ConfigError) as info:
        load_settings(data={"sources": {"s": {"webhook": {}}}}, environ={})
    assert info.value.problems[0][0] == "sources.s.webhook"
    assert "allow_unauthenticated" in info.value.problems[0][1]


def test_api_auth_mode_needs_its_secrets() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(
            data={"sources": {"s": {"api": {"auth": "both", "username": "u", "password": "p"}}}},
            environ={},
        )
    assert info.value.problems == [("sources.s.api", "auth 'both' needs api_key")]


def test_secrets_never_appear_in_reprs() -> None:
    settings = load_settings(ROOT / "config.example.yaml", environ={})
    text = repr(settings) + str(settings.model_dump())
    assert "change-me" not in text
    assert "guest:guest" not in text


def test_unreadable_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "missing.yaml", environ={})
    assert info.value.problems[0][0] == "(file)"
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_settings(bad, environ={})
    assert "not valid YAML" in info.value.problems[0][1]


def test_check_config_command(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "check-config", "-c", "config.example.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("http: {port: -1}\nsources: {simotel: {webhook: {username: a}}}\n")
    res = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "check-config", "-c", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "http.port:" in res.stderr
    assert "sources.simotel.webhook:" in res.stderr


def test_environment_values_stay_strings_unless_a_list_or_mapping() -> None:
    env = {
        "SIMOTEL_BRIDGE__SOURCES__S__WEBHOOK__USERNAME": "007",
        "SIMOTEL_BRIDGE__SOURCES__S__WEBHOOK__PASSWORD": "123456",
        "SIMOTEL_BRIDGE__SOURCES__S__WEBHOOK__ALLOWED_IPS": "[10.0.0.0/8, 192.168.1.0/24]",
        "SIMOTEL_BRIDGE__HTTP__PORT": "9090",
        "SIMOTEL_BRIDGE__SPOOL__ENABLED": "false",
    }
    settings = load_settings(data={"sources": {"s": {}}}, environ=env)
    hook = settings.sources["s"].webhook
    assert hook.username == "007"
    assert hook.password is not None and hook.password.get_secret_value() == "123456"
    assert hook.allowed_ips == ("10.0.0.0/8", "192.168.1.0/24")
    assert settings.http.port == 9090
    assert settings.spool.enabled is False


def test_a_broken_yaml_value_in_the_environment_is_reported_without_the_value() -> None:
    env = {"SIMOTEL_BRIDGE__SOURCES__S__WEBHOOK__PASSWORD": "[S3cr3t-pa55"}
    with pytest.raises(ConfigError) as info:
        load_settings(data={"sources": {"s": {"webhook": {"username": "u"}}}}, environ=env)
    assert info.value.problems[0][0] == "sources.s.webhook.password"
    assert "S3cr3t" not in str(info.value)
