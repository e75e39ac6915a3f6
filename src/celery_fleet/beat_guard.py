"""Run ``celery beat`` on exactly one host of the fleet, guarded by a lease in the broker's Redis.

``celery-fleet-beat-guard`` runs on every beat host. Each one polls for a lease (a Redis key set with
``SET NX PX`` through redis-py's :class:`redis.lock.Lock`, whose value names the holder); only the holder
runs ``celery beat``, as a child in its own process group, and renews the lease with an atomic
compare-and-extend. Losing the lease, or merely being unable to prove it is still held, stops beat.

Two clocks matter. Redis expires the key ``ttl`` seconds after it processed the last renewal, and that
renewal was processed after this process sent it, so the lease is certainly ours until
``t_sent + ttl`` (measured with ``time.monotonic()`` taken *before* the call). The supervisor keeps a
safety margin below that and calls the result the *deadline*: beat is killed when the deadline passes,
whether because Redis does not answer (an alarm interrupts a hanging call) or because this process was
frozen and only now runs again.

Beat itself may also be frozen and resumed together with the supervisor (a paused host), and could
dispatch a due task in the instant before the supervisor kills it. So the deadline is also published in
``--state-file`` as a ``CLOCK_MONOTONIC`` value, which is system-wide on Linux, and beat runs with
:data:`LeaseScheduler`, a fence around the real scheduler that refuses to send anything once
``time.monotonic()`` reaches that deadline.

A Redis that restarts without its data (or a replica promoted in its place) forgets the lease while
the old leader still believes in it until its deadline. A standby therefore does not try to lead for
one TTL after it sees a new server ``run_id``, nor while a server it meets for the first time has
been up for less than one TTL.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import LockNotOwnedError, NoPermissionError, RedisError
from redis.lock import Lock
from redis.retry import Retry

from celery_fleet.envfile import read_env_file

LOG = logging.getLogger("celery_fleet.beat_guard")

LEASE_FILE_ENV = "CELERY_FLEET_LEASE_FILE"
INNER_SCHEDULER_ENV = "CELERY_FLEET_BEAT_SCHEDULER"
SCHEDULER_PATH = "celery_fleet.beat_guard:LeaseScheduler"
DEFAULT_INNER_SCHEDULER = "celery.beat:PersistentScheduler"
DEFAULT_LOCK_KEY = "celery-fleet:beat-leader"
DEFAULT_STATE_FILE = Path("/run/celery-beat/lease")

TICK = 0.1  # longest sleep of the main loop: signals, deadlines and child exits are seen this quickly
RETRY_AFTER_ERROR = 0.5  # how soon a failed renewal is tried again
STOP_GRACE = 10.0  # how long beat may take to stop when the supervisor itself is stopped
MIN_TTL = 2.0  # the safety margin alone is 1 s; below this the lease would expire before its renewal


# --- the lease file: shared between the supervisor and the fence inside beat -------------------------


def read_deadline(path: str | os.PathLike[str] | None) -> float:
    """The deadline last published in the lease file; 0.0 (no lease) when there is none or it is unreadable.

    Anything unexpected means "no lease": the fence must fail closed.
    """
    if not path:
        return 0.0
    try:
        value = float(Path(path).read_text(encoding="ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return 0.0
    return value if math.isfinite(value) and value > 0 else 0.0


def lease_deadline() -> float:
    """The deadline from the lease file named by ``CELERY_FLEET_LEASE_FILE``, as beat's fence sees it."""
    return read_deadline(os.environ.get(LEASE_FILE_ENV))


def lease_is_valid() -> bool:
    """Whether this host may dispatch now: exactly the check :data:`LeaseScheduler` makes before sending."""
    return time.monotonic() < lease_deadline()


