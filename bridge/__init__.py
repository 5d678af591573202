"""simotel-bridge: Simotel webhooks, dialplan components and API v4 over RabbitMQ."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One source for the version: pyproject.toml, as installed.
    __version__ = version("simotel-bridge")
except PackageNotFoundError:  # pragma: no cover - a checkout used without installing it
    __version__ = "0+unknown"
