"""Prometheus metrics of the ingress. One `Metrics` per app, on its own registry (no global
state, so tests and several apps in one process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bridge.translate import KNOWN_EVENTS

_KNOWN = frozenset(KNOWN_EVENTS)

# Confirm latencies are sub-millisecond on a healthy local broker and seconds when it struggles.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def event_label(name: str) -> str:
    """Event names are open vocabulary; only known ones become label values, so a sender cannot
    grow the number of series without bound."""
    return name if name in _KNOWN else "other"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.accepted = Counter(
            "simotel_bridge_webhooks_accepted",
            "Event webhooks accepted (answered 200), by where they went",
            ["source", "event", "destination"],
            registry=r,
        )
        self.rejected = Counter(
            "simotel_bridge_webhooks_rejected",
            "Webhook requests refused, by reason",
            ["reason"],
            registry=r,
        )
        self.confirm_latency = Histogram(
            "simotel_bridge_publish_confirm_seconds",
            "Time from publish to the broker's confirm, for events",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "simotel_bridge_webhook_seconds",
            "Time to answer an event webhook",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.broker_up = Gauge(
            "simotel_bridge_broker_connected", "1 while the broker connection is usable", registry=r
        )
