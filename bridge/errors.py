"""The exception tree of simotel-bridge: every exception the bridge defines lives here.

    BridgeError                 root: everything the bridge raises on purpose
    ├── ConfigError             the configuration is invalid (carries every problem with its key)
    ├── WebhookError            a webhook request cannot be accepted (carries the HTTP status)
    ├── PublishError            the broker did not take a message (not confirmed in time, nacked,
    │   │                       connection gone)
    │   ├── Unroutable          a mandatory publish came back: no queue bound (amqp.py)
    │   └── SpoolFull           neither the broker nor the spool can take an event (spool.py)
    ├── WireError*              a routing key or properties over the wire budget (wire.py)
    ├── CommandError            a command message is invalid (becomes a `rejected` result)
    │   └── InvalidCommand      ... with a reason code and a detail (commands.py)
    ├── InvalidAnswer*          a component answer cannot be sent to Simotel (answers.py)
    ├── SmartApiError*          a SmartApi script or command is not valid (client/smartapi.py)
    │   └── UnsafeArgument*     a text argument could change how Simotel reads the script
    ├── RecordError*            a CDR record cannot become an event (cdr.py)
    ├── Undecodable*            a spooled row does not make an event (spool.py)
    ├── StateError              the command state store refused a key or a schema (state/)
    ├── HistoryError            the history stream cannot be read: none (history off), no
    │                           permission, connection lost (client/history.py)
    ├── ReplayError             a replay cannot go on: no such target, a publish unroutable or
    │                           not confirmed (replay.py)
    ├── ReconcileError          the reconciler cannot go on (reconcile.py)
    │   └── LockLost            this process no longer holds the source's reconcile lock
    └── RoleFailed              a role (HTTP server, worker) stopped on its own (runtime.py)

* also a ValueError, as they were before they joined the tree (and, for WireError, as aiormq's
  own refusal of a long shortstr is), so `except ValueError` keeps catching them.

The modules named above re-export their exceptions, so `from bridge.amqp import Unroutable`
and the like keep working. Anything else escaping a unit of work is a bug: it is logged at the
top of that unit and the message is handled as the single ack/reject decision function says.

Pure: no imports beyond the standard library (the client library imports it).
"""

from __future__ import annotations

from typing import Literal

SpoolFullReason = Literal["messages", "bytes", "error", "locked", "disabled", "closed"]


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


class Unroutable(PublishError):
    """The broker returned a mandatory publish: no queue is bound to its routing key."""


class SpoolFull(PublishError):
    """The spool cannot take the event: a bound is reached, the disk failed, or there is no
    spool. The ingress answers 503. `reason` is one of `SpoolFullReason`."""

    def __init__(self, reason: SpoolFullReason, detail: str) -> None:
        self.reason: SpoolFullReason = reason
        super().__init__(f"spool cannot take the event ({reason}): {detail}")


class WireError(BridgeError, ValueError):
    """A routing key or the properties of a message are over the wire budget (wire.py):
    publishing it would be refused by aiormq or make the broker close the connection."""


class CommandError(BridgeError):
    """A command message is invalid; `reason` says why. It is never sent to Simotel."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class InvalidCommand(CommandError):
    """A command that cannot be executed. `reason` is a short code (the dead-letter header and
    metric label), `detail` the sentence that goes into the result's `error`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.detail = detail


class InvalidAnswer(BridgeError, ValueError):
    """A responder's answer cannot be sent to Simotel."""


class SmartApiError(BridgeError, ValueError):
    """A script or a command is not valid SmartApi."""


class UnsafeArgument(SmartApiError):
    """A text argument holds a character that could change how Simotel reads the script."""


class RecordError(BridgeError, ValueError):
    """A CDR record that cannot become an event (no `_id`, no call id)."""


class Undecodable(BridgeError, ValueError):
    """A spooled row whose columns do not make an event (a damaged or foreign file)."""


class StateError(BridgeError):
    """The state store refused something: a key over its bound, or a schema it does not know."""


class HistoryError(BridgeError):
    """The history cannot be read: no stream (history disabled), no permission, connection lost."""


class ReplayError(BridgeError):
    """The replay cannot go on: no such target, a publish not confirmed or not routable."""


class ReconcileError(BridgeError):
    """A reconciliation pass cannot go on: Simotel's answer is unusable."""


class LockLost(ReconcileError):
    """This process no longer holds the source's lock (its connection went away)."""


class RoleFailed(BridgeError):
    """A role (HTTP server, worker) stopped on its own; the process exits non-zero."""
