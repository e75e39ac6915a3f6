"""Find every Celery worker on this host that runs an embedded beat, however it was started.

A worker runs beat when its command line sets ``-B``/``--beat`` in any spelling click accepts
(``-B``, ``--beat``, ``-EB``, ...), or when its environment does (``celery`` runs with
``auto_envvar_prefix="CELERY"``, so click may read ``CELERY_WORKER_BEAT``; whether it does depends
on the click version, so click itself decides). The command line is read from
``/proc/<pid>/cmdline`` and parsed by the host's own Celery, the environment from
``/proc/<pid>/environ``; ``celery multi`` and ``python -m celery`` start workers the same way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from celery_fleet.cli_report import celery_context

# click's BoolParamType reads these as true.
TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
# With setproctitle installed, a worker's main process rewrites its command line to
# "[celeryd: <node>:MainProcess] <status> (<its arguments>)" (celery.apps.worker.set_process_status).
TITLE = re.compile(r"\[celeryd: [^\]]*:MainProcess\] .*?\((?P<args>.*)\)")


def from_title(argv: list[str]) -> list[str]:
    """The command line a worker had before setproctitle rewrote it, or ``argv`` unchanged.

    The title joined the arguments with spaces, so an argument that held one comes back as two."""
    title = TITLE.match(" ".join(argv))
    return ["celery", *title["args"].split()] if title else argv


def worker_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``worker`` when ``argv`` runs ``celery [...] worker``, else None."""
    for index, arg in enumerate(argv):
        if os.path.basename(arg) == "celery" or (arg == "celery" and index and argv[index - 1] == "-m"):
            rest = argv[index + 1 :]
            return rest[rest.index("worker") + 1 :] if "worker" in rest else None
    return None


def beat_source(args: list[str], env: dict[str, str]) -> str | None:
    """How ``celery worker <args>`` run with ``env`` turns beat on, as the installed click reads it."""
    import click  # noqa: PLC0415 -- only where a worker runs

    parent = celery_context()
    command = parent.command.commands["worker"]
    ctx = click.Context(command, parent=parent, info_name="worker", resilient_parsing=True)
    try:
        opts, _, _ = command.make_parser(ctx).parse_args(args=list(args))
    except click.UsageError:
        return None  # celery would refuse to start such a worker
    if opts.get("beat"):
        return "its command line"
    [param] = [p for p in command.params if p.name == "beat"]
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        value, _ = param.consume_value(ctx, {})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if value is True or (isinstance(value, str) and value.strip().lower() in TRUE):
        return "its environment (CELERY_WORKER_BEAT)"
    return None


def _read(path: Path) -> list[str]:
    try:
        return path.read_bytes().decode(errors="replace").split("\0")
    except OSError:  # gone, or not ours to read
        return []


def embedded_beats(proc: Path = Path("/proc")) -> list[dict[str, Any]]:
    """Each main worker process on the host that runs a beat: its pid, argv and how beat was turned on."""
    workers: dict[int, tuple[list[str], list[str]]] = {}
    parents: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        argv = from_title([a for a in _read(entry / "cmdline") if a])
        args = worker_args(argv)
        if args is None:
            continue
        pid = int(entry.name)
        workers[pid] = (argv, args)
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited while we looked
            continue
        parents[pid] = int(stat.rsplit(")", 1)[-1].split()[1]) if stat else 0
    found = []
    for pid, (argv, args) in sorted(workers.items()):
        if parents.get(pid) in workers:
            continue  # a pool child forked from the worker: the main process speaks for it
        env = dict(v.split("=", 1) for v in _read(proc / str(pid) / "environ") if "=" in v)
        via = beat_source(args, env)
        if via:
            found.append({"pid": pid, "argv": argv, "via": via})
    return found