def write_deadline(path: Path, deadline: float) -> None:
    """Publish the deadline atomically (temp file + rename), so beat never reads half a number."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("0\n" if deadline <= 0 else f"{deadline!r}\n", encoding="ascii")
    os.replace(tmp, path)


# --- the fence inside beat ---------------------------------------------------------------------------


class _LeaseFence:
    """Refuses to send a periodic task once the lease may have expired.

    ``apply_async`` is the last step before a message leaves beat (``tick`` -> ``apply_entry`` ->
    ``apply_async``), so gating it covers every scheduler that builds on ``celery.beat.Scheduler``.
    """

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        deadline = lease_deadline()
        now = time.monotonic()
        if now >= deadline:
            LOG.error(
                "not sending %s: this host does not hold the beat lease (deadline %.3f, now %.3f, file %s)",
                getattr(entry, "name", entry),
                deadline,
                now,
                os.environ.get(LEASE_FILE_ENV),
            )
            return None
        return super().apply_async(entry, producer, advance, **kwargs)  # type: ignore[misc]


@functools.cache
def lease_scheduler_class(inner: str) -> type:
    """Build the fenced scheduler on top of ``inner`` (``module:Class``; empty: PersistentScheduler).

    Subclassing at run time lets redbeat or django-celery-beat keep working under the fence.
    """
    from kombu.utils.imports import symbol_by_name  # noqa: PLC0415 -- only beat needs kombu/celery

    base = symbol_by_name(inner or DEFAULT_INNER_SCHEDULER)
    return type(
        "LeaseScheduler",
        (_LeaseFence, base),
        {"__module__": __name__, "__doc__": f"{base.__name__} that sends only while the lease is held."},
    )


def __getattr__(name: str) -> type:
    """Provide ``LeaseScheduler`` lazily (PEP 562) for ``celery beat --scheduler`` to import.

    Built on first access rather than at import so that the supervisor, which imports this module too,
    never imports celery or the inner scheduler (django-celery-beat would need Django settings there).
    """
    if name == "LeaseScheduler":
        return lease_scheduler_class(os.environ.get(INNER_SCHEDULER_ENV, ""))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def validation_error(ttl: float, renew: float, poll: float, command: Sequence[str]) -> str | None:
    """Why these settings cannot give a safe lease, or None when they can."""
    if not (math.isfinite(ttl) and ttl >= MIN_TTL):
        return f"--ttl must be at least {MIN_TTL:g} seconds (the safety margin alone is 1 s); got {ttl:g}"
    if not 0 < renew < ttl / 2:
        return (
            f"--renew-interval must be > 0 and < --ttl/2 ({ttl / 2:g}) so that the lease survives a failed "
            f"renewal; got {renew:g}"
        )
    if not (math.isfinite(poll) and poll > 0):
        return f"--poll-interval must be > 0; got {poll:g}"
    if not command:
        return "give the beat command after --, e.g. -- celery --app proj beat"
    if any(_names_scheduler(arg) for arg in command):
        return "do not pass --scheduler/-S to beat: give it to this supervisor's --scheduler, which fences it"
    return None


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
    problem = validation_error(args.ttl, args.renew_interval, args.poll_interval, command)
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


class _DeadlineAlarm(BaseException):
    """Raised by SIGALRM inside a Redis call that is still running when the deadline passes.

    A BaseException so that no library ``except Exception`` swallows it.
    """


class _LeaseLost(Exception):
    """The lease is gone, or may be: beat must stop now."""


def connect(settings: Settings) -> redis.Redis:
    """A client whose every call fails fast: short timeouts and no hidden retries."""
    timeout = settings.socket_timeout
    return redis.Redis.from_url(
        settings.broker_url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def holder_token() -> str:
    """The lease value: who leads and since when, readable with a plain ``GET``."""
    since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return f"host={socket.gethostname()} pid={os.getpid()} since={since}"


def _has_exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it: its pid keeps reserving the process group id."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


class Supervisor:
    """Standby until the lease is won; then runs beat and keeps the lease, or stops beat."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self.lock: Lock = client.lock(settings.lock_key, timeout=settings.ttl, thread_local=False)
        self.child: subprocess.Popen[bytes] | None = None
        self.deadline = 0.0
        self.next_renew = 0.0
        self.stop_requested = False
        self.redis_ok: bool | None = None
        self.run_id: str | None = None
        self.quarantine_until = 0.0
        self.info_allowed = True
        self._alarm_armed = False

    # signals

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGALRM, self._on_alarm)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stop_requested:
            LOG.info("received %s: stopping", signal.Signals(signum).name)
        self.stop_requested = True

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self._alarm_armed:
            self._alarm_armed = False
            raise _DeadlineAlarm

    @contextlib.contextmanager
    def _alarm_at_deadline(self) -> Iterator[None]:
        """Interrupt the enclosed Redis call at the deadline instead of waiting for its socket timeout."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlineAlarm
        self._alarm_armed = True
        signal.setitimer(signal.ITIMER_REAL, remaining)
        try:
            yield
        finally:
            self._alarm_armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    # main loop

    def run(self) -> int:
        """Loop until stopped; returns the exit status."""
        s = self.settings
        LOG.info(
            "standing by for lease %r on %s (ttl %gs, renew every %gs, poll every %gs)",
            s.lock_key,
            mask_url(s.broker_url),
            s.ttl,
            s.renew_interval,
            s.poll_interval,
        )
        while not self.stop_requested:
            code = self._standby_tick() if self.child is None else self._leader_tick()
            if code is not None:
                return code
        return self._shutdown()

    def _sleep(self, seconds: float) -> None:
        """Sleep in short slices so that a stop request is seen within TICK."""
        end = time.monotonic() + seconds
        while not self.stop_requested and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, TICK))

    # standby

    def _standby_tick(self) -> int | None:
        if self._may_try_to_lead():
            code = self._try_to_lead()
            if code is not None or self.child is not None:
                return code
        self._sleep(self.settings.poll_interval)
        return None

    def _may_try_to_lead(self) -> bool:
        """False while Redis is unreachable, or while it may have lost a lease that is still in use.

        A Redis that restarted without its data, or a replica promoted in its place, no longer has the
        lease key, yet the previous leader believes in its lease until its deadline, which is less than
        one TTL after the old server last answered. So a standby waits one TTL after seeing a new
        ``run_id``, and, when it meets a server for the first time (it may have just started itself),
        until that server has been up for one TTL.
        """
        if not self.info_allowed:
            return True
        try:
            info = self.client.info("server")
        except NoPermissionError as exc:
            LOG.warning("cannot read INFO (%s): Redis restarts will not be detected", exc)
            self.info_allowed = False
            return True
        except RedisError as exc:
            self._note_unreachable(exc)
            return False
        self._note_reachable()
        run_id = str(info.get("run_id", ""))
        if run_id != self.run_id:
            uptime = int(info.get("uptime_in_seconds", 0))
            self._quarantine_new_server(uptime, restarted=self.run_id is not None)
            self.run_id = run_id
        return time.monotonic() >= self.quarantine_until

    def _quarantine_new_server(self, uptime: int, restarted: bool) -> None:
        """Hold off leading until no lease granted by a previous server can still be in use.

        ``uptime`` counts whole seconds, so the server has been up for more than ``uptime - 1`` s.
        """
        ttl = self.settings.ttl
        wait = max(ttl if restarted else 0.0, ttl - max(0, uptime - 1))
        if wait <= 0:
            return
        self.quarantine_until = max(self.quarantine_until, time.monotonic() + wait)
        LOG.warning(
            "%s (up %ds): waiting %gs before trying to lead, so that a leader holding a lease from a "
            "previous Redis server has surely stopped",
            "Redis restarted or failed over (new run_id)" if restarted else "Redis started recently",
            uptime,
            wait,
        )

    def _try_to_lead(self) -> int | None:
        token = holder_token()
        t_sent = time.monotonic()
        try:
            acquired = self.lock.acquire(blocking=False, token=token)
        except RedisError as exc:
            self._note_unreachable(exc)
            return None
        self._note_reachable()
        if not acquired:
            return None
        self._publish_deadline(t_sent)
        argv = [*self.settings.command, f"--scheduler={SCHEDULER_PATH}"]
        LOG.info("became leader of %r as %r: starting beat: %s", self.settings.lock_key, token, argv)
        env = {
            **os.environ,
            INNER_SCHEDULER_ENV: self.settings.scheduler,
            LEASE_FILE_ENV: str(self.settings.state_file),
        }
        try:
            self.child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            LOG.error("cannot start beat (%s): releasing the lease and exiting", exc)
            self._step_down()
            return 1
        return None

    # leader

    def _leader_tick(self) -> int | None:
        assert self.child is not None
        try:
            if time.monotonic() >= self.deadline:
                raise _LeaseLost("the lease deadline passed without a renewal (Redis unreachable or frozen)")
            if _has_exited(self.child.pid):
                return self._on_child_exit()
            if time.monotonic() >= self.next_renew:
                self._renew()
        except _LeaseLost as lost:
            self._lose_leadership(str(lost))
            return None
        now = time.monotonic()
        wake = min(self.next_renew, self.deadline, now + TICK)
        if wake > now and not self.stop_requested:
            time.sleep(wake - now)
        return None

    def _renew(self) -> None:
        """Extend the lease once. Raises _LeaseLost when it is gone; on Redis trouble, retries soon."""
        t_sent = time.monotonic()
        try:
            with self._alarm_at_deadline():
                self.lock.extend(self.settings.ttl, replace_ttl=True)
        except _DeadlineAlarm:
            raise _LeaseLost("the lease deadline passed while waiting for Redis") from None
        except LockNotOwnedError:
            raise _LeaseLost("the lease is gone: the key expired or another holder took it") from None
        except RedisError as exc:
            self._note_unreachable(exc)
            self.next_renew = time.monotonic() + RETRY_AFTER_ERROR
            return
        self._note_reachable()
        self._publish_deadline(t_sent)

    def _publish_deadline(self, t_sent: float) -> None:
        """Record the new deadline after a successful acquire/extend that was sent at ``t_sent``."""
        s = self.settings
        self.deadline = t_sent + s.ttl - s.margin
        self.next_renew = t_sent + s.renew_interval
        write_deadline(s.state_file, self.deadline)

    def _lose_leadership(self, reason: str) -> None:
        """Close the fence, kill beat at once, and go back to standby."""
        assert self.child is not None
        write_deadline(self.settings.state_file, 0.0)
        LOG.error("lost leadership: %s; stopping beat (pid %d) now", reason, self.child.pid)
        code = self._stop_child(self.settings.kill_grace, keep_renewing=False)
        LOG.warning("beat stopped (exit code %s); standing by", code)
        self._release_quietly()

    def _on_child_exit(self) -> int:
        """Beat exited on its own: give the lease up so another host takes over, and fail the unit."""
        assert self.child is not None
        write_deadline(self.settings.state_file, 0.0)
        code = self._stop_child(0.0, keep_renewing=False)
        LOG.error("beat exited by itself with code %s while leading: releasing the lease and exiting", code)
        self._release_quietly()
        return 1

    def _stop_child(self, grace: float, keep_renewing: bool) -> int:
        """SIGTERM beat's process group, SIGKILL it after ``grace`` seconds, reap beat; returns its status.

        The group is SIGKILLed even after beat exited, before reaping it, to catch stragglers while
        beat's zombie still reserves the group id.
        """
        assert self.child is not None
        pgid = self.child.pid
        _signal_group(pgid, signal.SIGTERM)
        give_up_at = time.monotonic() + grace
        while not _has_exited(pgid) and time.monotonic() < give_up_at:
            if keep_renewing and not self._keep_lease_while_stopping():
                break
            time.sleep(0.05)
        _signal_group(pgid, signal.SIGKILL)
        code = self.child.wait()
        self.child = None
        return code

    def _keep_lease_while_stopping(self) -> bool:
        """Keep renewing while beat shuts down gracefully, so no standby starts a second beat meanwhile."""
        try:
            if time.monotonic() >= self.deadline:
                raise _LeaseLost("the lease deadline passed while beat was stopping")
            if time.monotonic() >= self.next_renew:
                self._renew()
        except _LeaseLost as lost:
            write_deadline(self.settings.state_file, 0.0)
            LOG.error("%s: killing beat", lost)
            return False
        return True

    def _release_quietly(self) -> None:
        """Compare-and-delete the lease if it is still ours; a standby then takes over within its poll."""
        with contextlib.suppress(RedisError):
            self.lock.release()

    def _step_down(self) -> None:
        write_deadline(self.settings.state_file, 0.0)
        self._release_quietly()

    def _shutdown(self) -> int:
        """Stop beat gracefully, then hand the lease over."""
        if self.child is not None:
            LOG.info("stopping beat (pid %d), then releasing the lease", self.child.pid)
            code = self._stop_child(STOP_GRACE, keep_renewing=True)
            LOG.info("beat exited with code %s", code)
        self._step_down()
        LOG.info("stopped; lease %r not held by this host", self.settings.lock_key)
        return 0

    def abort(self) -> None:
        """Last resort after an unexpected error: never leave beat running without a supervisor."""
        with contextlib.suppress(Exception):
            write_deadline(self.settings.state_file, 0.0)
        if self.child is not None:
            with contextlib.suppress(Exception):
                self._stop_child(self.settings.kill_grace, keep_renewing=False)
        with contextlib.suppress(Exception):
            self._release_quietly()

    # reachability, logged once per change

    def _note_unreachable(self, exc: Exception) -> None:
        if self.redis_ok is not False:
            if self.child is None:
                LOG.error("Redis unreachable: no beat runs on this host until the lease is held (%s)", exc)
            else:
                LOG.error(
                    "Redis unreachable while leading: beat stops at the lease deadline, in %.1fs, unless a "
                    "renewal succeeds first (%s)",
                    self.deadline - time.monotonic(),
                    exc,
                )
        self.redis_ok = False

    def _note_reachable(self) -> None:
        if self.redis_ok is False:
            LOG.info("Redis reachable again")
        self.redis_ok = True


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    configure_logging(settings.broker_url)
    try:
        write_deadline(settings.state_file, 0.0)
    except OSError as exc:
        LOG.error("cannot write the state file %s: %s", settings.state_file, exc)
        return 2
    supervisor = Supervisor(settings, connect(settings))
    supervisor.install_signal_handlers()
    try:
        return supervisor.run()
    except BaseException:
        LOG.exception("unexpected error: stopping beat and giving the lease up")
        supervisor.abort()
        raise


if __name__ == "__main__":
    sys.exit(main())
