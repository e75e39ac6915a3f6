"""Report this host's Celery fleet units and what their workers are doing.

``celery-fleet-status`` lists every unit the fleet owns on this host with its
systemd state and, for each worker unit, asks that very worker (by node name)
which queues it consumes and how many tasks it has completed. It prints JSON
for ``playbooks/status.yml`` to aggregate into the fleet's status table.
``--fleet`` instead lists every worker the broker reaches, on any host, so
``playbooks/verify.yml`` can find workers that the inventory does not run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

from celery_fleet.app_report import one_line
from celery_fleet.beat_fence import read_stamp
from celery_fleet.beat_guard import DEFAULT_STATE_FILE
from celery_fleet.beat_scan import embedded_beats
from celery_fleet.envfile import read_env_file
from celery_fleet.pause import paused_queues

UNIT_PATTERNS = ("celery-worker@*.service", "celery-beat.service", "flower.service")
WORKER_PREFIX = "celery-worker@"


def list_units() -> list[dict[str, str]]:
    """Return the fleet's loaded units on this host with their states."""
    out = subprocess.run(
        ["systemctl", "list-units", "--all", "--plain", "--no-legend", "--no-pager", *UNIT_PATTERNS],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    units = []
    for line in out.splitlines():
        fields = line.split(None, 4)
        if len(fields) >= 4:
            units.append({"unit": fields[0], "active": fields[2], "sub": fields[3]})
    return sorted(units, key=lambda u: u["unit"])


def main_pids(units: list[str]) -> dict[str, int]:
    """The main process of each unit that has one."""
    if not units:
        return {}
    out = subprocess.run(
        ["systemctl", "show", "--property=Id,MainPID", "--no-pager", *units],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return parse_pids(out)


def parse_pids(out: str) -> dict[str, int]:
    """``systemctl show --property=Id,MainPID`` output: one blank-line separated block per unit,
    its properties in systemd's own order, not the order asked for."""
    pids = {}
    for block in out.split("\n\n"):
        props = dict(line.partition("=")[::2] for line in block.splitlines())
        if props.get("Id") and props.get("MainPID", "0").isdigit() and int(props["MainPID"]) > 0:
            pids[props["Id"]] = int(props["MainPID"])
    return pids


def release_of(cmdline: list[str]) -> str | None:
    """The release a process runs: the ``releases/<name>`` directory its command starts from."""
    for word in cmdline:
        head, sep, tail = word.partition("/releases/")
        if sep and head and "/" in tail:
            return tail.partition("/")[0]
    return None


def read_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
    except OSError:
        return []


def node_name(unit: str, hostname: str) -> str | None:
    """The Celery node name of a worker unit: ``<instance>@<hostname>``."""
    if not unit.startswith(WORKER_PREFIX):
        return None
    return f"{unit[len(WORKER_PREFIX) :].removesuffix('.service')}@{hostname}"


def summarize(
    units: list[dict[str, str]],
    hostname: str,
    queues: dict[str, list[dict[str, Any]]],
    stats: dict[str, dict[str, Any]],
    beat_leads: bool = False,
    *,
    releases: dict[str, str | None] | None = None,
) -> list[dict[str, Any]]:
    """Join unit states with the workers' own answers and releases, and the beat unit with its lease.

    A unit that is deactivating drains: a retired worker finishing its running tasks.
    """
    rows = []
    for unit in units:
        node = node_name(unit["unit"], hostname)
        row: dict[str, Any] = {
            **unit,
            "node": node,
            "queues": None,
            "tasks_done": None,
            "release": (releases or {}).get(unit["unit"]),
            "draining": unit["active"] == "deactivating",
        }
        if unit["unit"] == "celery-beat.service":
            row["beat"] = "leader" if beat_leads and unit["active"] == "active" else "standby"
        if node is not None:
            row["answered"] = node in queues
            if node in queues:
                row["queues"] = sorted(q["name"] for q in queues[node])
            if node in stats:
                row["tasks_done"] = sum(stats[node].get("total", {}).values())
        rows.append(row)
    return rows


def load_env(env_files: list[str]) -> None:
    """The broker's address and credentials, from the environment files the units read."""
    for path in env_files:
        with open(path, encoding="utf-8") as f:
            os.environ.update(read_env_file(f.read()))


def fleet_nodes(timeout: float) -> dict[str, list[str]]:
    """Every worker connected to the broker, on any host, with the queues it consumes."""
    from celery import Celery  # noqa: PLC0415 -- keep --help fast

    app = Celery("celery-fleet-status")
    try:
        # A broadcast: it waits the whole timeout, as it cannot know how many workers will answer.
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    finally:
        app.close()
    return {node: sorted(q["name"] for q in queues) for node, queues in sorted(replies.items())}


def collect(timeout: float, drained_mark: str | None) -> dict[str, Any]:
    """This host's fleet units, each worker's own answer, whether this host's beat leads, and whether
    playbooks/drain.yml drained it (``drained_mark`` exists)."""
    hostname = socket.gethostname()
    units = list_units()
    nodes = [n for n in (node_name(u["unit"], hostname) for u in units) if n]
    from celery import Celery  # noqa: PLC0415 -- keep --help fast

    queues: dict = {}
    stats: dict = {}
    if nodes:
        # The broker comes from CELERY_BROKER_URL; remote control needs no tasks.
        app = Celery("celery-fleet-status")
        try:
            inspector = app.control.inspect(destination=nodes, timeout=timeout)
            queues = inspector.active_queues() or {}
            stats = inspector.stats() or {}
        finally:
            app.close()
    # The lease deadline the beat supervisor publishes: ahead of now only on the leader.
    beat_leads = time.monotonic() < read_stamp(DEFAULT_STATE_FILE)
    pids = main_pids([u["unit"] for u in units])
    releases = {unit: release_of(read_cmdline(pid)) for unit, pid in pids.items()}
    return {
        "host": hostname,
        "units": summarize(units, hostname, queues, stats, beat_leads, releases=releases),
        "drained": bool(drained_mark) and os.path.exists(drained_mark),
        "paused": paused_queues(),
        "embedded_beats": embedded_beats(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--env-file",
        action="append",
        required=True,
        help="environment file the units use (repeatable); the playbooks pass the fleet's own",
    )
    parser.add_argument("--drained-mark", help="the file that says playbooks/drain.yml holds this host")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for workers to answer")
    parser.add_argument(
        "--fleet",
        action="store_true",
        help="list every worker the broker reaches, on any host, with its queues (not this host's units)",
    )
    args = parser.parse_args(argv)
    try:
        load_env(args.env_file)
        report = (
            {"nodes": fleet_nodes(args.timeout)} if args.fleet else collect(args.timeout, args.drained_mark)
        )
    except Exception as exc:  # an unreadable env file, no systemctl, a broker that refuses us
        # One line for verify.yml to quote, not a traceback.
        sys.stderr.write(f"celery-fleet-status: {one_line(exc)}\n")
        return 1
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
