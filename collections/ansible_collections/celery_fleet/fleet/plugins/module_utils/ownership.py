"""What the fleet itself sets on a Celery command line and in a unit's environment.

A worker entry's fields, the unit and the lease-guarded beat own these. ``extra_args`` and ``env``
must not set them, in any spelling: preflight parses ``extra_args`` with the wheelhouse's own
Celery parser (``celery_fleet.cli_report``) and checks the parameter names it reports here.
"""

from __future__ import annotations

import re

# click parameter of `celery worker` -> the worker entry field that sets it.
WORKER_FIELDS = {
    "queues": "queues",
    "exclude_queues": "queues",
    "pool": "pool",
    "concurrency": "concurrency",
    "autoscale": "autoscale",
    "hostname": "name",
    "loglevel": "loglevel",
    "prefetch_multiplier": "prefetch_multiplier",
    "max_tasks_per_child": "max_tasks_per_child",
    "max_memory_per_child": "max_memory_per_child",
    "time_limit": "time_limit",
    "soft_time_limit": "soft_time_limit",
}
# Parameters that make a worker run beat: only the lease-guarded celery_beat unit may.
WORKER_BEAT = ("beat", "schedule_filename", "scheduler")
# The daemon options every Celery daemon command (worker, beat) shares: the unit decides them all.
DAEMON_OWNED = {
    "logfile": "the log goes to the journal",
    "uid": "the unit's User= sets it",
    "gid": "the unit's Group= sets it",
    "umask": "the unit sets it",
    "executable": "it applies to --detach only",
}
# Parameters the unit itself decides, and why.
WORKER_UNIT = {
    "detach": "the unit runs the worker in the foreground (Type=exec)",
    "pidfile": "systemd tracks the process itself",
    **DAEMON_OWNED,
    "purge": "it would discard every queued task at each start",
}
# The `celery worker` parameters extra_args may set. A parameter a newer Celery adds is refused until
# it is judged here: an allow-list, so no spelling of an unknown option can slip through.
WORKER_ALLOWED = (
    "statedb",
    "optimization",
    "disable_prefetch",
    "task_events",
    "pool_start_method",
    "include",
    "without_gossip",
    "without_mingle",
    "without_heartbeat",
    "heartbeat_interval",
)
# click parameter of `celery beat` -> the celery_beat variable that sets it, or why the unit owns it.
BEAT_OWNED = {
    "schedule": "the unit keeps the schedule in /var/lib/celery-beat",
    "scheduler": "set celery_beat_scheduler instead",
    "loglevel": "set celery_beat_loglevel instead",
    "detach": "the supervisor runs beat in the foreground",
    "pidfile": "the supervisor tracks beat itself",
    **DAEMON_OWNED,
}
BEAT_ALLOWED = ("max_interval", "remote_control", "hostname")
# Flower options the role sets or that decide who may see Flower.
FLOWER_OWNED = {
    "address": "set flower_address instead",
    "port": "set flower_port instead",
    "unix_socket": "set flower_address and flower_port instead",
    "basic_auth": "set flower_user and flower_password instead",
    "auth": "Flower's auth is flower_user/flower_password",
    "auth_provider": "Flower's auth is flower_user/flower_password",
    "oauth2_key": "Flower's auth is flower_user/flower_password",
    "oauth2_secret": "Flower's auth is flower_user/flower_password",
    "oauth2_redirect_uri": "Flower's auth is flower_user/flower_password",
    "unauthenticated_api": "it opens Flower's API without auth",
    "conf": "every Flower setting comes from the role",
    "broker_api": "Flower reads the broker from the fleet's environment",
}
# Flower options its unit rules out, and why.
FLOWER_UNIT = {
    "cookie_secret": "a secret on a command line is visible to every process of the host",
    "debug": "it turns on autoreload and tracebacks in the browser",
    "db": "the unit keeps no state (no persistent mode)",
    "persistent": "the unit keeps no state (no persistent mode)",
    "state_save_interval": "the unit keeps no state (no persistent mode)",
    "format_task": "it names Python code, which a command line cannot pass",
    "help": "it prints the help and exits",
    "logging": "the log goes to the journal",
    "log_to_stderr": "the log goes to the journal",
    "log_file_prefix": "the log goes to the journal",
    "log_file_max_size": "the log goes to the journal",
    "log_file_num_backups": "the log goes to the journal",
    "log_rotate_when": "the log goes to the journal",
    "log_rotate_interval": "the log goes to the journal",
    "log_rotate_mode": "the log goes to the journal",
}
# The Flower options flower_extra_args may set: an allow-list, so an option a newer Flower adds is
# refused until it is judged here.
FLOWER_ALLOWED = (
    "url_prefix",
    "xheaders",
    "read_only",
    "max_workers",
    "max_tasks",
    "natural_time",
    "tasks_columns",
    "auto_refresh",
    "purge_offline_workers",
    "inspect_timeout",
    "enable_events",
    "task_runtime_metric_buckets",
    "certfile",
    "keyfile",
    "ca_certs",
)

# The choices of celery.bin.base.LogLevel, which compares them in upper case.
LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")

# Environment the unit sets, and prefixes whose every name a program of the unit reads as its options:
# Celery's command line reads CELERY_<OPTION> and CELERY_<COMMAND>_<OPTION> (CELERY_WORKER_BEAT=1
# starts an embedded beat), Flower reads every FLOWER_<OPTION>.
UNIT_ENV = {
    "CUDA_VISIBLE_DEVICES": "gpus",
    "CUDA_DEVICE_ORDER": "gpus",
}
OWNED_ENV_PREFIXES = {
    "CELERY_": "Celery's command line reads every CELERY_* variable as one of its options "
    "(CELERY_WORKER_BEAT=1 starts a beat), and the unit sets CELERY_BROKER_URL itself",
    "FLOWER_": "Flower reads every FLOWER_* variable as one of its options (its address, port and auth)",
}
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# No argv element or environment value can carry these through systemd and exec.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What `celery --app` takes: a module path, optionally with `:attribute`.
APP_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?", re.ASCII)


def app_error(where: str, value: object) -> str | None:
    """The message for a value ``celery --app`` cannot take, or None."""
    if isinstance(value, str) and APP_MODULE.fullmatch(value):
        return None
    return f"{where} {value!r} is not a module path for `celery --app`; write it like pkg.apps.gpu."


def env_owner(name: str) -> str | None:
    """Why the fleet owns environment variable ``name``, or None when a user may set it."""
    if name in UNIT_ENV:
        return f"the unit sets it from the entry's {UNIT_ENV[name]} field"
    for prefix, why in OWNED_ENV_PREFIXES.items():
        if name.upper().startswith(prefix):
            return why
    return None
