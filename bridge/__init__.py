"""simotel-bridge: Simotel webhooks, dialplan components and API v4 over RabbitMQ."""

__version__ = "0.1.0"
