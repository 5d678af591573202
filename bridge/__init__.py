"""simotel-bridge: Simotel webhooks, dialplan components and API v4 over RabbitMQ.

Module map (every module of the package; tests/test_module_map.py keeps it true). Pure
modules do no I/O; the others are thin adapters around them. The contract and the Simotel
reference the comments cite are in docs/contract.md and docs/simotel/.

The vocabulary, shared with the client library (pure, no I/O):
    wire                 the wire budget and vocabulary: names, routing keys, headers, components
    errors               every exception, under BridgeError
    catalog              the Simotel API v4 endpoints the worker may call (api_v4_catalog.json)

Webhooks -> the events exchange:
    translate            webhook -> publish: payload parsing, event names, headers (pure)
    ingress              the Starlette app Simotel talks to: webhooks and component requests
    eventroute           the event webhooks' lean path, a plain ASGI handler in front of Starlette
    httpserver           uvicorn inside the running loop, on a socket bound before it starts
    sink                 makes an accepted event durable before the 200: broker or spool
    spool                the local SQLite spool of events the broker could not take yet
    unrouted             watching simotel.unrouted (events no queue is bound for)

Dialplan components -> RPC over RabbitMQ:
    components           requests published, answers awaited, fallback at the deadline
    answers              the pure part: fallbacks, deadlines, judging a reply, request headers

Commands -> Simotel API v4 -> results:
    commands             the worker's pure core: parsing, HTTP request, interpretation, results
    worker               the command worker: consume, de-duplicate, execute
    settle               the one decision per delivery: ack, hand back or dead-letter
    simotel              the Simotel API client (httpx), one per source
    state                the worker's and reconciler's state: one interface ...
    state.sqlite         ... in one SQLite file (the default)
    state.postgres       ... in PostgreSQL, shared by several workers
    dedupe               old name of `state`, re-exported for one release
    send                 `simotel-bridge send`: bridge.client.send_command with the config's names

History and recovery:
    historystats         metrics of the history stream
    replay               `simotel-bridge replay`: a window of history re-published
    tail                 `simotel-bridge tail`: follow events and results (live or from history)
    reconcile            the reconciler: Cdr / CdrQueue recovered from Simotel's reports
    cdr                  a report record -> the event its webhook would have been (pure)

The process:
    config               the configuration (YAML + environment), validated once
    topology             exchanges, queues and bindings as data, and their declaration
    amqp                 the broker connection and the confirmed publisher
    runtime              the roles in one process, ordered start and shutdown
    supervisor           `http.workers: N`: N ingress processes on one port, each its own spool
    signals              SIGINT/SIGTERM: graceful stop first, exit at once on the second
    metrics              Prometheus metrics
    logs                 structlog, configured once
    cli                  the `simotel-bridge` command line
    __main__             `python -m bridge`

The client library (bridge.client: aio-pika, orjson and the vocabulary only):
    client               what a service imports: `from bridge.client import ...`
    client.responder     answering dialplan components (Responder, typed answers)
    client.smartapi      the SmartApi command language: typed commands, builder, parser
    client.answers       the rules a component answer must follow (the bridge applies them too)
    client.send          send_command: one command to the worker, its result back
    client.history       reading a time window of the simotel.history stream
    responder            old path of client.responder, re-exported for one release
    smartapi             old path of client.smartapi, re-exported for one release
    history              old path of client.history, re-exported for one release

A Simotel in a box (`simotel-bridge simulate`, for tests, demos and benchmarks):
    simulator            the simulated Simotel: API v4 server and call generator
    simulator.api        the API v4 over HTTP (Starlette)
    simulator.handlers   API v4 behaviour: one request -> one answer
    simulator.state      the simulated Simotel's memory
    simulator.reports    searching, paging, cursors and the report endpoints
    simulator.replies    the simulated API's answers as plain values
    simulator.media      files it serves (recordings, announcements)
    simulator.faults     fault injection, one pure decision per request
    simulator.flows      call flows as pure generators
    simulator.scenarios  the call scenarios the generator plays
    simulator.calls      the call generator's I/O side: flows -> HTTP requests to the bridge
    simulator.options    what a simulated Simotel is told at start
"""

from importlib.metadata import PackageNotFoundError, version

try:
    # One source for the version: pyproject.toml, as installed.
    __version__ = version("simotel-bridge")
except PackageNotFoundError:  # pragma: no cover - a checkout used without installing it
    __version__ = "0+unknown"
