"""The bridge's Prometheus metrics, every class in this module: the ingress (`Metrics`), the
spool, components, the worker, the reconciler, the history stream. Each is made on the
registry it is given (no global state, so tests and several apps in one process never share
counters). Metric names are public: dashboards and alerts in deploy/ use them."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bridge.commands import STATUSES
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


class WorkerMetrics:
    """The worker's Prometheus metrics, registered on the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.commands = Counter(
            "simotel_bridge_commands_total",
            "Commands settled, by source and result status.",
            ["source", "status"],
            registry=registry,
        )
        self.duplicates = Counter(
            "simotel_bridge_command_duplicates_total",
            "Commands answered with the result of an earlier command with the same message_id.",
            registry=registry,
        )
        self.handed_back = Counter(
            "simotel_bridge_commands_handed_back_total",
            "Commands returned to the queue (shutdown, unconfirmed result, unexpected error).",
            registry=registry,
        )
        self.publish_failures = Counter(
            "simotel_bridge_result_publish_failures_total",
            "Attempts to publish a result (or its reply or dead letter) the broker did not "
            "confirm; each is retried with backoff before the command is handed back.",
            registry=registry,
        )
        self.unpublishable = Counter(
            "simotel_bridge_results_unpublishable_total",
            "Results the broker refused (too large, cannot be encoded, nacked): replaced by a "
            "result without its response (reason result_unpublishable) and a dead letter.",
            registry=registry,
        )
        self.in_flight = Gauge(
            "simotel_bridge_commands_in_flight",
            "Commands being executed, by lane.",
            ["lane"],
            registry=registry,
        )
        self.simotel_latency = Histogram(
            "simotel_bridge_simotel_request_seconds",
            "Duration of one HTTP request to Simotel, by source and endpoint kind.",
            ["source", "kind"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )

    def show_sources(self, sources: Iterable[str]) -> None:
        """Make every status of these (configured) sources visible at 0, so a rate or an alert
        has a series before the first command; no series is made for a source not given."""
        for source in sources:
            for status in STATUSES:
                self.commands.labels(source=source, status=status)

    def settled(self, source: str | None, status: str) -> None:
        """Count a settled command. One whose source is unknown (a rejected command) has an
        empty `source` label, which Prometheus treats as no label at all."""
        self.commands.labels(source=source or "", status=status).inc()


class ComponentMetrics:
    """The component RPC's metrics (docs/components.md), on the process's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "simotel_bridge_component_requests",
            "Component requests by outcome",
            ["source", "component", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "simotel_bridge_component_latency_seconds",
            "Time from the request reaching the bridge to the answer being ready",
            ["component", "outcome"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 2.0),
            registry=registry,
        )
        self.oversized = Counter(
            "simotel_bridge_component_oversized_answers",
            "Answers refused unparsed because they were over max_answer_bytes",
            ["component"],
            registry=registry,
        )
        self.late = Counter(
            "simotel_bridge_component_late_answers",
            "Answers that arrived after their deadline (dropped)",
            ["component"],
            registry=registry,
        )
        self.events_failed = Counter(
            "simotel_bridge_component_events_failed",
            "Component requests that could not be published as events",
            ["source"],
            registry=registry,
        )


class SpoolMetrics:
    """What an operator asks about the spool: how deep, how old, how much went through it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.depth = Gauge("simotel_bridge_spool_depth", "Events in the local spool", registry=r)
        self.bytes = Gauge("simotel_bridge_spool_bytes", "Bytes of events in the spool", registry=r)
        self.oldest_age = Gauge(
            "simotel_bridge_spool_oldest_age_seconds",
            "Age of the oldest spooled event (0 when empty)",
            registry=r,
        )
        self.mode = Gauge(
            "simotel_bridge_spool_mode", "1 while new events go to the spool, 0 to the broker",
            registry=r,
        )  # fmt: skip
        self.spooled = Counter(
            "simotel_bridge_spooled",
            "Events written to the spool, by why: broker_down, publish_failed, behind_spool",
            ["reason"],
            registry=r,
        )
        self.replayed = Counter(
            "simotel_bridge_spool_replayed", "Spooled events published and confirmed", registry=r
        )
        self.replay_failures = Counter(
            "simotel_bridge_spool_replay_failures",
            "Replay attempts that failed (the events stay spooled)",
            registry=r,
        )
        self.full = Counter(
            "simotel_bridge_spool_full",
            "Events refused (503) because the spool could not take them, by reason",
            ["reason"],
            registry=r,
        )
        self.quarantined = Counter(
            "simotel_bridge_spool_quarantined",
            "Spooled events moved to the quarantine, by reason: undecodable, unpublishable, "
            "refused",
            ["reason"],
            registry=r,
        )
        self.quarantine_depth = Gauge(
            "simotel_bridge_spool_quarantine_depth",
            "Events in the spool's quarantine (simotel-bridge spool list)",
            registry=r,
        )
        self.dead_copies = Counter(
            "simotel_bridge_spool_dead_copies",
            "Copies of quarantined events to the dead-letter exchange, by outcome: sent, retry, "
            "failed (given up; the event stays in the quarantine)",
            ["outcome"],
            registry=r,
        )
        for reason in ("undecodable", "unpublishable", "refused"):
            self.quarantined.labels(reason)


class HistoryMetrics:
    """The event history stream, read periodically (docs/history.md)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.oldest_age = Gauge(
            "simotel_bridge_history_oldest_event_age_seconds",
            "Age of the oldest event kept in the history stream",
            registry=registry,
        )
        self.events = Gauge(
            "simotel_bridge_history_events",
            "Events in the history stream (a lower bound, short by less than one chunk)",
            registry=registry,
        )
