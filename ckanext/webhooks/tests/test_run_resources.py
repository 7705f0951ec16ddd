"""What a test run owns: the servers it waits for are the ones it started,
and its ports, Redis database and queue are no other run's (nor the demo's).

``processes.wait_port`` with a process accepts a port only once that process
(or one it started) holds every socket listening there, read from
/proc/net/tcp{,6} and /proc/PID/fd; something else answering is not enough.
scripts/test hands out each run's resources and locks its slot; the tests
below read what it hands out (``WEBHOOKS_TEST_PRINT_INI``), not a copy of it.
"""
from __future__ import annotations

import configparser
import fcntl
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

import ckan
from ckan.plugins import toolkit

from . import processes

ROOT = processes.ROOT
VERSIONS = ("2.12", "2.11")
SLOTS = range(1, 10)


@pytest.fixture
def stranger():
    """A listening socket of this test process, on a free port: a server the
    process a test starts did not open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def _idle() -> processes.Process:
    return processes.Process("idle", [sys.executable, "-c", "import time; time.sleep(120)"])


def test_wait_port_does_not_take_another_process_for_the_one_it_started(stranger):
    """The port answers all along, yet the process started never listens on
    it: waiting fails, naming who holds the port."""
    idle = _idle()
    try:
        assert processes.port_open(stranger)  # answering alone would pass
        with pytest.raises(RuntimeError, match=rf"not owned within 2s; it is held by "
                                               rf"{os.getpid()} "):
            processes.wait_port(stranger, 2, proc=idle.proc)
        assert idle.alive()  # it failed on the owner, not on an exit
    finally:
        idle.stop()


def test_wait_port_accepts_a_listener_its_process_started():
    """A server whose listening socket belongs to a process it started (as
    a pool's processes do) is its own; on a wildcard IPv6 address too."""
    port = processes.free_port()
    listener = (f"import socket, time; s = socket.socket(socket.AF_INET6); "
                f"s.bind(('::', {port})); s.listen(); time.sleep(120)")
    parent = processes.Process("forks", [sys.executable, "-c", (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {listener!r}]); time.sleep(120)")])
    try:
        processes.wait_port(port, 30, proc=parent.proc)
        [holder] = processes.port_holders(port)
        holder_pid = int(holder.split()[0])
        assert holder_pid != parent.proc.pid and holder_pid in parent.pids()
    finally:
        parent.stop()


def test_a_solr_standin_already_on_the_port_is_not_shared(stranger):
    """Another run's (or the demo's) stand-in on the port is not taken for
    this run's: starting one there fails, naming who holds the port."""
    with pytest.raises(RuntimeError, match=rf"solr-standin did not start: .* held by "
                                           rf"{os.getpid()} "):
        processes.start_solr_standin(stranger)


def test_this_runs_solr_standin_is_its_own():
    """The suite's Solr stand-in (conftest.py) listens on this run's port,
    and it is a child of this process."""
    port = int(os.environ["WEBHOOKS_SOLR_PORT"])  # scripts/test sets it for every run
    assert urlsplit(toolkit.config["solr_url"]).port == port
    [holder] = processes.port_holders(port)
    assert "solr_standin.py" in holder
    assert int(holder.split()[0]) in processes.process_tree(os.getpid())


def _settings(text: str, here: Path) -> dict[str, str]:
    """[app:main] of an ini, with what it inherits through ``use = config:``."""
    parser = configparser.RawConfigParser(strict=False)
    parser.read_string(text)
    values = dict(parser["app:main"])
    use = values.pop("use", "")
    if not use.startswith("config:"):
        return values
    base = here / use[len("config:"):]
    return {**_settings(base.read_text(), base.parent), **values}


def _run_settings(slot, version: str) -> dict[str, str]:
    """The settings scripts/test gives the run of ``slot`` (None: no slot)."""
    env = {k: v for k, v in os.environ.items() if k != "WEBHOOKS_TEST_SLOT"}
    env.update(CKAN_VERSION=version, WEBHOOKS_TEST_PRINT_INI="1",
               **({"WEBHOOKS_TEST_SLOT": str(slot)} if slot else {}))
    printed = subprocess.run([str(ROOT / "scripts" / "test")], env=env, capture_output=True,
                             text=True, check=True, timeout=30).stdout
    return _settings(printed, ROOT)


def _redis_db(settings: dict) -> int:
    return int(urlsplit(settings["ckan.redis.url"]).path.strip("/"))


def _port(url: str) -> int:
    return urlsplit(url).port


def test_each_run_and_the_demo_own_their_redis_database_and_ports():
    """Every run scripts/test can start (each slot, and no slot, on either
    CKAN version), the demo and the benchmarks: no Redis database, CKAN port
    or Solr stand-in port is shared. A slot serves one run at a time
    (scripts/test locks it), so its two versions may use the same ones; the
    two versions without a slot get the databases of their own inis."""
    claims: dict[tuple, set[str]] = {}

    def claim(kind: str, value: int, owner: str) -> None:
        claims.setdefault((kind, value), set()).add(owner)

    runs = {(slot, version): _run_settings(slot, version)
            for slot in (None, *SLOTS) for version in VERSIONS}
    for (slot, version), settings in runs.items():
        owner = f"slot {slot}" if slot else "no slot"
        claim("redis", _redis_db(settings), owner if slot else f"no slot, CKAN {version}")
        claim("CKAN port", _port(settings["ckan.site_url"]), owner)
        claim("Solr port", _port(settings["solr_url"]), owner)
    demo = _settings((ROOT / "demo.ini").read_text(), ROOT)
    claim("redis", _redis_db(demo), "demo")
    claim("CKAN port", _port(demo["ckan.site_url"]), "demo")
    claim("Solr port", _port(demo["solr_url"]), "demo")
    bench = _settings((ROOT / "bench" / "bench.ini").read_text(), ROOT / "bench")
    claim("redis", _redis_db(bench), "bench")
    shared = {key: owners for key, owners in claims.items() if len(owners) > 1}
    assert not shared
    # scripts/test-all runs CKAN 2.12 in slot 1 and 2.11 in slot 2, side by side.
    assert _redis_db(runs[(1, "2.12")]) != _redis_db(runs[(2, "2.11")])
    databases = int(redis.Redis.from_url(toolkit.config["ckan.redis.url"])
                    .config_get("databases")["databases"])
    assert max(value for kind, value in claims if kind == "redis") < databases
    # What this run uses is what scripts/test says it hands out.
    slot = os.environ.get("WEBHOOKS_TEST_SLOT") or None
    mine = runs[(int(slot) if slot else None, ".".join(ckan.__version__.split(".")[:2]))]
    for key in ("ckan.redis.url", "ckan.site_url", "solr_url", "ckanext.webhooks.celery.queue",
                "sqlalchemy.url"):
        assert toolkit.config[key] == mine[key], key


def test_a_second_run_of_this_slot_is_refused_while_this_one_lives():
    """This run holds its slot's lock (scripts/test took it), and a second
    scripts/test in the same slot stops at once, before touching anything."""
    lock = os.environ["WEBHOOKS_TEST_LOCK"]
    with open(lock) as handle:
        with pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    second = subprocess.run([str(ROOT / "scripts" / "test"), "--collect-only", "-q",
                             "no-such-test-file.py"], env=os.environ, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    assert "is in use by another run" in second.stderr
