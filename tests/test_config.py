"""Configuration: YAML, environment overrides, validation with keys, secrets kept out of sight."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from bridge.config import load_settings
from bridge.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
OPEN = {"webhook": {"allow_unauthenticated": True}}


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
        load_settings(data={"sources": {"Bad Name": OPEN}}, environ={})
    assert any("source name" in msg for _, msg in info.value.problems)
    with pytest.raises(ConfigError) as info:
        load_settings(data={"sources": {"s": {"webhook": {}}}}, environ={})
    assert info.value.problems[0][0] == "sources.s.webhook"
    assert "allow_unauthenticated" in info.value.problems[0][1]


def test_api_auth_mode_needs_its_secrets() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(
            data={
                "sources": {
                    "s": {**OPEN, "api": {"auth": "both", "username": "u", "password": "p"}}
                }
            },
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
    # A source with only `api:` is not an open source: refused, with the key named.
    api_only = tmp_path / "api-only.yaml"
    api_only.write_text(
        "sources: {simotel: {api: {base_url: 'http://pbx/api/v4/', auth: apikey, api_key: k}}}\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "check-config", "-c", str(api_only)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
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


def test_a_broken_yaml_list_in_the_environment_is_reported_without_the_value() -> None:
    env = {"SIMOTEL_BRIDGE__AMQP__URLS": "[amqp://u:S3cr3t-pa55@h/"}
    env_ok = {"SIMOTEL_BRIDGE__SOURCES__S__WEBHOOK__ALLOWED_IPS": "[10.0.0.0/8"}
    data = {"sources": {"s": {"webhook": {"username": "u", "password": "p"}}}}
    with pytest.raises(ConfigError) as info:
        load_settings(data=data, environ=env_ok)
    assert info.value.problems[0][0] == "sources.s.webhook.allowed_ips"
    assert "10.0.0.0" not in str(info.value)
    # A key that holds no list (or an unknown key) takes the value literally: no YAML error.
    with pytest.raises(ConfigError) as info:
        load_settings(data=data, environ=env)
    assert "S3cr3t" not in str(info.value)


@pytest.mark.parametrize("value", ["123456", "yes", "'quoted'", '"dq"', "[S3cr3t", "{x: 1}", "~"])
def test_a_secret_from_the_environment_is_taken_literally(value: str) -> None:
    env = {
        "SIMOTEL_BRIDGE__SOURCES__S__WEBHOOK__USERNAME": "u",
        "SIMOTEL_BRIDGE__SOURCES__S__WEBHOOK__PASSWORD": value,
        "SIMOTEL_BRIDGE__AMQP__URL": f"amqp://u:{value}@h/",
    }
    settings = load_settings(data={"sources": {}}, environ=env)
    password = settings.sources["s"].webhook.password
    assert password is not None and password.get_secret_value() == value
    assert settings.amqp.url.get_secret_value() == f"amqp://u:{value}@h/"


# --- secure by default -------------------------------------------------------------------------


def test_a_source_without_a_webhook_block_is_refused_with_its_key() -> None:
    api = {"base_url": "http://pbx/api/v4/", "username": "u", "password": "p", "api_key": "k"}
    with pytest.raises(ConfigError) as info:
        load_settings(data={"sources": {"s": {"api": api}}}, environ={})
    problems = dict(info.value.problems)
    assert list(problems) == ["sources.s.webhook"]
    assert "allow_unauthenticated: true" in problems["sources.s.webhook"]
    open_source = {"webhook": {"allow_unauthenticated": True}, "api": api}
    settings = load_settings(data={"sources": {"s": open_source}}, environ={})
    assert settings.sources["s"].webhook.allow_unauthenticated is True


def test_an_environment_variable_with_a_typo_in_the_source_name_fails_loudly() -> None:
    env = {"SIMOTEL_BRIDGE__SOURCES__SIMOTLE__API__API_KEY": "k"}
    with pytest.raises(ConfigError) as info:
        load_settings(ROOT / "config.example.yaml", environ=env)
    keys = [key for key, _ in info.value.problems]
    assert "sources.simotle.webhook" in keys
    assert "k" not in dict(info.value.problems)["sources.simotle.webhook"].split()


# --- secrets ---------------------------------------------------------------------------------

SECRET_KEYS = {
    "amqp.url": ("SIMOTEL_BRIDGE__AMQP__URL", "amqp://u:{}@h/"),
    "sources.simotel.webhook.password": (
        "SIMOTEL_BRIDGE__SOURCES__SIMOTEL__WEBHOOK__PASSWORD",
        "{}",
    ),
    "sources.simotel.webhook.username": (
        "SIMOTEL_BRIDGE__SOURCES__SIMOTEL__WEBHOOK__USERNAME",
        "{}",
    ),
    "sources.simotel.api.password": ("SIMOTEL_BRIDGE__SOURCES__SIMOTEL__API__PASSWORD", "{}"),
    "sources.simotel.api.api_key": ("SIMOTEL_BRIDGE__SOURCES__SIMOTEL__API__API_KEY", "{}"),
    "sources.simotel.api.username": ("SIMOTEL_BRIDGE__SOURCES__SIMOTEL__API__USERNAME", "{}"),
}


@pytest.mark.parametrize("key", sorted(SECRET_KEYS))
@pytest.mark.parametrize(
    "secret",
    [
        "Zq9-secret\n",
        "Zq9-secret\r\n",
        "Zq9\x00x",
        "Zq9\tx",
        "Zq9\x1bx",
        "Zq9\x7fx",
        "Zq9\x85x",
        "Zq9\x9f",
    ],
)
def test_a_control_character_in_a_secret_is_refused_naming_the_key_only(
    key: str, secret: str
) -> None:
    name, template = SECRET_KEYS[key]
    with pytest.raises(ConfigError) as info:
        load_settings(ROOT / "config.example.yaml", environ={name: template.format(secret)})
    assert [k for k, _ in info.value.problems] == [key]
    assert "control character" in info.value.problems[0][1]
    assert "Zq9" not in str(info.value)


def test_a_yaml_error_names_line_and_column_but_never_the_text(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "sources:\n  simotel:\n    webhook:\n      username: u\n      password: Zq9-S3cr3t: oops\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(bad, environ={})
    text = str(info.value)
    assert "line 5, column" in text
    assert "Zq9" not in text and "S3cr3t" not in text and "oops" not in text
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"sources: {s: {webhook: {username: u, password: Zq9\x00S3cr3t}}}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(nul, environ={})
    assert "Zq9" not in str(info.value) and "character 51" in str(info.value)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"sources: {s: {webhook: {username: u, password: Zq9\xe9S3cr3t}}}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(latin, environ={})
    assert "Zq9" not in str(info.value) and "not UTF-8" in str(info.value)
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text("amqp:\n  url: 'amqp://u:Zq9-S3cr3t@h/\nsources: {}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(quoted, environ={})
    assert "Zq9" not in str(info.value) and "line " in str(info.value)


def _readme_environment() -> list[tuple[str, str]]:
    """The `SIMOTEL_BRIDGE__` lines of deploy/README.md's environment-file example, each read
    as systemd's EnvironmentFile= and the shell read it (quotes removed, one word)."""
    text = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    block = text.split("Put the secrets in `/etc/simotel-bridge/env`", 1)[1]
    block = block.split("```sh\n", 1)[1].split("```", 1)[0]
    pairs = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        assert len(words) == 1, f"{line!r} is not one shell word: quote it"
        name, _, value = words[0].partition("=")
        pairs.append((name, value))
    return pairs


