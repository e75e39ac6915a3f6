#!/usr/bin/env python3
"""Beat failover: time to a new leader after a hard kill and after a clean stop,
and duplicate and missing ticks over a run with repeated failovers.

Everything runs on this machine against a real redis-server on loopback: two
beat candidates (the real lease supervisor running the real `celery beat` of
the demo app) and one worker that records every tick. A hard kill SIGKILLs the
leader's supervisor and its beat together, as a host crash would; a clean stop
sends SIGTERM to the supervisor, as `systemctl stop` does.

Reproduce: .venv/bin/python bench/beat_failover.py [--rounds 3] [--ttl 10]
Appends one JSON line to bench/results/beat_failover.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import RedisServer, demo_env, start_demo_worker  # noqa: E402 -- the tests' real harness

LOCK_KEY = "celery-fleet:beat-leader"
TICK_SECONDS = 1.0


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


class Candidate:
    """One beat candidate: the supervisor and, while it leads, its beat."""

    def __init__(self, name: str, workdir: Path, env: dict[str, str], ttl: int, renew: float) -> None:
        self.name, self.env, self.ttl, self.renew = name, env, ttl, renew
        self.dir = workdir / name
        self.dir.mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery_fleet.beat_guard",
                f"--ttl={self.ttl}",
                f"--renew-interval={self.renew}",
                "--poll-interval=1",
                f"--state-file={self.dir}/lease",
                "--",
                sys.executable,
                "-m",
                "celery",
                "--app",
                "demo_app",
                "beat",
                f"--schedule={self.dir}/schedule",
                "--pidfile=",
                "--loglevel=WARNING",
            ],
            env=self.env,
            start_new_session=True,
            stderr=open(self.dir / "log", "ab"),  # noqa: SIM115
        )

    def hard_kill(self) -> None:
        assert self.proc is not None
        beats = children(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGKILL)
        for pid in beats:
            os.killpg(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for pid in beats:  # a crashed host leaves no beat behind
            wait_for(lambda p=pid: not Path(f"/proc/{p}").exists() or _zombie(p), 5)

    def clean_stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)

    def leads(self, holder: bytes | None) -> bool:
        return self.proc is not None and holder is not None and f"pid={self.proc.pid} ".encode() in holder


def wait_for(predicate, timeout: float, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"not within {timeout} s")


def tick_times(client) -> list[float]:
    return sorted(float(line.split()[0]) for line in client.lrange("demo:ticks", 0, -1))


def summarize(
    args: argparse.Namespace,
    results: dict[str, list[dict[str, float]]],
    windows: list[tuple[float, float]],
    times: list[float],
    refused: int,
) -> dict[str, object]:
    """Failover figures, and duplicate and missing tick slots over the run."""
    slots = [math.floor(t / TICK_SECONDS) for t in times]
    missing = set(range(slots[0], slots[-1] + 1)) - set(slots)

    def in_failover(slot: int) -> bool:
        start = slot * TICK_SECONDS
        return any(fault - TICK_SECONDS < start < first_tick for fault, first_tick in windows)

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ttl_s": args.ttl,
        "renew_s": args.renew,
        "tick_s": TICK_SECONDS,
        # Beat publishes through the broker fence (celery_fleet.beat_fence): a send is enqueued only while
        # the lease holds its holder's token. Sends the broker refused over the run:
        "fence": "broker+deadline",
        "fenced_refusals": refused,
        "failovers": len(results["hard_kill"]) + len(results["clean_stop"]),
        "hard_kill_lease_s_max": round(max(r["lease_s"] for r in results["hard_kill"]), 2),
        "hard_kill_first_tick_s_max": round(max(r["first_tick_s"] for r in results["hard_kill"]), 2),
        "clean_stop_lease_s_max": round(max(r["lease_s"] for r in results["clean_stop"]), 2),
        "clean_stop_first_tick_s_max": round(max(r["first_tick_s"] for r in results["clean_stop"]), 2),
        "clean_stop_lease_s_median": round(statistics.median(r["lease_s"] for r in results["clean_stop"]), 2),
        "rounds": {k: [{m: round(v, 2) for m, v in r.items()} for r in rs] for k, rs in results.items()},
        "ticks": len(times),
        "duplicate_ticks": len(slots) - len(set(slots)),
        "missing_ticks_in_failovers": len([m for m in missing if in_failover(m)]),
        "missing_ticks_elsewhere": len([m for m in missing if not in_failover(m)]),
        "machine": f"{os.cpu_count()} cores",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="failovers of each kind")
    parser.add_argument("--ttl", type=int, default=10)
    parser.add_argument("--renew", type=float, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir)
        server.start()
        client = server.client()
        env = demo_env(server, DEMO_TICK_SECONDS=str(TICK_SECONDS))
        worker = start_demo_worker(
            env, "ticks@bench", "low_priority", stderr=subprocess.DEVNULL, start_new_session=True
        )
        candidates = [Candidate(n, workdir, env, args.ttl, args.renew) for n in ("a", "b")]
        results: dict[str, list[dict[str, float]]] = {"hard_kill": [], "clean_stop": []}
        windows: list[tuple[float, float]] = []  # from each fault to the new leader's first tick
        try:
            for c in candidates:
                c.start()
            wait_for(lambda: client.get(LOCK_KEY), 30)
            wait_for(lambda: client.llen("demo:ticks") >= 3, 60, 0.2)
            started = time.time()
            for kind in ["hard_kill", "clean_stop"] * args.rounds:
                holder = client.get(LOCK_KEY)
                [leader] = [c for c in candidates if c.leads(holder)]
                [standby] = [c for c in candidates if c is not leader]
                fault = time.time()
                leader.hard_kill() if kind == "hard_kill" else leader.clean_stop()
                wait_for(lambda s=standby: s.leads(client.get(LOCK_KEY)), args.ttl + 30)
                leased = time.time()
                wait_for(lambda f=fault: any(t > f for t in tick_times(client)), args.ttl + 30, 0.1)
                first_tick = min(t for t in tick_times(client) if t > fault)
                results[kind].append({"lease_s": leased - fault, "first_tick_s": first_tick - fault})
                windows.append((fault, first_tick))
                leader.start()
                time.sleep(5)
            finished = time.time()
        finally:
            for c in candidates:
                if c.proc and c.proc.poll() is None:
                    c.clean_stop()
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
            times = [t for t in tick_times(client) if started <= t <= finished]
            refused = sum((c.dir / "log").read_text(errors="replace").count("FENCED") for c in candidates)
            server.stop()

    line = summarize(args, results, windows, times, refused)
    out = ROOT / "bench" / "results" / "beat_failover.jsonl"
    with out.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
