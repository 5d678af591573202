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
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.errors import ConfigError
from bridge.wire import COMPONENTS as COMPONENTS  # re-exported

ENV_PREFIX = "SIMOTEL_BRIDGE__"
SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MAX_AMQP_URLS = 16
AMQP_URL = re.compile(r"^amqps?://[^/\s?#]+(/\S*)?$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# C0 controls (tab, CR, LF, NUL...), DEL and C1 controls. A secret file saved with a trailing
# newline is the usual way one gets in; it would reach an HTTP header or a URL, where the
# protocol library's error then quotes the secret.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(value: SecretStr) -> SecretStr:
    if _CONTROL.search(value.get_secret_value()):
        raise ValueError("contains a control character (a trailing newline?); value not shown")
    return value


def _printable_name(value: str | None) -> str | None:
    if value is not None and _CONTROL.search(value):
        raise ValueError("contains a control character (a trailing newline?)")
    return value


# Every secret setting is a Secret: hidden in reprs and refused with a control character in it.
Secret = Annotated[SecretStr, AfterValidator(_printable)]
Name = Annotated[str | None, AfterValidator(_printable_name)]


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
    url: Secret = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
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

    # Several broker nodes (a RabbitMQ cluster): the bridge connects to the first that answers
    # and moves to the next when its node goes away. Given instead of `url`, not with it.
    urls: tuple[Secret, ...] = Field((), max_length=MAX_AMQP_URLS)
    # Members of each quorum queue (x-quorum-initial-group-size). Unset: the argument is left
    # out and RabbitMQ decides (a member on every cluster node). Fixed when a queue is created.
    quorum_replicas: int | None = Field(None, ge=1, le=9)

    @field_validator("urls")
    @classmethod
    def _amqp_urls(cls, v: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for i, url in enumerate(v):
            # The URL may hold a password: only its position is reported.
            if not AMQP_URL.match(url.get_secret_value()):
                raise ValueError(f"entry {i} is not an amqp:// or amqps:// URL with a host")
        return v

    @model_validator(mode="after")
    def _one_way(self) -> AmqpSettings:
        if self.urls and "url" in self.model_fields_set:
            raise ValueError("give either url or urls, not both")
        return self

    def endpoints(self) -> tuple[str, ...]:
        """The broker URLs to try, in order (secrets included: never log them)."""
        if self.urls:
            return tuple(u.get_secret_value() for u in self.urls)
        return (self.url.get_secret_value(),)


class HttpSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    # Peers whose X-Forwarded-For header is believed. Empty: the socket address is the client.
    trusted_proxies: tuple[str, ...] = ()
    # The listener's own limits (docs/security.md): request line and headers together, one
    # header line, seconds to receive the headers and then the body, open connections.
    max_header_bytes: int = Field(32_768, ge=1024, le=1_048_576)
    max_header_line_bytes: int = Field(8_192, ge=256, le=1_048_576)
    header_timeout_s: float = Field(10.0, gt=0, le=300)
    body_timeout_s: float = Field(10.0, gt=0, le=600)
    max_connections: int = Field(1024, ge=1, le=100_000)
    # SO_REUSEPORT: several ingress processes (each with its own spool.path) listen on one
    # port and the kernel spreads connections between them. Linux and the BSDs only.
    reuse_port: bool = False
    # Ingress processes on `port` (bridge/supervisor.py): above 1, `ingress` and `run` start
    # that many children with reuse_port, each on its own spool (spool-1.sqlite3, ...).
    workers: int = Field(1, ge=1, le=64)

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
    # The share of accepted event webhooks (200) that get an access log line: 0.01 is one in
    # 100, each sampled line saying how many it stands for. Refusals and failures are always
    # logged; the metrics count every answer. 1: every webhook, 0: none.
    access_sample: float = Field(0.01, ge=0, le=1)


class WebhookAuth(_Model):
    username: Name = None
    password: Secret | None = None
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
    username: Name = None
    password: Secret | None = None
    api_key: Secret | None = None
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


class ReconcileSettings(_Model):
    """Recovering Cdr / CdrQueue events from Simotel's cursor endpoints (docs/reconcile.md)."""

    enabled: bool = False
    # Seconds between two walks of the cursors.
    interval_s: float = Field(60.0, gt=0, le=86_400)
    # Records younger than this (seconds) are left for their webhook.
    grace_s: float = Field(120.0, ge=0, le=86_400)
    # Where a feed without a stored cursor starts: now, beginning, or a record _id.
    from_: str = Field("now", alias="from", max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    # Hours a call id seen on the exchange is remembered (must cover the longest outage).
    seen_window_h: float = Field(168.0, gt=0)
    # Records a pass publishes at most (the rest waits for the next pass).
    max_per_pass: int = Field(10_000, ge=1)
    # The seen queue's length bound (the oldest drop first).
    queue_max_length: int = Field(1_000_000, ge=1000)


class SourceSettings(_Model):
    # Required: a source is open only if it says `allow_unauthenticated: true`
    # (docs/contract.md §6).
    webhook: WebhookAuth
    api: ApiSettings | None = None
    components: ComponentSettings = ComponentSettings()
    reconcile: ReconcileSettings = ReconcileSettings()

    @model_validator(mode="after")
    def _reconcile_needs_api(self) -> SourceSettings:
        if self.reconcile.enabled and self.api is None:
            raise ValueError("reconcile.enabled needs the api settings of the source")
        return self


class WorkerSettings(_Model):
    # Commands each lane may run at once (also the consumer prefetch of that lane).
    prefetch: int = Field(32, ge=1, le=10_000)
    report_prefetch: int = Field(4, ge=1, le=1000)
    # Seconds a graceful shutdown waits for in-flight commands before handing them back.
    shutdown_grace: float = Field(10.0, ge=0)
    # Where results of executed commands are kept for de-duplication by message_id.
    state_path: str = "var/worker-state.sqlite3"
    state_ttl_hours: float = Field(72.0, gt=0)
    # Shared command state (bridge/state): when set, PostgreSQL at this URL instead of the
    # SQLite file at state_path, so workers on several hosts run each message_id once.
    state_url: Secret | None = None
    state_pool_size: int = Field(4, ge=1, le=100)  # PostgreSQL connections per worker process
    # A stored result over this size keeps a marker instead of its response.
    max_stored_result_bytes: int = Field(1024 * 1024, ge=4096, le=64 * 1024 * 1024)

    @field_validator("state_url")
    @classmethod
    def _postgres_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None  # empty: the SQLite file
        if not v.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")  # the value is not echoed
        return v


class SpoolSettings(_Model):
    enabled: bool = True
    path: str = "var/spool.sqlite3"
    max_messages: int = Field(1_000_000, ge=1)
    max_bytes: int = Field(1024 * 1024 * 1024, ge=1024)


_AGE = re.compile(r"^[1-9][0-9]{0,5}(Y|M|D|h|m|s)$")


class HistorySettings(_Model):
    """The `simotel.history` stream: every event of the events exchange, kept for a while."""

    enabled: bool = True
    # RabbitMQ's x-max-age syntax: a number and a unit, Y M D h m s (7D: seven days).
    max_age: str = "7D"
    # Size bound of the stream on each node's disk; the oldest segments are removed first.
    max_bytes: int = Field(10 * 1024**3, ge=1024**2)
    # Binding pattern on the events exchange (`#`: every event).
    pattern: str = Field("#", min_length=1, max_length=255)

    @field_validator("max_age")
    @classmethod
    def _age(cls, v: str) -> str:
        if not _AGE.match(v):
            raise ValueError("must be a number and a unit Y, M, D, h, m or s (e.g. 7D, 12h)")
        return v


class Settings(_Model):
    amqp: AmqpSettings = AmqpSettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    sources: dict[str, SourceSettings]
    worker: WorkerSettings = WorkerSettings()
    spool: SpoolSettings = SpoolSettings()
    history: HistorySettings = HistorySettings()

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
    key case-insensitively, with `_` also matching `-` (source names may hold a dash).

    A value is taken literally, as a string (validation converts `9090` or `true` where the key
    wants a number or a switch), so a password such as `123456`, `yes`, `'x'` or `[x` stays
    exactly what it is. Only a key that holds a list or a mapping (e.g. `allowed_ips`) reads
    its value as YAML: `[10.0.0.0/8, 192.168.0.0/16]`. deploy/README.md states the same rule,
    and tests/test_config.py checks the README's examples against this function."""
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p for p in name[len(ENV_PREFIX) :].split("__") if p]
        node: dict[str, Any] = data
        for i, segment in enumerate(path):
            key = _match_key(node, segment)
            if i == len(path) - 1:
                node[key] = _env_value(name, path, value)
            else:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = {}
                    node[key] = child
                node = child


def _env_value(name: str, path: list[str], value: str) -> Any:
    if not _holds_collection(path):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        # Reported without the value, which may hold a secret (e.g. amqp URLs).
        dotted = ".".join(path).lower()
        raise ConfigError([(dotted, f"{name} is not a YAML list or mapping")]) from None


def _holds_collection(path: list[str]) -> bool:
    """Whether the setting at `path` (environment segments) is a list or a mapping."""
    node: Any = Settings
    for segment in path:
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(segment.lower())
            if field is None:
                return False
            node = field.annotation
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        else:
            return False
        node = _unwrap(node)
    return node in (list, tuple, dict) or get_origin(node) in (list, tuple, dict)


def _unwrap(annotation: Any) -> Any:
    """`X` out of `Annotated[X, ...]` and `X | None`."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
            annotation = args[0]
            continue
        return annotation


def _match_key(node: dict[str, Any], segment: str) -> str:
    wanted = segment.lower()
    for key in node:
        if key.lower() == wanted or key.lower().replace("-", "_") == wanted:
            return key
    return wanted


_NO_WEBHOOK = (
    "required: set username and password, or allow_unauthenticated: true to accept "
    "unauthenticated webhooks (an environment variable that names a source not in the "
    "file, e.g. a typo, creates a source without one)"
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, never the text: PyYAML's message quotes the offending line, which may
    hold a password. Quoted fragments of its problem text are cut for the same reason."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character in the file
        return f"character {exc.position + 1}: {exc.reason}"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "syntax error"
    problem = re.sub(r"'[^']{4,}'", "'…'", str(problem))
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


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
            except UnicodeDecodeError as exc:
                where = f"byte {exc.start}"
                raise ConfigError([("(file)", f"{path} is not UTF-8 text ({where})")]) from None
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(
                    [("(file)", f"{path} is not valid YAML: {_yaml_problem(exc)}")]
                ) from None
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError([("(top)", "the file must hold a mapping")])
            data = loaded or {}
    _apply_env(data, environ)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            msg = err["msg"].removeprefix("Value error, ")
            if (
                err["type"] == "missing"
                and err["loc"][0] == "sources"
                and err["loc"][-1] == "webhook"
            ):
                msg = _NO_WEBHOOK
            problems.append((_loc(err["loc"]), msg))
        raise ConfigError(problems) from None


def default_config_path() -> Path | None:
    """`-c` wins; else $SIMOTEL_BRIDGE_CONFIG; else ./config.yaml when it exists."""
    env = os.environ.get("SIMOTEL_BRIDGE_CONFIG")
    if env:
        return Path(env)
    here = Path("config.yaml")
    return here if here.exists() else None
