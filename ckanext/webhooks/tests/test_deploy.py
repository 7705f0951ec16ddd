"""The deployment files in deploy/: the systemd units, the supervisor program
and the ckan-docker Compose fragment.

* The systemd units are checked by systemd's own ``systemd-analyze verify``
  and ``systemd-analyze security --offline`` (with the placeholder paths made
  real), and read the way systemd reads them: the command line each instance
  runs is expanded from its environment (drop-in included) and parsed by the
  worker command itself.
* The supervisor program runs for real: a supervisord of the test's own (from
  the ``supervisor`` package of dev-requirements.txt) starts the shipped
  section, two processes of it, with only the paths made real. A hook created
  through the live CKAN receives a dataset change; ``supervisorctl stop``
  while a delivery is on the wire waits for it, records it, and leaves no
  worker process behind.
* The Compose fragment is read as Compose reads it (YAML anchors and merge
  keys) and its commands parsed by the worker command.
"""
from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import ckanapi
import pytest
import yaml

from . import processes
from .waiting import until

DEPLOY = processes.ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
TEMPLATE = SYSTEMD / "ckanext-webhooks-worker@.service"
BEAT_DROP_IN = SYSTEMD / "ckanext-webhooks-worker@1.service.d" / "beat.conf"
TARGET = SYSTEMD / "ckanext-webhooks.target"
SUPERVISOR = DEPLOY / "supervisor" / "ckanext-webhooks.conf"
COMPOSE = DEPLOY / "docker-compose.webhooks.yml"

# The placeholders of the shipped files (CKAN's source install layout).
CKAN_BIN = "/usr/lib/ckan/default/bin/ckan"
CKAN_INI = "/etc/ckan/default/ckan.ini"


def _default_timeout() -> float:
    declaration = yaml.safe_load(
        (processes.ROOT / "ckanext" / "webhooks" / "config_declaration.yaml").read_text())
    for group in declaration["groups"]:
        for option in group["options"]:
            if option["key"] == "ckanext.webhooks.timeout":
                return float(option["default"])
    raise AssertionError("ckanext.webhooks.timeout is not declared")


# What a clean stop needs at the default timeout (see shutdown.py, README).
STOP_NEEDS = 2 * _default_timeout() + 30


_wait = until


def _worker_args(argv: list[str]) -> dict:
    """The options ``ckan ... webhooks worker ARGS`` is given, as the command
    itself parses them (an unknown or misspelt option fails here)."""
    from ckanext.webhooks.cli import webhooks
    assert "webhooks" in argv and argv[argv.index("webhooks") + 1] == "worker", argv
    args = argv[argv.index("webhooks") + 2:]
    command = webhooks.commands["worker"]
    return command.make_context("worker", list(args)).params


# --- systemd --------------------------------------------------------------------------

