"""What a simulated Simotel is told at start: where it serves API v4, which credentials its API
account has, where it sends webhooks and how, how busy it is, and which faults it injects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ApiAuth = Literal["basic", "apikey", "both"]
# g4: JSON POST to the event URL; rest4: JSON POST to <event URL>/<EventName>;
# get: query string on a GET; form: application/x-www-form-urlencoded POST (v2/v3 style).
Delivery = Literal["g4", "rest4", "get", "form"]
DELIVERIES: tuple[Delivery, ...] = ("g4", "rest4", "get", "form")


@dataclass(frozen=True, slots=True)
class Faults:
    """Injected misbehaviour of the API server. Rates are probabilities per request (0..1)."""

    latency_ms: int = 0  # added to every answer
    latency_jitter_ms: int = 0  # plus a uniform random 0..jitter
    error_rate: float = 0.0  # HTTP 5xx (500/502/503) without executing the request
    failure_rate: float = 0.0  # HTTP 200 `success: 0` "Requested operation failed", not executed
    drop_rate: float = 0.0  # execute, then drop the connection before the answer is complete

    @property
    def any(self) -> bool:
        return bool(
            self.latency_ms
            or self.latency_jitter_ms
            or self.error_rate
            or self.failure_rate
            or self.drop_rate
        )


@dataclass(frozen=True, slots=True)
class SimulatorOptions:
    # API v4 server
    host: str = "127.0.0.1"
    port: int = 8081  # 0: any free port
    base_path: str = "/api/v4/"
    username: str = "apiuser"
    password: str = "change-me"
    api_key: str = "change-me"
    auth: ApiAuth = "both"
    # Source addresses (CIDRs) allowed to call the API; empty: any (403 "IP is not permitted").
    allowed_ips: tuple[str, ...] = ()
    # Paths the API account is not permitted to call (403 "<service>;Access denied").
    denied_paths: tuple[str, ...] = ()
    faults: Faults = field(default_factory=Faults)
    # Webhooks (Simotel -> bridge). None: no webhooks at all (API only).
    event_url: str | None = "http://127.0.0.1:8080/webhooks/simotel/events"
    # Base of the component URLs (<base>/SmartApi ...). None: derived from event_url when it
    # ends in /events, else components are not called.
    component_url: str | None = None
    webhook_username: str | None = "simotel"
    webhook_password: str | None = "change-me"
    delivery: Delivery = "g4"
    # Share (0..1) of event webhooks lost on the way, to show what reconciliation recovers.
    drop_webhooks: float = 0.0
    # Simotel waits 1 s for a component's answer.
    component_timeout: float = 1.0
    # Call generator: calls started per minute (0: none; originate and API side effects still
    # send webhooks). Simulated durations are multiplied by time_scale (0: as fast as possible).
    calls_per_minute: float = 6.0
    time_scale: float = 1.0
    components: bool = True  # walk dialplan components (SmartApi, ExtenApi, ...) during calls
    originate_delay: float = 1.0  # seconds between the originate answer and its first webhook
    originate_answer_rate: float = 0.9  # the first party answers (else: no Cdr, as documented)
    seed: int | None = None  # random seed, for repeatable runs
    seed_data: bool = True  # start with demo users, queues, trunks, ...

    @property
    def components_base(self) -> str | None:
        if not self.components:
            return None
        if self.component_url:
            return self.component_url.rstrip("/")
        if self.event_url:
            base = self.event_url.rstrip("/")
            if base.endswith("/events"):
                return base[: -len("/events")] + "/components"
        return None
