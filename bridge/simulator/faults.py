"""Fault injection for the simulated API: one pure decision per request, drawn from a seeded
random generator, so a test can ask for "always" (rate 1.0) and get it every time."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from bridge.simulator.options import Faults

FaultOutcome = Literal["normal", "error", "failure", "drop"]


@dataclass(frozen=True, slots=True)
class Decision:
    delay: float  # seconds to wait before answering
    outcome: FaultOutcome
    status: int = 200  # the 5xx status when outcome == "error"


NO_FAULT = Decision(0.0, "normal")


def decide(faults: Faults, rng: random.Random) -> Decision:
    """What to do with the next request. Exactly one outcome; error beats failure beats drop."""
    if not faults.any:
        return NO_FAULT
    delay = faults.latency_ms / 1000
    if faults.latency_jitter_ms:
        delay += rng.uniform(0, faults.latency_jitter_ms) / 1000
    if faults.error_rate and rng.random() < faults.error_rate:
        return Decision(delay, "error", rng.choice((500, 502, 503)))
    if faults.failure_rate and rng.random() < faults.failure_rate:
        return Decision(delay, "failure")
    if faults.drop_rate and rng.random() < faults.drop_rate:
        return Decision(delay, "drop")
    return Decision(delay, "normal")
