"""Run ``celery beat`` on exactly one host of the fleet, guarded by a lease in the broker's Redis.

``celery-fleet-beat-guard`` runs on every beat host. It has three parts, each in its own module:

- the lease (``celery_fleet.beat_lease``): won with a unique token, renewed against a deadline, handed
  back; a Redis that lost its data is waited out;
- the child (``celery_fleet.beat_child``): ``celery beat`` in its own process group, with a heartbeat;
- the fences inside beat (``celery_fleet.beat_fence``): nothing is sent past the deadline, and the broker
  itself enqueues a message only while the lease holds this holder's token.

This module is the supervisor that ties them: a standby polls for the lease; the holder runs beat and
keeps the lease, stops beat the moment the lease may be lost, restarts a beat that stopped ticking (a
few times, then gives the lease up), and hands the lease over when it is stopped.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import unquote, urlsplit, urlunsplit

from celery_fleet.beat_child import BeatProcess
from celery_fleet.beat_fence import (
    HEARTBEAT_FILE_ENV,
    INNER_SCHEDULER_ENV,
    LEASE_FILE_ENV,
    LEASE_KEY_ENV,
    LEASE_TOKEN_ENV,
    MAX_INTERVAL_ENV,
    SCHEDULER_PATH,
    write_atomically,
    write_stamp,
)
from celery_fleet.beat_lease import Lease, LeaseLost, connect
from celery_fleet.envfile import read_env_file

LOG = logging.getLogger("celery_fleet.beat_guard")

DEFAULT_LOCK_KEY = "celery-fleet:beat-leader"
DEFAULT_STATE_FILE = Path("/run/celery-beat/lease")

TICK = 0.1  # longest sleep of the main loop: signals, deadlines and child exits are seen this quickly
STOP_GRACE = 10.0  # how long beat may take to stop when the supervisor itself is stopped
MIN_TTL = 2.0  # the safety margin alone is 1 s; below this the lease would expire before its renewal
MIN_STUCK_TIMEOUT = 2.0
# A beat that stops ticking is restarted; this many times within STUCK_WINDOW stuck timeouts, and the
# supervisor gives the lease up and exits instead, so that systemd restarts it and another host may lead.
MAX_STUCK_RESTARTS = 3
STUCK_WINDOW = 10


# --- settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What the supervisor was asked to do, validated."""

    broker_url: str
    lock_key: str
    ttl: float
    renew_interval: float
    poll_interval: float
    state_file: Path
    scheduler: str
    command: tuple[str, ...]
    stuck_timeout: float = 60.0

    @property
    def metrics_file(self) -> Path:
        """Where node exporter's textfile collector reads whether this host leads: beside the deadline."""
        return self.state_file.with_name("metrics.prom")

    @property
    def heartbeat_file(self) -> Path:
        """Where beat's fence writes the time of each tick: beside the deadline."""
        return self.state_file.with_name("heartbeat")

    @property
    def max_interval(self) -> float:
        """Longest beat may sleep between ticks: a quarter of the stuck timeout, so silence means stuck."""
        return self.stuck_timeout / 4

    @property
    def margin(self) -> float:
        """Safety margin below the server-side expiry: absorbs clock-rate differences and kill time."""
        return max(1.0, self.ttl * 0.2)

    @property
    def socket_timeout(self) -> float:
        """Longest a single Redis connect or reply may take, so a paused broker cannot stall the loop."""
        return min(self.renew_interval, 2.0)

    @property
    def kill_grace(self) -> float:
        """How long beat gets between SIGTERM and SIGKILL when the lease is lost."""
        return min(2.0, self.margin / 2)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


def _names_scheduler(arg: str) -> bool:
    """Whether a beat argument picks a scheduler, which would bypass the fence."""
    return arg in ("-S", "--scheduler") or arg.startswith(("--scheduler=", "-S"))


