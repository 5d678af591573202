"""The `simotel-bridge` command line (CONTRACT §5)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bridge import __version__
from bridge.config import Settings, default_config_path, load_settings
from bridge.errors import ConfigError


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or default_config_path()
    return load_settings(path)


def _configure_logs(settings: Settings) -> None:
    from bridge import logs

    logs.configure(settings.log)


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    path = args.config or default_config_path() or "(defaults and environment)"
    print(f"{path}: ok ({len(settings.sources)} source(s): {', '.join(settings.sources)})")
    return 0


def _run_roles(args: argparse.Namespace, roles: frozenset[str]) -> int:
    from bridge.runtime import install_signals, serve

    settings = _settings(args)
    _configure_logs(settings)

    async def main() -> None:
        stop = asyncio.Event()
        install_signals(stop)
        await serve(settings, roles, stop)

    _run(main())
    return 0


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency via uvicorn[standard]
        asyncio.run(coro)  # type: ignore[arg-type]


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
    return parser


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
    return code


if __name__ == "__main__":
    sys.exit(main())
