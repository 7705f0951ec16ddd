"""Real processes for the tests: a CKAN server, a Celery worker, a private
Redis, the Solr stand-in. All listen on loopback only."""
from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[3]
# scripts/test names the ini of the CKAN version under test (test-2.11.ini on 2.11).
TEST_INI = Path(os.environ.get("WEBHOOKS_TEST_INI") or ROOT / "test.ini")
BIN = Path(sys.executable).parent
ARTIFACTS = Path(os.environ.get("WEBHOOKS_ARTIFACTS") or ROOT / "test-artifacts")
LOGS = ARTIFACTS / "logs"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


_closed: dict[str, socket.socket] = {}


def closed_port(host: str = "127.0.0.2") -> int:
    """A port of ``host`` that refuses every connection, held by this process
    for its lifetime (bound, never listening), so no other program can take
    it: the address of a hook whose deliveries must fail to connect."""
    if host not in _closed:
        sock = socket.socket()
        sock.bind((host, 0))
        _closed[host] = sock
    return _closed[host].getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 60.0, host: str = "127.0.0.1",
              proc: Optional[subprocess.Popen] = None) -> None:
    """Wait until ``host:port`` answers. With ``proc``: until ``proc`` (or a
    process it started) listens there and nobody else does, so a server left
    over from another run, or one that took the port first, is never taken for
    the one just started; ``proc`` exiting first is an error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is None:
            if port_open(port, host):
                return
        elif owns_port(proc.pid, port, host) and port_open(port, host):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before it listened on "
                               f"{host}:{port}{_held_by(port, host)}")
        time.sleep(0.2)
    raise RuntimeError(f"port {host}:{port} was not {'answered' if proc is None else 'owned'} "
                       f"within {timeout}s{_held_by(port, host)}")


# Port ownership, read from /proc (Linux): the listening sockets on a port
# (/proc/net/tcp, tcp6) and the socket inodes a process holds (/proc/PID/fd).

def _proc_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def listening_sockets(port: int, host: str = "127.0.0.1") -> set[int]:
    """Inodes of the sockets listening where a connection to ``host:port``
    may land (that address, or a wildcard one)."""
    wanted = ipaddress.ip_address(host)
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            local = _proc_address(address)
            if local == wanted or local.is_unspecified:
                found.add(int(fields[9]))
    return found


def process_tree(pid: int) -> set[int]:
    """``pid``, its descendants, and the members of its session (a child that
    daemonized still belongs to it: :class:`Process` starts a new session)."""
    parents, sessions = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(entry.name)], sessions[int(entry.name)] = int(fields[1]), int(fields[3])
    tree = {pid} | {other for other, session in sessions.items() if session == pid}
    grown = True
    while grown:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grown = bool(more)
    return tree


def _socket_inodes(pid: int) -> dict[int, int]:
    """{socket inode: pid} of the sockets ``pid`` holds (none if unreadable)."""
    inodes = {}
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes[int(target[8:-1])] = pid
    return inodes


def owns_port(pid: int, port: int, host: str = "127.0.0.1") -> bool:
    """Whether every socket listening for ``host:port`` belongs to ``pid`` or
    to a process it started (and there is at least one)."""
    listening = listening_sockets(port, host)
    if not listening:
        return False
    held: set[int] = set()
    for member in process_tree(pid):
        held |= _socket_inodes(member).keys()
    return listening <= held


def port_holders(port: int, host: str = "127.0.0.1") -> list[str]:
    """Who listens for ``host:port``: "pid (command line)" each, or "an
    unreadable process" for a socket no readable /proc/PID/fd holds."""
    listening = listening_sockets(port, host)
    holders = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and listening:
            for inode in _socket_inodes(int(entry.name)).keys() & listening:
                try:
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    command = "?"
                holders[inode] = f"{entry.name} ({command.strip()[:120]})"
    return [holders.get(inode, "an unreadable process") for inode in sorted(listening)]


def _held_by(port: int, host: str) -> str:
    holders = port_holders(port, host)
    return f"; it is held by {', '.join(holders)}" if holders else ""