def _unit(*paths: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in the order systemd reads them, drop-ins last."""
    entries = []
    for path in paths:
        section, pending = None, ""
        for raw in path.read_text().splitlines():
            line = pending + raw.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            entries.append((section, key.strip(), value.strip()))
    return entries


def _last(entries, section: str, key: str):
    values = [v for s, k, v in entries if s == section and k == key]
    return values[-1] if values else None


def _environment(entries) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in (v for s, k, v in entries if s == "Service" and k == "Environment"):
        if not value:
            env.clear()  # an empty assignment resets the list
        for assignment in shlex.split(value):
            name, _, setting = assignment.partition("=")
            env[name] = setting
    return env


def _exec_start(entries, instance: str) -> list[str]:
    """ExecStart as systemd expands it: ``$VAR`` alone is split into zero or
    more words, ``${VAR}`` is one word, ``%i`` is the instance."""
    env = _environment(entries)
    argv = []
    for word in shlex.split(_last(entries, "Service", "ExecStart").replace("%i", instance)):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            argv += env.get(whole.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                               lambda m: env.get(m.group(1), ""), word))
    return argv


def _seconds(value: str) -> float:
    """A systemd or Compose time span: 90, 90s, 1min 30s, 1m30s."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts and "".join(n + u for n, u in parts) == re.sub(r"\s", "", value), value
    return sum(float(number) * units[unit] for number, unit in parts)


def test_systemd_units_say_what_a_clean_stop_needs():
    """Read as systemd reads them: instance 1 runs beat, every other instance
    does not, and each runs the worker command with options it accepts; the
    stop settings leave the clean shutdown its time."""
    template = _unit(TEMPLATE)
    first, second = _unit(TEMPLATE, BEAT_DROP_IN), template
    for key, expected in {"Type": "exec", "User": "ckan", "Group": "ckan",
                          "KillSignal": "SIGTERM", "KillMode": "mixed",
                          "Restart": "always", "NoNewPrivileges": "yes",
                          "PrivateTmp": "yes", "ProtectSystem": "full"}.items():
        assert _last(template, "Service", key) == expected, key
    assert _seconds(_last(template, "Service", "TimeoutStopSec")) >= STOP_NEEDS
    assert _last(template, "Unit", "PartOf") == "ckanext-webhooks.target"
    assert _last(template, "Install", "WantedBy") == "ckanext-webhooks.target"
    assert _last(_unit(TARGET), "Install", "WantedBy") == "multi-user.target"
    for entries, instance, beat in ((first, "1", True), (second, "2", False),
                                    (second, "3", False)):
        argv = _exec_start(entries, instance)
        assert argv[:3] == [CKAN_BIN, "-c", CKAN_INI], argv
        assert _worker_args(argv)["beat"] is beat, (instance, argv)


@pytest.fixture
def real_units(tmp_path):
    """The units with the placeholders made real: the virtualenv's ckan (it
    must exist and be executable) and the suite's ini."""
    units = tmp_path / "units"
    shutil.copytree(SYSTEMD, units)
    template = units / TEMPLATE.name
    text = template.read_text()
    assert CKAN_BIN in text and CKAN_INI in text
    template.write_text(text.replace(CKAN_BIN, str(processes.BIN / "ckan"))
                        .replace(CKAN_INI, str(processes.TEST_INI)))
    return units


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here (Debian's systemd package has "
                    "it): test_systemd_units_say_what_a_clean_stop_needs still read the "
                    "units, systemd itself did not")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_finds_nothing(real_units):
    """systemd's own check of the units, the instances and the target: no error
    and no warning (an unknown key, a bad value or a missing executable is
    one)."""
    units = [real_units / "ckanext-webhooks-worker@1.service",
             real_units / "ckanext-webhooks-worker@2.service",
             real_units / TARGET.name]
    result = _systemd_analyze("verify", "--man=no", *map(str, units))
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr
    # The drop-in directory is instance 1's: systemd reads it for @1 only.
    canary = real_units / BEAT_DROP_IN.parent.name / BEAT_DROP_IN.name
    canary.write_text(canary.read_text() + "DeployTestCanary=1\n")
    for instance, read in (("1", True), ("2", False)):
        result = _systemd_analyze(
            "verify", "--man=no", str(real_units / f"ckanext-webhooks-worker@{instance}.service"))
        assert ("DeployTestCanary" in result.stderr) is read, (instance, result.stderr)


def test_systemd_analyze_security_rates_the_hardening_ok(real_units):
    """The hardening options are understood by systemd and rate "OK" or better
    (exposure at most 4.0 of 10)."""
    for instance in ("1", "2"):
        result = _systemd_analyze("security", "--offline=yes", "--threshold=40", "--no-pager",
                                  str(real_units / f"ckanext-webhooks-worker@{instance}.service"))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr


# --- ckan-docker Compose fragment -----------------------------------------------------

def test_compose_fragment_runs_one_beat_and_stops_cleanly():
    """Read as Compose reads it: the default worker runs beat, the scale-out
    one (behind a profile) does not, both run the worker command with options
    it accepts, and both leave the clean shutdown its time."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"ckan-webhooks-worker", "ckan-webhooks-worker-extra"}
    beats = {}
    for name, service in services.items():
        shell = service["command"]
        assert shell[:2] == ["/bin/sh", "-c"], shell
        # Compose turns $$ into $ before the shell sees it.
        script = shell[2].replace("$$", "$")
        assert script.count("exec ") == 1, script
        argv = shlex.split(script.split("exec ", 1)[1])
        assert argv[:3] == ["ckan", "-c", "/srv/app/ckan.ini"], argv
        beats[name] = _worker_args(argv)["beat"]
        assert service["build"]["context"] == "ckan/" and ".env" in service["env_file"]
        assert service["stop_signal"] == "SIGTERM" and service["init"] is True
        assert _seconds(service["stop_grace_period"]) >= STOP_NEEDS
        assert service["restart"] == "unless-stopped"
        assert {"db", "redis", "ckan"} <= set(service["depends_on"])
        assert "ckannet" in service["networks"]  # not internal: receivers are outside
    assert beats == {"ckan-webhooks-worker": True, "ckan-webhooks-worker-extra": False}
    assert "profiles" not in services["ckan-webhooks-worker"]
    assert services["ckan-webhooks-worker-extra"]["profiles"]


def test_the_three_stop_timeouts_agree():
    supervisor = re.search(r"^stopwaitsecs\s*=\s*(\d+)", SUPERVISOR.read_text(), re.M)
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["ckan-webhooks-worker"]
    timeouts = {_seconds(_last(_unit(TEMPLATE), "Service", "TimeoutStopSec")),
                float(supervisor.group(1)), _seconds(compose["stop_grace_period"])}
    assert len(timeouts) == 1 and timeouts.pop() >= STOP_NEEDS


# --- supervisor, for real -------------------------------------------------------------

PROGRAM = "ckanext-webhooks-worker"


class Supervisor:
    """A supervisord of the test's own running the shipped program section,
    paths made real."""

    def __init__(self, workdir: Path, ini: Path, numprocs: int) -> None:
        self.workdir = workdir
        self.logs = processes.LOGS / f"supervisor-{int(time.time() * 1000)}"
        self.logs.mkdir(parents=True)
        section = SUPERVISOR.read_text()
        replacements = {CKAN_BIN: str(processes.BIN / "ckan"), CKAN_INI: str(ini),
                        "\nuser=ckan\n": f"\nuser={getpass.getuser()}\n",
                        "/var/log/ckan/": f"{self.logs}/",
                        "\nnumprocs=1\n": f"\nnumprocs={numprocs}\n"}
        for placeholder, real in replacements.items():
            assert placeholder in section, f"{placeholder!r} is not in {SUPERVISOR.name}"
            section = section.replace(placeholder, real)
        (workdir / "ckanext-webhooks.conf").write_text(section)
        self.conf = workdir / "supervisord.conf"
        self.conf.write_text("\n".join([
            "[unix_http_server]", f"file = {workdir}/supervisor.sock", "chmod = 0700", "",
            "[supervisord]", f"logfile = {self.logs}/supervisord.log",
            f"pidfile = {workdir}/supervisord.pid", f"childlogdir = {self.logs}",
            "nodaemon = true", "loglevel = info", "",
            "[supervisorctl]", f"serverurl = unix://{workdir}/supervisor.sock", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "", "[include]", f"files = {workdir}/ckanext-webhooks.conf", ""]))
        self.names = [f"{PROGRAM}-{n:02d}" for n in range(numprocs)]
        self.groups: set[int] = set()  # process groups of the workers seen
        self.started = time.time()
        self.daemon = processes.Process(
            "supervisord", [str(processes.BIN / "supervisord"), "-n", "-c", str(self.conf)])

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([str(processes.BIN / "supervisorctl"), "-c", str(self.conf),
                               *args], capture_output=True, text=True, timeout=timeout)

    def program_log(self, name: str, stream: str = "stderr") -> str:
        number = name.rsplit("-", 1)[1]
        path = self.logs / f"{PROGRAM}-{number}.{stream}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log(self) -> str:
        path = self.logs / "supervisord.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pid(self, name: str) -> int:
        result = self.ctl("pid", f"{PROGRAM}:{name}")
        return int(result.stdout.strip()) if result.stdout.strip().isdigit() else 0

    def ready(self) -> bool:
        """Every process RUNNING for supervisor (up for startsecs) and ready."""
        assert self.daemon.alive(), self.daemon.output()[-3000:]
        if not all("worker ready" in self.program_log(name) for name in self.names):
            return False  # (the logs first: cheaper than a supervisorctl)
        status = self.ctl("status").stdout
        return all(re.search(rf"{name}\s+RUNNING", status) for name in self.names)

    def shutdown(self) -> None:
        """Stop everything, whatever state the test left it in."""
        if self.daemon.alive():
            try:
                self.ctl("stop", f"{PROGRAM}:*", timeout=150)
                self.ctl("shutdown", timeout=30)
                self.daemon.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.daemon.stop()
        for group in self.groups:  # nothing of a worker may outlive the test
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for path in _beat_schedule(group, self.started):
                path.unlink()


def _beat_schedule(worker_pid: int, since: float) -> list[Path]:
    """The beat schedule files of a worker (worker.py names them after its
    pid) written since ``since``: older ones are another process's that had
    the same pid."""
    return [path for path in Path(tempfile.gettempdir()).glob(
        f"ckanext-webhooks-beat-{worker_pid}.*") if path.stat().st_mtime >= since]


def _processes_in_group(group: int) -> list[int]:
    """Live processes whose process group is ``group`` (zombies are gone)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == group:
            found.append(int(entry.name))
    return found


@pytest.fixture
def supervisor(tmp_path, webhooks_tables, only_my_workers):
    """supervisord running two processes of the shipped program on an ini of
    the test's own (its own queue), over the suite's database."""
    ini = processes.write_ini({"ckanext.webhooks.celery.queue": f"deploy-{uuid.uuid4().hex[:8]}"})
    started = Supervisor(tmp_path, ini, numprocs=2)
    try:
        yield started
    finally:
        started.shutdown()


@pytest.mark.usefixtures("no_leftover_hooks")
def test_supervisor_runs_the_workers_and_stops_them_cleanly(
        supervisor, live_ckan, receiver, sysadmin_token, organization):
    _wait(supervisor.ready, 90, "both workers of the supervisor program running and ready",
          interval=0.5)
    pids = {name: supervisor.pid(name) for name in supervisor.names}
    assert all(pids.values()), pids
    for pid in pids.values():
        # supervisor makes each program process a process group of its own;
        # the worker's pool processes (and beat) are in it.
        assert os.getpgid(pid) == pid
        supervisor.groups.add(pid)
    # Exactly one of the two runs the periodic tasks (process 00, --beat): its
    # embedded beat, a process of its own, keeps its schedule in a file named
    # after the worker (worker.py); the other has its pool processes only.
    since = supervisor.started - 1  # file times may be coarser than time.time()
    _wait(lambda: _beat_schedule(pids[f"{PROGRAM}-00"], since), 30, "worker 00 runs beat")
    assert not _beat_schedule(pids[f"{PROGRAM}-01"], since)
    pool = int(re.search(r"concurrency: (\d+) \(prefork\)",
                         supervisor.program_log(f"{PROGRAM}-00", "stdout")).group(1))
    members = {name: len(_processes_in_group(pid)) for name, pid in pids.items()}
    assert members == {f"{PROGRAM}-00": 1 + pool + 1, f"{PROGRAM}-01": 1 + pool}, members

    # A hook created through the live CKAN receives a dataset change.
    anon = ckanapi.RemoteCKAN(live_ckan)
    admin = ckanapi.RemoteCKAN(live_ckan, apikey=sysadmin_token["token"])
    quick = anon.action.webhook_create(topic="dataset/update", address=receiver.url("/quick"))
    dataset = admin.action.package_create(name=f"deploy-{uuid.uuid4().hex[:12]}",
                                          owner_org=organization["id"])
    admin.action.package_patch(id=dataset["id"], notes="changed under supervisor")
    [received] = receiver.wait_count("/quick", 1, timeout=30)
    assert received.json["webhook_id"] == quick
    assert received.json["topic"] == "dataset/update"
    assert received.json["data"]["notes"] == "changed under supervisor"

    # supervisorctl stop while a delivery is on the wire: the stop waits for
    # its answer, records it, and the workers exit 0 (no SIGKILL).
    answer_after = 4.0
    receiver.delay_for["/slow"] = answer_after
    slow = anon.action.webhook_create(topic="dataset/update", address=receiver.url("/slow"))
    admin.action.package_patch(id=dataset["id"], notes="changed again")
    [on_the_wire] = receiver.wait_count("/slow", 1, timeout=30)
    result = supervisor.ctl("stop", f"{PROGRAM}:*", timeout=150)
    stopped = time.monotonic()
    assert result.returncode == 0, result.stdout + result.stderr
    assert stopped >= on_the_wire.at + answer_after, "the stop did not wait for the answer"
    log = supervisor.log()
    for name in supervisor.names:
        assert f"stopped: {name} (exit status 0)" in log, log[-3000:]
        output = supervisor.program_log(name) + supervisor.program_log(name, "stdout")
        assert "Warm shutdown" in output
        assert "Traceback" not in output and "WorkerLostError" not in output, output[-3000:]
        # SIGTERM reached the main process only (stopasgroup=false): no pool
        # process was killed by it ("exited with 'signal 15 (SIGTERM)'").
        assert "signal 15" not in output, output[-3000:]
    assert "SIGKILL" not in log, log[-3000:]
    # Every process of both workers is gone: the pool processes too.
    leftovers = {pid: _processes_in_group(pid) for pid in pids.values()}
    assert not any(leftovers.values()), leftovers
    # The answer that came in during the stop was recorded: nothing of the
    # hook is left to send, nothing will be sent twice.
    statistics = anon.action.webhook_show(id=slow)["statistics"]
    assert statistics["successes"] == 1 and statistics["last_status"] == 200, statistics
    assert statistics["pending_deliveries"] == 0, statistics
    assert len(receiver.on("/slow")) == 1
