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
            "Time to answer an event webhook, by the answer's status (or `other`)",
            ["status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.broker_up = Gauge(
            "simotel_bridge_broker_connected", "1 while the broker connection is usable", registry=r
        )


class ReconcileMetrics:
    """The reconciler's metrics (docs/reconcile.md), on the process's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.recovered = Counter(
            "simotel_bridge_reconcile_recovered",
            "Events published from Simotel's cursors because their webhook never arrived",
            ["source", "event"],
            registry=r,
        )
        self.seen = Counter(
            "simotel_bridge_reconcile_seen",
            "Cdr / CdrQueue events the reconciler saw on the exchange",
            ["source"],
            registry=r,
        )
        self.skipped = Counter(
            "simotel_bridge_reconcile_skipped",
            "Cursor records not published, by reason (seen, no_call_id, ...)",
            ["source", "feed", "reason"],
            registry=r,
        )
        self.errors = Counter(
            "simotel_bridge_reconcile_errors",
            "Reconciliation passes that failed, by kind (api, lock, broker, other)",
            ["source", "kind"],
            registry=r,
        )
        self.lag = Gauge(
            "simotel_bridge_reconcile_cursor_lag_seconds",
            "Age of the oldest record the cursor has not passed yet (0: at the table's end)",
            ["source", "feed"],
            registry=r,
        )
        self.last_success = Gauge(
            "simotel_bridge_reconcile_last_success_timestamp_seconds",
            "When the last complete reconciliation pass ended (epoch seconds)",
            ["source"],
            registry=r,
        )
        self.active = Gauge(
            "simotel_bridge_reconcile_active",
            "1 while this process is the source's active reconciler (holds the broker lock)",
            ["source"],
            registry=r,
        )
