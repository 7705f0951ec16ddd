"""Drive the resolver stand-in of ``netguard/sitecustomize.py`` from a test.

Every process the suite starts (workers, CKAN) and the test process itself
resolve names under ``.dns-standin`` by reading ``$WEBHOOKS_DNS_STANDIN`` at
each lookup, so :func:`answer`, :func:`fail` and :func:`hang` change what
running processes get at once; :func:`lookups` reads what they asked.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

SUFFIX = ".dns-standin"


def _path() -> Path:
    return Path(os.environ["WEBHOOKS_DNS_STANDIN"])


def name(label: str) -> str:
    """A fresh name under the stand-in's suffix (names of earlier tests stay theirs)."""
    return f"{label}-{uuid.uuid4().hex[:8]}{SUFFIX}"


def _set(host: str, entry) -> None:
    path = _path()
    entries = json.loads(path.read_text() or "{}")
    if entry is None:
        entries.pop(host, None)
    else:
        entries[host] = entry
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)  # readers see the old file or the new one, never half


def answer(host: str, *addresses: str) -> None:
    _set(host, {"answer": list(addresses)})


def fail(host: str, code: str = "EAI_AGAIN") -> None:
    _set(host, {"fail": code})


def hang(host: str) -> None:
    """Lookups of ``host`` block until its entry changes (at most 60 s)."""
    _set(host, {"hang": True})


def forget(host: str) -> None:
    _set(host, None)


def lookups(host: str) -> list[tuple[str, str]]:
    """(``start`` or ``end``, result) of every lookup of ``host`` so far, in order."""
    log = Path(str(_path()) + ".log")
    if not log.exists():
        return []
    found = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3] == host:
            found.append((parts[2], parts[4] if len(parts) > 4 else ""))
    return found