def _setting(settings: Any, name: str) -> Any:
    node = settings
    for segment in name.removeprefix("SIMOTEL_BRIDGE__").split("__"):
        if isinstance(node, dict):
            node = next(v for k, v in node.items() if k.replace("-", "_") == segment.lower())
        else:
            node = getattr(node, segment.lower())
    return node.get_secret_value() if isinstance(node, SecretStr) else node


def test_the_deploy_readme_environment_examples_mean_what_the_readme_says() -> None:
    pairs = _readme_environment()
    assert len(pairs) >= 5
    settings = load_settings(ROOT / "config.example.yaml", environ=dict(pairs))
    for name, value in pairs:
        got = _setting(settings, name)
        if isinstance(got, tuple):
            # A list key: the value is a YAML flow list.
            assert list(got) == yaml.safe_load(value), name
        else:
            # Everything else: literally the characters between the quotes, no more. An
            # example whose value still carries quotes would put them into the password.
            assert got == value, name
            assert not (len(value) > 1 and value[0] in "'\"" and value[-1] == value[0]), name
    # The README's own examples include the values that YAML would have turned into other
    # types or unquoted: they reach the bridge unchanged.
    values = dict(pairs)
    assert values["SIMOTEL_BRIDGE__SOURCES__SIMOTEL__API__API_KEY"] == "123456"
    assert '"quotes"' in values["SIMOTEL_BRIDGE__SOURCES__SIMOTEL__API__PASSWORD"]


def test_the_security_docs_state_the_real_limits_and_defaults() -> None:
    """docs/security.md's table of limits names real `http.*` keys with their real defaults,
    and config.example.yaml shows the same defaults."""
    from bridge.config import HttpSettings

    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `http\.(\w+)` \| ([0-9.]+)", text, re.M)
    assert {key for key, _ in rows} >= {
        "max_header_bytes",
        "max_header_line_bytes",
        "header_timeout_s",
        "body_timeout_s",
        "max_connections",
        "max_body_bytes",
    }
    defaults = HttpSettings()
    example = yaml.safe_load((ROOT / "config.example.yaml").read_text(encoding="utf-8"))["http"]
    for key, documented in rows:
        assert float(documented) == getattr(defaults, key), key
        assert example[key] == getattr(defaults, key), key
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/security.md" in readme.split("## Security", 1)[1].split("\n## ", 1)[0]
