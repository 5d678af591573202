"""The exception tree of simotel-bridge.

    BridgeError                 root: everything the bridge raises on purpose
    ├── ConfigError             the configuration is invalid (carries every problem with its key)
    ├── WebhookError            a webhook request cannot be accepted (carries the HTTP status)
    ├── PublishError            the broker did not take a message (not confirmed in time, nacked,
    │   │                       connection gone)
    │   ├── Unroutable          a mandatory publish came back: no queue bound (amqp.py)
    │   └── SpoolFull           neither the broker nor the spool can take an event (spool.py)
    ├── WireError               a routing key or properties over the wire budget (wire.py); also
    │                           a ValueError, as aiormq's own refusal of a long shortstr is
    ├── CommandError            a command message is invalid (becomes a `rejected` result)
    ├── HistoryError            the history stream cannot be read: none (history off), no
    │                           permission, connection lost (history.py)
    └── ReplayError             a replay cannot go on: no such target, a publish unroutable or
                                not confirmed (replay.py)

Anything else escaping a unit of work is a bug: it is logged at the top of that unit and the
message is handled as the single ack/reject decision function says.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """The configuration is invalid. `problems` holds `(key, message)` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems))


class WebhookError(BridgeError):
    """A webhook request that cannot be accepted; `status` is the HTTP answer, `reason` a
    short machine-readable word used in metrics and logs."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        self.status = status
        self.reason = reason
        self.detail = detail
        super().__init__(f"{status} {reason}: {detail}")


class PublishError(BridgeError):
    """The broker did not confirm a publish (timeout, nack, unroutable, connection lost)."""


class WireError(BridgeError, ValueError):
    """A routing key or the properties of a message are over the wire budget (wire.py):
    publishing it would be refused by aiormq or make the broker close the connection."""


class CommandError(BridgeError):
    """A command message is invalid; `reason` says why. It is never sent to Simotel."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
