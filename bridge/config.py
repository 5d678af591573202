"""Configuration: a YAML file plus `SIMOTEL_BRIDGE__...` environment overrides, validated once at
start-up. Every problem is reported with the dotted key that has it.

Secrets are `SecretStr`: they print as `**********` in reprs, logs and errors.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.errors import ConfigError

ENV_PREFIX = "SIMOTEL_BRIDGE__"
SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
COMPONENTS = ("SmartApi", "ExtenApi", "TrunkApi", "IvrApi")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Exchanges(_Model):
    events: str = "simotel.events"
    components: str = "simotel.components"
    commands: str = "simotel.commands"
    results: str = "simotel.results"
    dead: str = "simotel.dead"
    unrouted: str = "simotel.unrouted"


class Queues(_Model):
    commands: str = "simotel.commands"
    dead: str = "simotel.dead"
    unrouted: str = "simotel.unrouted"


class AmqpSettings(_Model):
    url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    # Seconds to wait for a publisher confirm before the publish counts as failed.
    publish_timeout: float = Field(2.0, gt=0, le=60)
    # Seconds to wait for the first connection at start-up before giving up.
    connect_timeout: float = Field(10.0, gt=0)
    heartbeat: int = Field(20, ge=0, le=600)
    exchanges: Exchanges = Exchanges()
    queues: Queues = Queues()
    unrouted_max_length: int = Field(100_000, ge=1)
    dead_max_length: int = Field(1_000_000, ge=1)
    # Quorum queue delivery limit: a command redelivered more often than this is dead-lettered.
    commands_delivery_limit: int = Field(5, ge=1, le=1000)


class HttpSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    # Peers whose X-Forwarded-For header is believed. Empty: the socket address is the client.
    trusted_proxies: tuple[str, ...] = ()

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in v:
            ipaddress.ip_network(cidr, strict=False)
        return v


class LogSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: coloured console on a terminal, JSON lines otherwise.
    format: Literal["auto", "json", "console"] = "auto"


class WebhookAuth(_Model):
    username: str | None = None
    password: SecretStr | None = None
    allow_unauthenticated: bool = False
    # CIDRs allowed to call the webhooks of this source. Empty: any address.
    allowed_ips: tuple[str, ...] = ()

    @field_validator("allowed_ips")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in v:
            ipaddress.ip_network(cidr, strict=False)
        return v

    @model_validator(mode="after")
    def _credentials(self) -> WebhookAuth:
        has_user = bool(self.username)
        has_pass = self.password is not None and bool(self.password.get_secret_value())
        if has_user != has_pass:
            raise ValueError("username and password go together")
        if not has_user and not self.allow_unauthenticated:
            raise ValueError(
                "webhook credentials are required (set username and password, "
                "or allow_unauthenticated: true)"
            )
        return self


class ApiSettings(_Model):
    base_url: str = "http://127.0.0.1:8081/api/v4/"
    username: str | None = None
    password: SecretStr | None = None
    api_key: SecretStr | None = None
    # basic, apikey or both (Simotel's recommended mode); must match the Simotel API account.
    auth: Literal["basic", "apikey", "both"] = "both"
    verify_tls: bool = True
    connect_timeout: float = Field(3.0, gt=0)
    read_timeout: float = Field(15.0, gt=0)
    # Read timeout for report searches, which Simotel can take long over.
    report_timeout: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, le=20)
    retry_base_delay: float = Field(0.2, ge=0)
    retry_max_delay: float = Field(5.0, ge=0)
    # Requests per second to this Simotel (token bucket); 0 means unlimited.
    rate_limit: float = Field(20.0, ge=0)
    rate_burst: int = Field(20, ge=1)
    max_download_bytes: int = Field(50 * 1024 * 1024, ge=1)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", v):
            raise ValueError("must be an http:// or https:// URL")
        return v if v.endswith("/") else v + "/"

    @model_validator(mode="after")
    def _auth(self) -> ApiSettings:
        if self.auth in ("basic", "both") and not (self.username and self.password):
            raise ValueError(f"auth {self.auth!r} needs username and password")
        if self.auth in ("apikey", "both") and not self.api_key:
            raise ValueError(f"auth {self.auth!r} needs api_key")
        return self


FallbackAnswer = dict[str, Any]


class ComponentSettings(_Model):
    # Milliseconds the bridge waits for a responder before answering with the fallback.
    # Simotel waits 1000 ms; keep a margin for the network.
    deadline_ms: int = Field(800, ge=10, le=5000)
    # Deadline per component (SmartApi, ExtenApi, TrunkApi, IvrApi), overriding deadline_ms.
    deadlines_ms: dict[str, int] = {}
    # Fallback answer per component, and per "Component.app_name" (the more specific wins).
    fallbacks: dict[str, FallbackAnswer] = {}
    # Also publish each component request to the events exchange, for audit and analytics, as
    # `{source}.Component{Name}` (e.g. simotel.ComponentSmartApi: two levels, like events).
    publish_as_event: bool = False
    # Requests waiting for a responder at once, per process; beyond it the fallback is answered
    # at once. A memory guard, not a throttle: a waiting call costs almost nothing and ends at
    # its deadline, so hundreds of calls can wait on a healthy responder.
    max_in_flight: int = Field(2048, ge=1, le=100_000)
    # Replies larger than this get the fallback without being parsed (a valid answer is about
    # 20 KB at most).
    max_answer_bytes: int = Field(65536, ge=1024, le=4 * 1024 * 1024)

    @field_validator("deadlines_ms", "fallbacks")
    @classmethod
    def _known_components(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key.split(".", 1)[0] not in COMPONENTS:
                raise ValueError(f"{key!r}: component must be one of {', '.join(COMPONENTS)}")
        return v


class SourceSettings(_Model):
    webhook: WebhookAuth = WebhookAuth(allow_unauthenticated=True)
    api: ApiSettings | None = None
    components: ComponentSettings = ComponentSettings()


class WorkerSettings(_Model):
    # Commands each lane may run at once (also the consumer prefetch of that lane).
    prefetch: int = Field(32, ge=1, le=10_000)
    report_prefetch: int = Field(4, ge=1, le=1000)
    # Seconds a graceful shutdown waits for in-flight commands before handing them back.
    shutdown_grace: float = Field(10.0, ge=0)
    # Where results of executed commands are kept for de-duplication by message_id.
    state_path: str = "var/worker-state.sqlite3"
    state_ttl_hours: float = Field(72.0, gt=0)


class SpoolSettings(_Model):
    enabled: bool = True
    path: str = "var/spool.sqlite3"
    max_messages: int = Field(1_000_000, ge=1)
    max_bytes: int = Field(1024 * 1024 * 1024, ge=1024)


class Settings(_Model):
    amqp: AmqpSettings = AmqpSettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    sources: dict[str, SourceSettings]
    worker: WorkerSettings = WorkerSettings()
    spool: SpoolSettings = SpoolSettings()

    @field_validator("sources")
    @classmethod
    def _names(cls, v: dict[str, SourceSettings]) -> dict[str, SourceSettings]:
        if not v:
            raise ValueError("at least one source is needed")
        for name in v:
            if not SOURCE_NAME.match(name):
                raise ValueError(f"source name {name!r} must match {SOURCE_NAME.pattern}")
        return v


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """Put every `SIMOTEL_BRIDGE__A__B=v` into data["a"]["b"]. A segment matches an existing
    key case-insensitively, with `_` also matching `-` (source names may hold a dash)."""
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p for p in name[len(ENV_PREFIX) :].split("__") if p]
        node: dict[str, Any] = data
        for i, segment in enumerate(path):
            key = _match_key(node, segment)
            if i == len(path) - 1:
                try:
                    node[key] = _env_value(value)
                except yaml.YAMLError:
                    # The value may be a secret: the problem is reported without it.
                    dotted = ".".join(path).lower()
                    raise ConfigError(
                        [(dotted, f"{name} starts like a YAML list or mapping but is not one")]
                    ) from None
            else:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = {}
                    node[key] = child
                node = child


def _env_value(value: str) -> Any:
    """An environment value is a string (validation converts `9090` or `true` where the key
    wants a number or a switch), so a password such as `123456` or `yes` stays what it is.
    Only a YAML flow list or mapping (`[10.0.0.0/8, 192.168.0.0/16]`) is parsed."""
    if value.strip().startswith(("[", "{")):
        return yaml.safe_load(value)
    return value


def _match_key(node: dict[str, Any], segment: str) -> str:
    wanted = segment.lower()
    for key in node:
        if key.lower() == wanted or key.lower().replace("-", "_") == wanted:
            return key
    return wanted


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top)"


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    data: dict[str, Any] | None = None,
) -> Settings:
    """Read, merge and validate. Raises ConfigError listing every problem with its key."""
    environ = os.environ if environ is None else environ
    if data is None:
        data = {}
        if path is not None:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError([("(file)", f"cannot read {path}: {exc.strerror}")]) from exc
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError([("(file)", f"{path} is not valid YAML: {exc}")]) from exc
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError([("(top)", "the file must hold a mapping")])
            data = loaded or {}
    _apply_env(data, environ)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            problems.append((_loc(err["loc"]), err["msg"].removeprefix("Value error, ")))
        raise ConfigError(problems) from None


def default_config_path() -> Path | None:
    """`-c` wins; else $SIMOTEL_BRIDGE_CONFIG; else ./config.yaml when it exists."""
    env = os.environ.get("SIMOTEL_BRIDGE_CONFIG")
    if env:
        return Path(env)
    here = Path("config.yaml")
    return here if here.exists() else None
