"""``ckan`` with the worker's sender swapped, for bench/fanout_senders.py only.

    WEBHOOKS_BENCH_SENDER=aiohttp python bench/sender_worker.py -c <ini> webhooks worker

``httptools`` (or unset): the extension as it is. ``aiohttp`` /
``aiohttp+gates``: when ``ckanext.webhooks.dispatcher`` is imported, its
``Sender`` name is pointed at :class:`aiohttp_sender.AiohttpSender` (the
dispatcher makes its per-process sender with ``Sender.from_config``), without
changing any file of the extension. Each sender made says so on stderr.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CHOICE = os.environ.get("WEBHOOKS_BENCH_SENDER", "httptools")
TARGET = "ckanext.webhooks.dispatcher"
if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == BENCH:
    sys.path.pop(0)  # bench/'s modules must not shadow anything CKAN imports


def _replacement():
    sys.path.append(str(BENCH))
    from aiohttp_sender import AiohttpSender

    class BenchSender(AiohttpSender):
        @classmethod
        def from_config(cls, **overrides):
            if CHOICE == "aiohttp+gates":
                overrides.setdefault("gates", True)
            sender = super().from_config(**overrides)
            print(f"webhooks-bench: pid {os.getpid()} sends with {CHOICE} "
                  f"(concurrency {sender.concurrency}, per host {sender.per_host})",
                  file=sys.stderr, flush=True)
            return sender
    return BenchSender


class _Swap(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.Sender = _replacement()
        spec.loader.exec_module = exec_module
        return spec


if CHOICE not in ("httptools", "aiohttp", "aiohttp+gates"):
    raise SystemExit(f"WEBHOOKS_BENCH_SENDER: unknown sender {CHOICE!r}")
if CHOICE != "httptools":
    sys.meta_path.insert(0, _Swap())
else:
    print(f"webhooks-bench: pid {os.getpid()} sends with httptools", file=sys.stderr, flush=True)

if __name__ == "__main__":
    from ckan.cli.cli import ckan
    sys.argv[0] = "ckan"
    sys.exit(ckan())
