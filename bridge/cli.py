"""The `simotel-bridge` command line (docs/contract.md §5)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from bridge import __version__
from bridge.config import Settings, default_config_path, load_settings
from bridge.errors import BridgeError, ConfigError

T = TypeVar("T")


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or default_config_path()
    return load_settings(path)


def _configure_logs(settings: Settings) -> None:
    from bridge import logs

    logs.configure(settings.log)


def _quiet_logs() -> None:
    """Client commands print their answer on stdout; only warnings go to stderr."""
    from bridge import logs
    from bridge.config import LogSettings

    logs.configure(LogSettings(level="warning"))


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    path = args.config or default_config_path() or "(defaults and environment)"
    print(f"{path}: ok ({len(settings.sources)} source(s): {', '.join(settings.sources)})")
    return 0


def _run_roles(args: argparse.Namespace, roles: frozenset[str]) -> int:
    from bridge.runtime import install_signals, serve

    settings = _settings(args)
    _configure_logs(settings)
    if settings.http.workers > 1 and "ingress" in roles:
        return _supervise(args, settings, "run" if "worker" in roles else "ingress")

    async def main() -> None:
        stop = asyncio.Event()
        install_signals(stop)
        await serve(settings, roles, stop)

    _run(main())
    return 0


def _supervise(args: argparse.Namespace, settings: Settings, command: str) -> int:
    """`http.workers` above 1: N ingress processes on one port (bridge/supervisor.py)."""
    from bridge.supervisor import supervise

    _run(supervise(settings, command, args.config or default_config_path()))
    return 0


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on uvloop (a declared dependency) and return what it returns."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is declared; a platform without it
        return asyncio.run(coro)
    return uvloop.run(coro)


def cmd_send(args: argparse.Namespace) -> int:
    import orjson

    from bridge.commands import InvalidCommand
    from bridge.send import send_command

    settings = _settings(args)
    _quiet_logs()
    try:
        data = orjson.loads(args.data) if args.data else {}
    except orjson.JSONDecodeError as exc:
        print(f"JSON is not valid: {exc}", file=sys.stderr)
        return 2
    if not isinstance(data, dict):
        print("JSON must be an object", file=sys.stderr)
        return 2

    async def main() -> int:
        try:
            result = await send_command(
                settings,
                args.action,
                data,
                source=args.source,
                timeout=args.timeout,
                message_id=args.message_id,
            )
        except InvalidCommand as exc:
            print(f"rejected: {exc.detail}", file=sys.stderr)
            return 2
        except TimeoutError:
            print(f"no result within {args.timeout}s (is a worker running?)", file=sys.stderr)
            return 3
        if result.file is not None:
            out = args.output or Path(f"download-{result.command_id}")
            out.write_bytes(result.file)
            print(f"{len(result.file)} bytes ({result.content_type}) written to {out}",
                  file=sys.stderr)  # fmt: skip
        sys.stdout.write(result.to_json().decode() + "\n")
        return 0 if result.status == "ok" else 1

    return _run(main())


def cmd_tail(args: argparse.Namespace) -> int:
    from bridge.tail import tail

    if getattr(args, "since", None) is not None:
        return _tail_since(args)
    settings = _settings(args)
    _quiet_logs()

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        await tail(settings, args.pattern, stop=stop, limit=args.limit)

    _run(main())
    return 0


def _tail_since(args: argparse.Namespace) -> int:
    """`tail --since`: the event history first, then on live."""
    from bridge.tail import tail_since

    settings = _settings(args)
    _quiet_logs()

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        await tail_since(settings, args.since, args.pattern, stop=stop, limit=args.limit)

    _run(main())
    return 0


def _stop_on_signals(stop: asyncio.Event) -> None:
    from bridge.signals import install_signals

    install_signals(stop, second_exit_code=130)


def _when(text: str) -> datetime:
    """argparse type for --since / --until: `10m`, `2h`, `1h30m`, `now` or ISO 8601."""
    from bridge.client.history import parse_when

    try:
        return parse_when(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_replay(args: argparse.Namespace) -> int:
    """Exit 0 when the window was replayed, 130 when interrupted (what was confirmed is
    reported), 1 on an error (nothing in flight is left unconfirmed)."""
    from bridge.replay import Target, replay

    settings = _settings(args)
    _quiet_logs()
    target = Target(exchange=args.to_exchange, queue=args.to_queue)
    if args.until is not None and args.until <= args.since:
        print("--until must be later than --since", file=sys.stderr)
        return 2

    async def main() -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)  # a second signal: at once, 130
        summary = await replay(
            settings.amqp.endpoints(),
            args.since,
            args.until,
            args.pattern,
            target,
            rate=args.rate,
            dry_run=args.dry_run,
            stop=stop,
            progress=sys.stderr,
            events_exchange=settings.amqp.exchanges.events,
        )
        print(summary.line(), file=sys.stderr)
        return 130 if summary.interrupted else 0

    return _run(main())


def cmd_simulate(args: argparse.Namespace) -> int:
    from bridge import logs
    from bridge.config import LogSettings
    from bridge.simulator import Faults, SimulatorOptions, run_simulator

    logs.configure(LogSettings(level=args.log_level))
    options = SimulatorOptions(
        host=args.host,
        port=args.port,
        username=args.username,
        password=args.password,
        api_key=args.api_key,
        auth=args.auth,
        event_url=None if args.no_webhooks else args.event_url,
        component_url=args.component_url,
        webhook_username=args.webhook_user,
        webhook_password=args.webhook_password,
        delivery=args.delivery,
        drop_webhooks=args.drop_webhooks,
        calls_per_minute=args.rate,
        time_scale=args.time_scale,
        components=not args.no_components,
        seed=args.seed,
        faults=Faults(
            latency_ms=args.latency_ms,
            error_rate=args.error_rate,
            failure_rate=args.failure_rate,
            drop_rate=args.drop_rate,
        ),
    )

    async def main() -> None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        await run_simulator(options, stop)

    _run(main())
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """`reconcile`: the reconciler role; with --once or --from, one pass and exit."""
    import re

    settings = _settings(args)
    if args.from_ is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.from_):
        print("--from: now, beginning or a record _id", file=sys.stderr)
        return 2
    enabled = [n for n, s in settings.sources.items() if s.reconcile.enabled]
    names = [args.source] if args.source else enabled
    if not names or not set(names) <= set(enabled):
        print("no source to reconcile (a source needs reconcile.enabled)", file=sys.stderr)
        return 2
    if args.from_ is None and not args.once:
        return _run_roles(args, frozenset({"reconcile"}))
    from bridge.reconcile import run_once

    _configure_logs(settings)

    async def main() -> None:
        stats = await run_once(settings, names, args.from_)
        for name, s in stats.items():
            print(f"{name}: {s.published} recovered, {s.seen} seen, {s.pages} pages")

    _run(main())
    return 0


def cmd_spool(args: argparse.Namespace) -> int:
    """`spool list | requeue | drop`: the quarantine of the local spool (events the broker would
    not take). Works on the spool file while the bridge is stopped: a running bridge holds the
    file's lock, and then this says so and changes nothing."""
    import datetime

    import orjson

    from bridge.spool import Spool, SpoolFull

    settings = _settings(args)
    path = Path(settings.spool.path)
    if not path.exists():
        print(f"no spool file at {path}", file=sys.stderr)
        return 0 if args.action == "list" else 1
    s = settings.spool
    try:
        spool = Spool(path, max_messages=s.max_messages, max_bytes=s.max_bytes, lock_timeout=0.5)
    except SpoolFull as exc:
        if exc.reason == "locked":
            print(
                f"{path} is in use by a running bridge: stop it first "
                "(the spool has one owner at a time)",
                file=sys.stderr,
            )
            return 1
        raise
    try:
        if args.action == "list":
            rows = spool.quarantined()
            for q in rows:
                line = {
                    "id": q.seq,
                    "quarantined_at": datetime.datetime.fromtimestamp(
                        q.quarantined_at, datetime.UTC
                    ).isoformat(timespec="seconds"),
                    "reason": q.reason,
                    "dead_copy": q.dead_copy,
                    "routing_key": _printable(q.routing_key),
                    "message_id": _printable(q.message_id),
                    "size": q.size,
                }
                print(orjson.dumps(line).decode())
            print(f"{len(rows)} quarantined, {spool.depth} spooled", file=sys.stderr)
            return 0
        ids = None if args.all else args.ids
        if not ids and not args.all:
            print("name the ids to act on, or --all", file=sys.stderr)
            return 2
        if args.action == "requeue":
            new = spool.requeue(ids)
            print(f"{len(new)} event(s) back in the spool: published when the bridge starts")
        else:
            done = spool.drop(ids if ids is not None else [q.seq for q in spool.quarantined()])
            print(f"{done} event(s) deleted from the quarantine")
        return 0
    finally:
        spool.close()


