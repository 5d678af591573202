"""Helpers shared by the tests, imported one way: `from tests.helpers.<module> import ...`.

env           where the test broker is, the Simotel fixtures, `make_settings`, rabbitmqctl
taps          reading what reached the broker (`tap`, `drain`)
worker        a fake Simotel over real HTTP, a command bus, a worker assembled in-process
sink          the ingress sink stack and the audit queue used by the durability tests
simulator     clients of the built-in Simotel simulator and the webhook receiver
attack        the attack suite's world: a full bridge, its settings, `attack`
broker_node   a private RabbitMQ node for tests that stop or kill a broker
cluster       a private 3-node RabbitMQ cluster
node_tools    the Node.js tools (AsyncAPI validation) installed on demand
"""
