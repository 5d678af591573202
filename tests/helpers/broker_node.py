"""A throwaway RabbitMQ node of a test's own, for tests that stop and start the broker.

The system broker (127.0.0.1:5672) is shared with other engineers and CI: it is never stopped.
`PrivateBroker` runs a second node on this machine with its own node name, free ports, data and
log directories and Erlang cookie, all under a temporary directory, ignoring
/etc/rabbitmq/rabbitmq-env.conf. `stop()` and `start()` keep its data (durable queues and
persistent messages survive, as on a real restart); the fixture kills it whatever happens.

    def test_x(private_broker: PrivateBroker) -> None:
        url = private_broker.url          # amqp://guest:guest@127.0.0.1:<port>/
        private_broker.stop()             # graceful (rabbitmqctl stop), or stop(kill=True)
        private_broker.start()            # same data dir, same port
        private_broker.freeze() / thaw()  # SIGSTOP / SIGCONT: a hung broker

A start takes about 5-7 s on this machine (measured and kept in `start_seconds`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SBIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class PrivateBroker:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.node = f"bridge-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.start_seconds: list[float] = []
        self._proc: subprocess.Popen[bytes] | None = None
        (base / "rabbitmq-env.conf").write_text("# empty: the system file must not apply\n")
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        # Erlang reads the cookie from $HOME; a private HOME gives a private cookie.
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(base),
            "LANG": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(base / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SBIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> float:
        """Start the node (on its existing data, if any) and wait until it serves AMQP.
        Returns the seconds it took."""
        if self.running:
            raise RuntimeError("the private broker is already running")
        started = time.monotonic()
        with (self.base / "stdout.log").open("ab") as out:
            self._proc = subprocess.Popen(
                [str(SBIN / "rabbitmq-server")],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed as a whole
            )
        deadline = started + START_TIMEOUT
        while not _port_open(self.port):  # bounded poll: the listener opens last
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"private broker did not start; see {self.base}/log")
            time.sleep(0.1)
        ready = self.ctl(
            "await_startup", "--timeout", str(int(START_TIMEOUT)), timeout=START_TIMEOUT
        )
        if ready.returncode != 0:
            self.kill()
            raise RuntimeError(f"private broker not ready: {ready.stderr}")
        took = time.monotonic() - started
        self.start_seconds.append(took)
        return took

    def stop(self, *, kill: bool = False) -> None:
        """Stop the node: gracefully (connections closed by the broker), or with SIGKILL
        (connections just vanish, as when the machine dies)."""
        if not self.running:
            return
        if not kill:
            self.ctl("stop", timeout=60)
        self.kill()

    def freeze(self) -> None:
        """SIGSTOP the node: connections stay open but nothing answers, as with a hung broker
        or a silent network partition. Only heartbeats and timeouts can tell."""
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None:
            os.killpg(self._proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the node's whole process group and wait for it; safe to call any time."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # The beam process is in the same group; make sure it is gone before a restart.
        deadline = time.monotonic() + 30
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._proc = None


@contextlib.contextmanager
def private_broker_node() -> Iterator[PrivateBroker]:
    base = Path(tempfile.mkdtemp(prefix="bridge-rmq-"))
    node = PrivateBroker(base)
    try:
        node.start()
        yield node
    finally:
        node.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def private_broker() -> Iterator[PrivateBroker]:
    """A running private RabbitMQ node for one test, torn down afterwards whatever happens."""
    with private_broker_node() as node:
        yield node