def validation_error(
    ttl: float, renew: float, poll: float, command: Sequence[str], stuck: float = 60.0
) -> str | None:
    """Why these settings cannot give a safe lease, or None when they can."""
    rules = [
        (
            math.isfinite(ttl) and ttl >= MIN_TTL,
            f"--ttl must be at least {MIN_TTL:g} seconds (the safety margin alone is 1 s); got {ttl:g}",
        ),
        (
            0 < renew < ttl / 2,
            f"--renew-interval must be > 0 and < --ttl/2 ({ttl / 2:g}) so that the lease survives a failed "
            f"renewal; got {renew:g}",
        ),
        (math.isfinite(poll) and poll > 0, f"--poll-interval must be > 0; got {poll:g}"),
        (
            math.isfinite(stuck) and stuck >= MIN_STUCK_TIMEOUT,
            f"--stuck-timeout must be at least {MIN_STUCK_TIMEOUT:g} seconds (beat needs them to start); "
            f"got {stuck:g}",
        ),
        (bool(command), "give the beat command after --, e.g. -- celery --app proj beat"),
        (
            not any(_names_scheduler(arg) for arg in command),
            "do not pass --scheduler/-S to beat: give it to this supervisor's --scheduler, which fences it",
        ),
    ]
    return next((message for ok, message in rules if not ok), None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-fleet-beat-guard",
        usage="%(prog)s [options] -- BEAT COMMAND...",
        description="Run celery beat on exactly one host: only while this host holds a lease in Redis.",
        epilog="The broker comes from CELERY_BROKER_URL (redis://:password@host:port/db).",
    )
    parser.add_argument("--lock-key", default=DEFAULT_LOCK_KEY, help="Redis key of the lease")
    parser.add_argument("--ttl", type=float, default=10.0, help="lease lifetime in seconds")
    parser.add_argument("--renew-interval", type=float, default=3.0, help="seconds between renewals")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between standby attempts")
    parser.add_argument(
        "--state-file", type=Path, default=DEFAULT_STATE_FILE, help="where beat's fence reads the deadline"
    )
    parser.add_argument("--scheduler", default="", help="beat's real scheduler class (module:Class)")
    parser.add_argument(
        "--stuck-timeout",
        type=float,
        default=60.0,
        help="seconds without a tick after which a leading beat counts as stuck and is restarted",
    )
    parser.add_argument(
        "--env-file", action="append", default=[], help="systemd EnvironmentFile to load first (repeatable)"
    )
    return parser


def parse_settings(argv: Sequence[str]) -> Settings:
    """Parse and validate the command line; exits with status 2 and a message on any problem."""
    parser = build_parser()
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    command = tuple(argv[split + 1 :])
    for path in args.env_file:
        try:
            with open(path, encoding="utf-8") as f:
                os.environ.update(read_env_file(f.read()))
        except OSError as exc:
            parser.error(f"cannot read --env-file {path}: {exc.strerror}")
    problem = validation_error(args.ttl, args.renew_interval, args.poll_interval, command, args.stuck_timeout)
    if problem:
        parser.error(problem)
    url = os.environ.get("CELERY_BROKER_URL", "")
    if not url:
        parser.error("CELERY_BROKER_URL is not set (put it in the environment or an --env-file)")
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        parser.error(f"CELERY_BROKER_URL must be a redis:// URL; got {mask_url(url)}")
    return Settings(
        broker_url=url,
        lock_key=args.lock_key,
        ttl=args.ttl,
        renew_interval=args.renew_interval,
        poll_interval=args.poll_interval,
        state_file=args.state_file,
        scheduler=args.scheduler,
        command=command,
        stuck_timeout=args.stuck_timeout,
    )


# --- logging -------------------------------------------------------------------------------------------


class _RedactingFormatter(logging.Formatter):
    """Replaces secrets in every formatted line, exception text included."""

    def __init__(self, fmt: str, secrets: Sequence[str]) -> None:
        super().__init__(fmt)
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def configure_logging(broker_url: str) -> None:
    """One line per event on stderr (the journal), never showing the broker password."""
    password = urlsplit(broker_url).password or ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _RedactingFormatter("%(asctime)s %(name)s %(levelname)s %(message)s", [password, unquote(password)])
    )
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


# --- the supervisor ----------------------------------------------------------------------------------


