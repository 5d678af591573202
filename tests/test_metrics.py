"""`bridge.metrics`: series exist for what is configured, never for a placeholder."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from bridge.commands import STATUSES
from bridge.metrics import WorkerMetrics


def _sources(registry: CollectorRegistry, name: str) -> set[str]:
    return {
        sample.labels["source"]
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == name
    }


def test_command_series_exist_for_the_configured_sources_only() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    assert _sources(registry, "simotel_bridge_commands_total") == set()  # no placeholder source
    metrics.show_sources(["simotel", "tehran"])
    assert _sources(registry, "simotel_bridge_commands_total") == {"simotel", "tehran"}
    for status in STATUSES:
        labels = {"source": "tehran", "status": status}
        assert registry.get_sample_value("simotel_bridge_commands_total", labels) == 0


def test_a_command_without_a_source_is_counted_without_one() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.settled(None, "rejected")
    metrics.settled("simotel", "ok")
    assert _sources(registry, "simotel_bridge_commands_total") == {"", "simotel"}
    labels = {"source": "", "status": "rejected"}
    assert registry.get_sample_value("simotel_bridge_commands_total", labels) == 1