def _printable(value: object, limit: int = 120) -> str:
    """A stored value for a terminal: text without control characters, cut short."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cmd_topology(args: argparse.Namespace) -> int:
    """Print the topology the bridge declares: RabbitMQ definitions JSON with --export."""
    from urllib.parse import unquote, urlsplit

    import orjson

    from bridge import topology

    settings = _settings(args)
    # The same data every role declares from: the history stream and the reconciler's queues too.
    topo = topology.build(settings.amqp, settings.history, sources=settings.sources)
    if args.export:
        # The vhost of amqp.url (its path, "/" when empty), unless given; never the URL itself.
        path = urlsplit(settings.amqp.endpoints()[0]).path
        vhost = args.vhost if args.vhost is not None else (unquote(path[1:]) or "/")
        out = orjson.dumps(topology.definitions(topo, vhost), option=orjson.OPT_INDENT_2)
        sys.stdout.write(out.decode() + "\n")
        return 0
    for e in topo.exchanges:
        print(f"exchange {e.name} ({e.type.value}) {orjson.dumps(e.arguments).decode()}")
    for q in topo.queues:
        print(f"queue    {q.name} {orjson.dumps(q.arguments).decode()}")
    for b in topo.bindings:
        print(f"binding  {b.exchange} -> {b.queue} [{b.routing_key}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simotel-bridge",
        description="Simotel webhooks, dialplan components and API v4 over RabbitMQ.",
    )
    parser.add_argument("--version", action="version", version=f"simotel-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "-c",
            "--config",
            type=Path,
            help="YAML configuration (default: $SIMOTEL_BRIDGE_CONFIG, else ./config.yaml)",
        )
        return p

    add("run", "ingress, component RPC and worker in one process").set_defaults(
        func=lambda a: _run_roles(a, frozenset({"ingress", "worker"}))
    )
    add("ingress", "the HTTP ingress only (events and components)").set_defaults(
        func=lambda a: _run_roles(a, frozenset({"ingress"}))
    )
    add("worker", "the command worker only").set_defaults(
        func=lambda a: _run_roles(a, frozenset({"worker"}))
    )
    add("check-config", "validate the configuration, print each problem with its key").set_defaults(
        func=cmd_check_config
    )
    p = add("send", "publish a command, wait for its result and print it")
    p.add_argument("action", help="an API v4 path, e.g. call/originate/act")
    p.add_argument("data", nargs="?", help="the request body as a JSON object (default {})")
    p.add_argument("--source", help="the PBX to call (default: the only configured source)")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait (also the deadline)"
    )
    p.add_argument("--message-id", help="idempotency key (default: a fresh one)")
    p.add_argument("-o", "--output", type=Path, help="where to write a download's bytes")
    p.set_defaults(func=cmd_send)

    p = add("tail", "print events and results whose routing key matches PATTERN as they flow")
    p.add_argument("pattern", nargs="?", default="#", help="routing-key pattern (default: #)")
    p.add_argument("-n", "--limit", type=int, help="stop after this many messages")
    _add_tail_since(p)
    p.set_defaults(func=cmd_tail)

    _add_replay(add)
    p = add("reconcile", "recover Cdr / CdrQueue events whose webhook never arrived")
    p.add_argument("--once", action="store_true", help="one pass of every feed, then exit")
    p.add_argument(
        "--from",
        dest="from_",
        metavar="START",
        help="one-off back-fill from START (beginning, now or a record _id), then exit",
    )
    p.add_argument("--source", help="with --once / --from: only this source (default: all)")
    p.set_defaults(func=cmd_reconcile)
    p = add("spool", "list, re-queue or drop quarantined spool events (bridge stopped)")
    p.add_argument("action", choices=["list", "requeue", "drop"])
    p.add_argument("ids", nargs="*", type=int, metavar="ID", help="quarantine ids (from list)")
    p.add_argument("--all", action="store_true", help="every quarantined event")
    p.set_defaults(func=cmd_spool)

    p = add("topology", "print the exchanges, queues and bindings the bridge declares")
    p.add_argument(
        "--export", action="store_true", help="as RabbitMQ definitions JSON (import_definitions)"
    )
    p.add_argument("--vhost", help="the vhost to put in the definitions (default: amqp.url's)")
    p.set_defaults(func=cmd_topology)

    p = sub.add_parser(
        "simulate",
        help="a fake Simotel: serves API v4 and sends realistic webhooks",
        description="A fake Simotel: serves API v4 and sends realistic call webhooks to a bridge.",
    )
    p.add_argument("--host", default="127.0.0.1", help="API v4 listen address")
    p.add_argument("--port", type=int, default=8081, help="API v4 port (base path /api/v4/)")
    p.add_argument("--username", default="apiuser", help="API account user")
    p.add_argument("--password", default="change-me", help="API account password")
    p.add_argument("--api-key", default="change-me", help="API account key (X-APIKEY)")
    p.add_argument("--auth", choices=["basic", "apikey", "both"], default="both")
    p.add_argument(
        "--event-url",
        default="http://127.0.0.1:8080/webhooks/simotel/events",
        help="where webhooks go (Simotel's API Address)",
    )
    p.add_argument("--no-webhooks", action="store_true", help="serve the API only")
    p.add_argument("--component-url", help="base of component URLs (default: from --event-url)")
    p.add_argument("--webhook-user", default="simotel")
    p.add_argument("--webhook-password", default="change-me")
    p.add_argument("--delivery", choices=["g4", "rest4", "get", "form"], default="g4")
    p.add_argument(
        "--drop-webhooks", type=float, default=0.0, help="share (0..1) of webhooks lost on the way"
    )
    p.add_argument("--rate", type=float, default=6.0, help="calls per minute")
    p.add_argument("--time-scale", type=float, default=1.0, help="0: no waiting inside calls")
    p.add_argument("--no-components", action="store_true", help="do not call component URLs")
    p.add_argument("--seed", type=int, help="random seed, for repeatable runs")
    p.add_argument("--latency-ms", type=int, default=0, help="added to every API answer")
    p.add_argument("--error-rate", type=float, default=0.0, help="share of API requests -> 5xx")
    p.add_argument("--failure-rate", type=float, default=0.0, help="share -> success: 0")
    p.add_argument("--drop-rate", type=float, default=0.0, help="share -> dropped connection")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.set_defaults(func=cmd_simulate)
    return parser


def _add_tail_since(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--since",
        type=_when,
        help="print the event history from then first (10m, 2h, ISO 8601), then follow live",
    )


def _add_replay(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = add("replay", "re-publish a time window of the event history to an exchange or queue")
    p.add_argument(
        "--since", type=_when, required=True, help="start: 10m, 2h, 1h30m, 7d or ISO 8601"
    )
    p.add_argument("--until", type=_when, help="end, excluded (default: now)")
    p.add_argument("--pattern", default="#", help="routing-key pattern, e.g. *.Cdr (default #)")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-exchange", metavar="X", help="publish to this exchange, original keys")
    to.add_argument("--to-queue", metavar="Q", help="publish straight to this queue")
    p.add_argument("--rate", type=_positive, help="at most this many messages per second")
    p.add_argument("--dry-run", action="store_true", help="print what would be sent, send nothing")
    p.set_defaults(func=cmd_replay)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print("configuration is invalid:", file=sys.stderr)
        for key, message in exc.problems:
            print(f"  {key}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BridgeError as exc:
        print(f"simotel-bridge: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