def write_leader_metrics(path: Path, deadline: float) -> None:
    """Whether this host leads, and until when (wall-clock), in Prometheus's text format, atomically.

    The end time lets a rule count a leader only while its lease may hold: a host frozen while leading
    stops counting at its deadline, whatever its file still says.
    """
    leads = deadline > time.monotonic()
    until = time.time() + (deadline - time.monotonic()) if leads else 0.0
    text = (
        "# HELP celery_fleet_beat_leader Whether this host holds beat's lease and runs beat.\n"
        "# TYPE celery_fleet_beat_leader gauge\n"
        f"celery_fleet_beat_leader {int(leads)}\n"
        "# HELP celery_fleet_beat_leader_until_seconds When this host's lease ends unless renewed (unix s).\n"
        "# TYPE celery_fleet_beat_leader_until_seconds gauge\n"
        f"celery_fleet_beat_leader_until_seconds {until:.3f}\n"
    )
    write_atomically(path, text, mode=0o644)


class Supervisor:
    """Standby until the lease is won; then runs beat and keeps the lease, or stops beat."""

    def __init__(self, settings: Settings, lease: Lease) -> None:
        self.settings = settings
        self.lease = lease
        self.beat: BeatProcess | None = None
        self.stop_requested = False
        self.stuck_restarts: list[float] = []

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        self.lease.install_alarm()

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stop_requested:
            LOG.info("received %s: stopping", signal.Signals(signum).name)
        self.stop_requested = True

    def run(self) -> int:
        """Loop until stopped; returns the exit status."""
        s = self.settings
        # Not leading, said before "standing by" is: whoever reads that line finds the file.
        self._publish(0.0)
        LOG.info(
            "standing by for lease %r on %s (ttl %gs, renew every %gs, poll every %gs)",
            s.lock_key,
            mask_url(s.broker_url),
            s.ttl,
            s.renew_interval,
            s.poll_interval,
        )
        while not self.stop_requested:
            code = self._standby_tick() if self.beat is None else self._leader_tick()
            if code is not None:
                return code
        return self._shutdown()

    def _sleep(self, seconds: float) -> None:
        """Sleep in short slices so that a stop request is seen within TICK."""
        end = time.monotonic() + seconds
        while not self.stop_requested and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, TICK))

    def _publish_deadline(self) -> None:
        self._publish(self.lease.deadline)

    def _publish(self, deadline: float) -> None:
        """The deadline for beat's fence (0: closed), then the same for Prometheus (a textfile)."""
        write_stamp(self.settings.state_file, deadline)
        write_leader_metrics(self.settings.metrics_file, deadline)

    # standby

    def _standby_tick(self) -> int | None:
        if self.lease.may_try() and self.lease.acquire():
            self._publish_deadline()
            LOG.info("became leader of %r as %r", self.settings.lock_key, self.lease.token)
            return self._start_beat()
        self._sleep(self.settings.poll_interval)
        return None

    def _start_beat(self) -> int | None:
        s = self.settings
        argv = [*s.command, f"--scheduler={SCHEDULER_PATH}"]
        env = {
            **os.environ,
            INNER_SCHEDULER_ENV: s.scheduler,
            LEASE_FILE_ENV: str(s.state_file),
            LEASE_KEY_ENV: s.lock_key,
            LEASE_TOKEN_ENV: self.lease.token,
            HEARTBEAT_FILE_ENV: str(s.heartbeat_file),
            MAX_INTERVAL_ENV: f"{s.max_interval:g}",
        }
        LOG.info("starting beat: %s", argv)
        try:
            self.beat = BeatProcess(argv, env, s.heartbeat_file)
        except OSError as exc:
            LOG.error("cannot start beat (%s): releasing the lease and exiting", exc)
            self._step_down()
            return 1
        return None

    # leader

    def _leader_tick(self) -> int | None:
        assert self.beat is not None
        try:
            before = self.lease.deadline
            self.lease.renew_if_due()
            if self.lease.deadline != before:
                self._publish_deadline()
            if self.beat.has_exited():
                return self._on_beat_exit()
            if self.beat.silent_for() > self.settings.stuck_timeout:
                return self._on_beat_stuck()
        except LeaseLost as lost:
            self._lose_leadership(str(lost))
            return None
        now = time.monotonic()
        wake = min(self.lease.next_renew, self.lease.deadline, now + TICK)
        if wake > now and not self.stop_requested:
            time.sleep(wake - now)
        return None

    def _stop_beat(self, grace: float, keep_lease: bool) -> int:
        assert self.beat is not None
        code = self.beat.stop(grace, self._keep_lease if keep_lease else lambda: True)
        self.beat = None
        return code

    def _keep_lease(self) -> bool:
        """Keep renewing while beat shuts down gracefully, so no standby starts a second beat meanwhile."""
        try:
            before = self.lease.deadline
            self.lease.renew_if_due()
            if self.lease.deadline != before:
                self._publish_deadline()
        except LeaseLost as lost:
            self._publish(0.0)
            LOG.error("%s: killing beat", lost)
            return False
        return True

    def _lose_leadership(self, reason: str) -> None:
        """Close the fence, kill beat at once, and go back to standby."""
        assert self.beat is not None
        self._publish(0.0)
        LOG.error("lost leadership: %s; stopping beat (pid %d) now", reason, self.beat.pid)
        code = self._stop_beat(self.settings.kill_grace, keep_lease=False)
        LOG.warning("beat stopped (exit code %s); standing by", code)
        self.lease.release()

    def _on_beat_exit(self) -> int:
        """Beat exited on its own: give the lease up so another host takes over, and fail the unit."""
        code = self._stop_beat(0.0, keep_lease=False)
        LOG.error("beat exited by itself with code %s while leading: releasing the lease and exiting", code)
        self._step_down()
        return 1

    def _on_beat_stuck(self) -> int | None:
        """Beat is alive but no longer ticks: restart it, a few times, then let another host lead."""
        assert self.beat is not None
        s, now = self.settings, time.monotonic()
        silent = self.beat.silent_for()
        self.stuck_restarts = [t for t in self.stuck_restarts if now - t < STUCK_WINDOW * s.stuck_timeout]
        if len(self.stuck_restarts) >= MAX_STUCK_RESTARTS:
            LOG.error(
                "beat has not ticked for %.1fs, stuck again after %d restarts: releasing the lease and "
                "exiting, so that systemd restarts this unit and another host may lead",
                silent,
                len(self.stuck_restarts),
            )
            self._stop_beat(s.kill_grace, keep_lease=False)
            self._step_down()
            return 1
        self.stuck_restarts.append(now)
        LOG.error(
            "beat has not ticked for %.1fs (more than --stuck-timeout %gs: a hung publish or a deadlock): "
            "restarting it (%d of %d)",
            silent,
            s.stuck_timeout,
            len(self.stuck_restarts),
            MAX_STUCK_RESTARTS,
        )
        self._stop_beat(s.kill_grace, keep_lease=True)
        if self.lease.deadline <= time.monotonic():
            return None  # the lease ran out meanwhile: stand by again
        return self._start_beat()

    def _step_down(self) -> None:
        self._publish(0.0)
        self.lease.release()

    def _shutdown(self) -> int:
        """Stop beat gracefully, then hand the lease over."""
        if self.beat is not None:
            LOG.info("stopping beat (pid %d), then releasing the lease", self.beat.pid)
            code = self._stop_beat(STOP_GRACE, keep_lease=True)
            LOG.info("beat exited with code %s", code)
        self._step_down()
        LOG.info("stopped; lease %r not held by this host", self.settings.lock_key)
        return 0

    def abort(self) -> None:
        """Last resort after an unexpected error: never leave beat running without a supervisor."""
        try:
            self._publish(0.0)
        finally:
            if self.beat is not None:
                self._stop_beat(self.settings.kill_grace, keep_lease=False)
            self.lease.release()


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    configure_logging(settings.broker_url)
    try:
        write_stamp(settings.state_file, 0.0)
    except OSError as exc:
        LOG.error("cannot write the state file %s: %s", settings.state_file, exc)
        return 2
    client = connect(settings.broker_url, settings.socket_timeout)
    lease = Lease(client, settings.lock_key, settings.ttl, settings.renew_interval, settings.margin)
    supervisor = Supervisor(settings, lease)
    supervisor.install_signal_handlers()
    try:
        return supervisor.run()
    except BaseException:
        LOG.exception("unexpected error: stopping beat and giving the lease up")
        supervisor.abort()
        raise


if __name__ == "__main__":
    sys.exit(main())