def write_ini(overrides: dict[str, str], base: Path = TEST_INI) -> Path:
    """An ini that is ``base`` plus ``overrides``, in a temporary file."""
    fd, path = tempfile.mkstemp(prefix="webhooks-test-", suffix=".ini")
    lines = ["[app:main]", f"use = config:{base}"]
    lines += [f"{key} = {value}" for key, value in overrides.items()]
    # Logging sections are not inherited through "use".
    lines += ["", "[loggers]", "keys = root", "", "[handlers]", "keys = console", "",
              "[formatters]", "keys = generic", "", "[logger_root]", "level = INFO",
              "handlers = console", "", "[handler_console]", "class = StreamHandler",
              "args = (sys.stderr,)", "level = NOTSET", "formatter = generic", "",
              "[formatter_generic]",
              "format = %(asctime)s %(levelname)-5.5s [%(name)s] %(message)s", ""]
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines))
    return Path(path)


_running: list["Process"] = []


@atexit.register
def _stop_leftovers() -> None:
    """No child outlives the test run, whatever failed."""
    for proc in list(_running):
        proc.kill()


class Process:
    """A child process with its output in test-artifacts/logs."""

    def __init__(self, name: str, argv: list[str], env: Optional[dict] = None) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOGS / f"{name}-{int(time.time() * 1000)}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env=dict(os.environ, **(env or {})), start_new_session=True)
        _running.append(self)

    def pids(self) -> set[int]:
        """The process and those it started (a worker's pool, for one)."""
        return process_tree(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self in _running:
            _running.remove(self)
        self._log.close()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


def start_solr_standin(port: int = 18983) -> Process:
    """A stand-in of this run's own: one already on ``port`` (another run's,
    the demo's) is never shared, since its owner may stop it at any time."""
    proc = Process("solr-standin", [sys.executable, str(ROOT / "dev" / "solr_standin.py"),
                                    "--port", str(port)])
    _wait_or_stop(proc, port, 15)
    return proc


def _wait_or_stop(proc: Process, port: int, timeout: float) -> None:
    try:
        wait_port(port, timeout, proc=proc.proc)
    except RuntimeError as failed:
        proc.stop()
        raise RuntimeError(f"{proc.name} did not start: {failed}\n{proc.output()[-3000:]}")


def start_worker(ini: Path = TEST_INI, concurrency: Optional[int] = 2, name: str = "worker",
                 extra: tuple[str, ...] = (), env: Optional[dict] = None) -> Process:
    """``concurrency=None`` is the worker's default setup (a process per core);
    ``env``: variables to set beside the test process's own."""
    argv = [str(BIN / "ckan"), "-c", str(ini), "webhooks", "worker", "--loglevel=INFO", *extra]
    if concurrency:
        argv.insert(-1 - len(extra), f"--concurrency={concurrency}")
    proc = Process(name, argv, env)
    deadline = time.monotonic() + 60
    while "worker ready" not in proc.output():
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"worker did not start:\n{proc.output()[-3000:]}")
        time.sleep(0.2)
    return proc


def start_ckan(ini: Path = TEST_INI, port: Optional[int] = None,
               env: Optional[dict] = None) -> Process:
    """``port``: by default that of the suite's ``ckan.site_url`` (a test slot
    has its own); ``env``: variables to set beside the test process's own."""
    if port is None:
        from ckan.plugins import toolkit
        port = urlsplit(toolkit.config["ckan.site_url"]).port
    proc = Process("ckan", [str(BIN / "ckan"), "-c", str(ini), "run", "-H", "127.0.0.1",
                            "-p", str(port), "--disable-reloader"], env)
    _wait_or_stop(proc, port, 90)
    return proc


def start_redis(port: int) -> Process:
    redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = Process(f"redis-{port}", [redis_server, "--bind", "127.0.0.1", "--port", str(port),
                                     "--save", "", "--appendonly", "no"])
    _wait_or_stop(proc, port, 15)
    return proc
