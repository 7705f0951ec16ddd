"""Real processes for the tests: a CKAN server, a Celery worker, a private
Redis, the Solr stand-in. All listen on loopback only."""
from __future__ import annotations

import atexit
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


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 60.0, host: str = "127.0.0.1",
              proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port, host):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        time.sleep(0.2)
    raise RuntimeError(f"port {host}:{port} did not open within {timeout}s")


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


def start_solr_standin(port: int = 18983) -> Optional[Process]:
    if port_open(port):
        return None  # one is already running (another suite, or the demo)
    proc = Process("solr-standin", [sys.executable, str(ROOT / "dev" / "solr_standin.py"),
                                    "--port", str(port)])
    _wait_or_stop(proc, port, 15)
    return proc


def _wait_or_stop(proc: Process, port: int, timeout: float) -> None:
    try:
        wait_port(port, timeout, proc=proc.proc)
    except RuntimeError:
        proc.stop()
        raise RuntimeError(f"{proc.name} did not start:\n{proc.output()[-3000:]}")


def start_worker(ini: Path = TEST_INI, concurrency: Optional[int] = 2, name: str = "worker",
                 extra: tuple[str, ...] = ()) -> Process:
    """``concurrency=None`` is the worker's default setup (a process per core)."""
    argv = [str(BIN / "ckan"), "-c", str(ini), "webhooks", "worker", "--loglevel=INFO", *extra]
    if concurrency:
        argv.insert(-1 - len(extra), f"--concurrency={concurrency}")
    proc = Process(name, argv)
    deadline = time.monotonic() + 60
    while "worker ready" not in proc.output():
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"worker did not start:\n{proc.output()[-3000:]}")
        time.sleep(0.2)
    return proc


def start_ckan(ini: Path = TEST_INI, port: Optional[int] = None) -> Process:
    """``port``: by default that of the suite's ``ckan.site_url`` (a test slot has its own)."""
    if port is None:
        from ckan.plugins import toolkit
        port = urlsplit(toolkit.config["ckan.site_url"]).port
    proc = Process("ckan", [str(BIN / "ckan"), "-c", str(ini), "run", "-H", "127.0.0.1",
                            "-p", str(port), "--disable-reloader"])
    _wait_or_stop(proc, port, 90)
    return proc


def start_redis(port: int) -> Process:
    redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = Process(f"redis-{port}", [redis_server, "--bind", "127.0.0.1", "--port", str(port),
                                     "--save", "", "--appendonly", "no"])
    _wait_or_stop(proc, port, 15)
    return proc
