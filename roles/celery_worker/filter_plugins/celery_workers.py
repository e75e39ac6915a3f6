"""A host's worker plan: its ``celery_workers`` parsed once into errors, warnings and systemd instances."""

from __future__ import annotations

import math
import re
from typing import Any

from ansible.module_utils.common.validation import check_type_bool, check_type_int
from ansible_collections.celery_fleet.fleet.plugins.module_utils.ownership import (
    CONTROL,
    ENV_NAME,
    LOGLEVELS,
    app_error,
    env_owner,
)
from ansible_collections.celery_fleet.fleet.plugins.module_utils.sizes import FORMS, mib, parse_size
from ansible_collections.celery_fleet.fleet.plugins.module_utils.systemd import env_assignment

DOCUMENTATION = r"""
name: celery_worker_plan
short_description: Parse a host's worker entries once into the errors and the systemd instances
description:
  - Takes a host's C(celery_workers) list, fills each entry's defaults (some derived from the pool, the
    CPUs and the memory limit), validates every field, expands C(replicas) and GPU slices, and checks
    the host as a whole (unit names, shared GPUs, the memory budget).
  - Every value is parsed once; C(instances) hold the parsed values (sizes in bytes) ready to render.
    Preflight sets the result as a fact and every later step reads it.
positional: _input, fields, host, overrides
options:
  _input:
    description: The host's C(celery_workers) list.
    type: list
    elements: dict
    required: true
  fields:
    description: Every field an entry may have and its default (C(_celery_worker_fields)).
    type: dict
    required: true
  host:
    description:
      - What the host has and what the fleet sets for it, all optional - C(cpus) (online CPUs), C(gpus)
        (C(index), C(uuid), C(minor) from nvidia-smi or /dev/nvidiaN), C(gpu_source), C(memtotal_mb),
        C(app) (the default app module), C(broker_maxmemory) (this host's Redis cap, when it is the
        broker) and C(memory_overcommit) (how far the limits may add up past the RAM, 1.0 = not at all).
    type: dict
    required: false
  overrides:
    description: Fleet-wide defaults for some fields (C(celery_worker_defaults)); other keys are refused.
    type: dict
    required: false
"""

EXAMPLES = r"""
plan: "{{ celery_workers | celery_worker_plan(_celery_worker_fields, {'cpus': 8}, celery_worker_defaults) }}"
"""

RETURN = r"""
_value:
  description: >-
    C(errors) and C(warnings) (messages naming the variable and the fix) and C(instances): one dict per
    systemd instance - C(instance), C(app), C(args) (the C(celery worker) arguments, each one argument),
    C(environment) (lines of an environment file), C(memory_max), C(memory_high) (bytes), C(cpus),
    C(cpu_quota), C(devices), C(oom_policy) besides the entry's parsed fields; and C(entries): each entry
    once, with its parsed and derived fields and C(units), the names of its instances. Both are empty
    when there are errors.
  type: dict
"""

POOLS = ("prefork", "threads", "solo", "gevent", "eventlet")
# Pools whose tasks run in separate child processes: per-child recycling and
# OOMPolicy=continue only mean something there.
PROCESS_POOLS = ("prefork",)
# Thread pools of numeric libraries size themselves from all the host's CPUs
# unless told otherwise; each process then oversubscribes the machine.
THREAD_CAP_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "RAYON_NUM_THREADS",
)
# Character devices every CUDA process opens besides its own /dev/nvidiaN.
GPU_SHARED_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
# What differs between the units of one entry.
INSTANCE_FIELDS = ("instance", "gpus", "devices", "environment", "handoff")
CPU_SET = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")
UUID = re.compile(r"(GPU|MIG)-[0-9A-Za-z-]+")
DIGITS = re.compile(r"[0-9]+")
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
# Celery splits --queues on commas; whitespace and control characters make names nobody can route to.
QUEUE_BAD = re.compile(r"[,\s\x00-\x1f\x7f]")
FIX = "Fix the entry in this host's celery_workers (group_vars or host_vars)."
OVERCOMMIT_VAR = "celery_worker_memory_overcommit"
DEFAULTS_VAR = "celery_worker_defaults"
DEFAULTS_FIX = f"Fix: correct {DEFAULTS_VAR} in group_vars/host_vars; name only the fields to change."


def parse_cpus(value: Any) -> list[int] | None:
    """The CPUs of a CPU set given as ``"0-3,8"`` or ``[0, 1, 2]``; None if malformed."""
    if isinstance(value, list):
        if value and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value):
            return sorted(set(value))
        return None
    text = str(value).replace(" ", "")
    if not CPU_SET.fullmatch(text):
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        if high and int(high) < int(low):
            return None
        cpus.update(range(int(low), int(high or low) + 1))
    return sorted(cpus)


def cpu_set_string(cpus: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2 5"``, the form systemd prints back for CPUAffinity=."""
    ranges: list[str] = []
    start = prev = cpus[0]
    for cpu in [*cpus[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        ranges.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return " ".join(ranges)


def parse_quota(value: Any) -> int | None:
    """CPU quota in percent of one CPU, from ``200%``."""
    if not isinstance(value, str) or not value.endswith("%"):
        return None
    text = value.removesuffix("%")
    return int(text) if DIGITS.fullmatch(text) and int(text) > 0 else None


def _gpu_id(value: Any) -> int | str | None:
    """A GPU as an index or a UUID; None if it is neither."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and DIGITS.fullmatch(value):
        return int(value)
    if isinstance(value, str) and UUID.fullmatch(value):
        return value
    return None


def _find_gpu(gpu: int | str, host_gpus: list[dict[str, Any]]) -> dict[str, Any] | None:
    key = "index" if isinstance(gpu, int) else "uuid"
    return next((g for g in host_gpus if g.get(key) == gpu), None)


def _as_int(value: Any) -> int | None:
    """An integer as the argument spec converts it (``"2"`` is 2), or None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return check_type_int(value)
    except (TypeError, ValueError):
        return None


class Entry:
    """One worker entry parsed: ``spec`` holds the parsed values, ``errors`` what is wrong."""

    def __init__(self, where: str, spec: dict[str, Any]) -> None:
        self.where = where
        self.raw = spec
        self.spec: dict[str, Any] = {}
        self.errors: list[str] = []

    def fail(self, field: str, message: str, fix: str = FIX) -> None:
        self.errors.append(f"{self.where}.{field} {message} {fix}".rstrip())

    def integer(self, field: str, low: int | None, high: int | None = None, what: str = "") -> int | None:
        """An integer field, converted as the argument spec converts it (``"2"`` is 2)."""
        value = self.raw.get(field)
        if value is None:
            return None
        number = _as_int(value)
        if number is None or (low is not None and number < low) or (high is not None and number > high):
            self.fail(field, f"{value!r} must be {what or _range(low, high)}.")
            return None
        return number

    def size(self, field: str) -> int | None:
        value = self.raw.get(field)
        if value in (None, ""):
            return None
        size = parse_size(value)
        if size is None:
            self.fail(field, f"{value!r} is not a size; write {FORMS}.")
        return size


def _range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"an integer from {low} to {high}"
    if low == 1:
        return "a positive integer"
    return f"an integer of at least {low}" if low is not None else "an integer"


def _parse_identity(e: Entry, host: dict[str, Any]) -> None:
    name = e.raw.get("name")
    e.spec["name"] = name
    app = e.raw.get("app") or host.get("app") or ""
    error = app_error(f"{e.where}.app", app)
    if error:
        e.errors.append(f"{error} {FIX}")
    e.spec["app"] = app
    queues = e.raw.get("queues")
    if not isinstance(queues, list) or not queues or not all(isinstance(q, str) and q for q in queues):
        e.fail("queues", "must be a non-empty list of queue names.")
        return
    bad = [q for q in queues if QUEUE_BAD.search(q)]
    if bad:
        e.fail(
            "queues",
            f"{bad!r} hold a comma, whitespace or a control character: Celery splits --queues on commas, "
            "so the worker would consume other queues than these.",
        )
    if len(set(queues)) != len(queues):
        e.fail("queues", f"{queues!r} lists a queue twice.")
    e.spec["queues"] = list(queues)
    loglevel = e.raw.get("loglevel")
    if not isinstance(loglevel, str) or loglevel.upper() not in LOGLEVELS:
        e.fail("loglevel", f"{loglevel!r} is not one of {', '.join(LOGLEVELS)}.")
    e.spec["loglevel"] = str(loglevel).upper()


def _parse_pool(e: Entry) -> None:
    pool = e.raw.get("pool")
    if pool not in POOLS:
        e.fail("pool", f"{pool!r} is not one of {', '.join(POOLS)}.")
    e.spec["pool"] = pool
    e.spec["concurrency"] = e.integer("concurrency", 1)
    autoscale = e.raw.get("autoscale")
    e.spec["autoscale"] = None
    if autoscale is not None:
        low = _as_int(autoscale.get("min")) if isinstance(autoscale, dict) else None
        high = _as_int(autoscale.get("max")) if isinstance(autoscale, dict) else None
        if (
            not isinstance(autoscale, dict)
            or set(autoscale) != {"min", "max"}
            or low is None
            or high is None
            or not 0 <= low <= high
            or high < 1
        ):
            e.fail("autoscale", f"{autoscale!r} must be {{min: N, max: M}} with 0 <= N <= M, M > 0.")
        elif pool != "prefork":
            e.fail("autoscale", f"needs pool prefork, not {pool}; set concurrency instead.")
        else:
            e.spec["autoscale"] = {"min": low, "max": high}
        if e.raw.get("concurrency") is not None:
            e.errors.append(f"{e.where} sets both concurrency and autoscale; keep one. {FIX}")
    e.spec["prefetch_multiplier"] = e.integer("prefetch_multiplier", 1)
    if e.raw.get("prefetch_multiplier") is None:
        e.fail("prefetch_multiplier", "None must be a positive integer.")
    e.spec["max_tasks_per_child"] = e.integer("max_tasks_per_child", 0, what="0 (never) or more")
    e.spec["replicas"] = e.integer("replicas", 1) or 1
    if e.raw.get("replicas") is None:
        e.fail("replicas", "None must be a positive integer.")


def _parse_limits(e: Entry) -> None:
    e.spec["memory_max"] = top = e.size("memory_max")
    e.spec["memory_high"] = high = e.size("memory_high")
    if high and not top:
        e.fail(
            "memory_high",
            f"{e.raw['memory_high']} is set without memory_max; the unit would have a throttle but no limit.",
            "Fix: set memory_max too (memory_high defaults to 90% of it), or remove memory_high.",
        )
    if high and top and high > top:
        e.fail(
            "memory_high",
            f"{e.raw['memory_high']} is above memory_max {e.raw['memory_max']}; the unit would be killed "
            "before it is ever throttled.",
        )
    e.spec["max_memory_per_child"] = child = e.size("max_memory_per_child")
    if child and top and child >= top:
        e.fail(
            "max_memory_per_child",
            f"{e.raw['max_memory_per_child']} is not below memory_max {e.raw['memory_max']}: the kernel "
            "kills the child at memory_max first, so the cap can never fire.",
            f"Fix: lower max_memory_per_child below {e.raw['memory_max']}, or leave it out to derive it.",
        )
    if child and e.spec.get("pool") not in PROCESS_POOLS:
        e.fail(
            "max_memory_per_child",
            f"is set, but pool {e.spec.get('pool')} has no child processes to replace, so it can never fire.",
            "Fix: remove it, or use pool prefork.",
        )
    cpus = e.raw.get("cpus")
    e.spec["cpu_list"] = None
    if cpus not in (None, "", []):
        e.spec["cpu_list"] = parse_cpus(cpus)
        if e.spec["cpu_list"] is None:
            e.fail("cpus", f'{cpus!r} must be a CPU set like "0-3,8" or [0, 1].')
    quota = e.raw.get("cpu_quota")
    e.spec["quota"] = None
    if quota not in (None, ""):
        e.spec["quota"] = parse_quota(quota)
        if e.spec["quota"] is None:
            e.fail("cpu_quota", f"{quota!r} must be a percentage like 200%.")
    e.spec["nice"] = e.integer("nice", -20, 19)
    for field in ("stop_timeout", "time_limit", "soft_time_limit"):
        e.spec[field] = e.integer(field, 1, what="a positive number of seconds")
    hard, soft, stop = e.spec["time_limit"], e.spec["soft_time_limit"], e.spec["stop_timeout"]
    if hard and soft and soft >= hard:
        e.fail(
            "soft_time_limit",
            f"{soft} must be below time_limit {hard}, or the task never gets the chance to clean up.",
        )
    if hard and stop and stop < hard:
        e.fail(
            "stop_timeout",
            f"{stop} is shorter than time_limit {hard}: a restart would kill tasks still within their limit.",
            f"Fix: raise stop_timeout to at least {hard} or lower time_limit.",
        )


def _parse_args_env(e: Entry) -> None:
    extra = e.raw.get("extra_args") or []
    e.spec["extra_args"] = []
    if not isinstance(extra, list) or not all(isinstance(a, str | int | float) for a in extra):
        e.fail("extra_args", "must be a list of arguments (strings).")
    elif any(CONTROL.search(str(a)) for a in extra):
        e.fail("extra_args", f"{extra!r} holds a control character (a newline?); no argument can carry one.")
    else:
        e.spec["extra_args"] = [str(a) for a in extra]
    env = e.raw.get("env") or {}
    e.spec["env"] = {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and ENV_NAME.fullmatch(k) for k in env):
        e.fail("env", "must map environment variable names to values.")
        return
    for name, value in env.items():
        owner = env_owner(name)
        if owner:
            e.fail(f"env.{name}", f"is the fleet's to set: {owner}.", "Fix: remove it from env.")
        elif isinstance(value, dict | list) or value is None:
            e.fail(f"env.{name}", f"{value!r} must be a string or a number.")
        elif CONTROL.search(str(value)):
            e.fail(f"env.{name}", f"{value!r} holds a control character (a newline?).")
    if not any(True for err in e.errors if f"{e.where}.env" in err):
        e.spec["env"] = dict(env)


def _parse_gpus(e: Entry, host: dict[str, Any] | None) -> None:
    gpus = e.raw.get("gpus") or []
    per = e.raw.get("gpus_per_worker")
    per_workers = _as_int(per)
    e.spec["gpu_ids"] = []
    try:
        e.spec["gpu_sharing"] = check_type_bool(e.raw.get("gpu_sharing") or False)
    except TypeError:
        e.fail("gpu_sharing", f"{e.raw.get('gpu_sharing')!r} must be true or false.")
        e.spec["gpu_sharing"] = False
    if not isinstance(gpus, list):
        e.fail("gpus", "must be a list of GPU indices or UUIDs.")
        return
    bad = [g for g in gpus if _gpu_id(g) is None]
    if bad:
        e.fail("gpus", f"{bad!r} are not GPU indices (0, 1, ...) or UUIDs (GPU-...).")
        return
    ids = [_gpu_id(g) for g in gpus]
    if len(set(ids)) != len(ids):
        e.fail("gpus", "lists a GPU twice.")
    e.spec["gpu_ids"] = ids
    e.spec["gpus_per_worker"] = None
    if per is not None:
        if not gpus:
            e.fail("gpus_per_worker", "is set but gpus is empty.")
        elif per_workers is None or per_workers < 1 or len(gpus) % per_workers:
            e.fail("gpus_per_worker", f"{per!r} must divide the {len(gpus)} GPUs in gpus evenly.")
        else:
            e.spec["gpus_per_worker"] = per_workers
    if host is None or not ids:
        return
    host_gpus = list(host.get("gpus") or [])
    source = host.get("gpu_source") or "nvidia-smi"
    for gpu in ids:
        if isinstance(gpu, str) and source != "nvidia-smi":
            e.fail(
                "gpus",
                f"{gpu} is a UUID but the host has no nvidia-smi to map it to a device.",
                "Fix: give the GPU index, or install the NVIDIA driver first.",
            )
        elif gpu is not None and _find_gpu(gpu, host_gpus) is None:
            have = ", ".join(str(g.get("index")) for g in host_gpus) or "none"
            e.fail(
                "gpus",
                f"{gpu} is not on this host (its GPUs, from {source}: {have}).",
                "Fix: use a GPU the host has, or move the entry to a host with that GPU.",
            )


def parse_entry(
    index: int, entry: Any, defaults: dict[str, Any], host: dict[str, Any], seen: set[str]
) -> Entry:
    """Every field of one entry parsed and checked, once."""
    where = f"celery_workers[{index}]"
    if not isinstance(entry, dict):
        e = Entry(where, {})
        e.errors.append(f"{where} must be a mapping with name and queues. {FIX}")
        return e
    raw = {**defaults, **{k: v for k, v in entry.items() if v is not None}}
    name = raw.get("name")
    e = Entry(where, raw)
    if not isinstance(name, str) or not name or not set(name) <= NAME_CHARS or name[0] in "-_":
        e.fail("name", f"{name!r} must be lowercase letters, digits, '-' or '_'.")
    elif name in seen:
        e.fail("name", f"{name!r} is used twice; worker names must be unique.")
    else:
        seen.add(name)
        e.where = f"celery_workers[{name}]"
    unknown = sorted(set(entry) - set(defaults) - {"name", "queues"})
    if unknown:
        e.errors.append(f"{e.where} has unknown fields {', '.join(unknown)}. {FIX}")
    _parse_identity(e, host)
    _parse_pool(e)
    _parse_limits(e)
    _parse_args_env(e)
    _parse_gpus(e, host)
    cpus, host_cpus = e.spec.get("cpu_list"), host.get("cpus")
    if cpus and host_cpus and max(cpus) >= int(host_cpus):
        e.fail(
            "cpus",
            f"{raw['cpus']!r} names CPU {max(cpus)} but the host has {host_cpus} (0-{int(host_cpus) - 1}).",
        )
    return e


def _processes(spec: dict[str, Any], cpus: int) -> int:
    """How many tasks the unit runs at once, at most."""
    if spec["pool"] == "solo":
        return 1
    if spec["autoscale"]:
        return int(spec["autoscale"]["max"])
    if spec["concurrency"]:
        return int(spec["concurrency"])
    return {"prefork": cpus, "threads": 2 * cpus}.get(spec["pool"], 100)


def worker_args(spec: dict[str, Any]) -> list[str]:
    """The ``celery worker`` arguments of one instance after ``--hostname``; each is one argument."""
    args = [f"--queues={','.join(spec['queues'])}", f"--pool={spec['pool']}"]
    if spec["autoscale"]:
        args.append(f"--autoscale={spec['autoscale']['max']},{spec['autoscale']['min']}")
    else:
        args.append(f"--concurrency={spec['concurrency']}")
    args += [f"--prefetch-multiplier={spec['prefetch_multiplier']}", f"--loglevel={spec['loglevel']}"]
    # Task events from the start, not only once Flower asks: its task metrics count every outcome.
    args.append("--task-events")
    if spec["pool"] in PROCESS_POOLS:
        if spec["max_tasks_per_child"]:
            args.append(f"--max-tasks-per-child={spec['max_tasks_per_child']}")
        if spec["child_kib"]:
            args.append(f"--max-memory-per-child={spec['child_kib']}")
    if spec["time_limit"]:
        args.append(f"--time-limit={spec['time_limit']}")
    if spec["soft_time_limit"]:
        args.append(f"--soft-time-limit={spec['soft_time_limit']}")
    return args + spec["extra_args"]


def expand(spec: dict[str, Any], host: dict[str, Any]) -> list[dict[str, Any]]:
    """The systemd instances of one parsed entry: derived defaults, replicas and GPU slices."""
    spec = dict(spec)
    cpu_list, quota = spec.pop("cpu_list"), spec.pop("quota")
    cpus = len(cpu_list) if cpu_list else (math.ceil(quota / 100) if quota else int(host.get("cpus") or 1))
    processes = _processes(spec, cpus)
    if not spec["autoscale"]:
        spec["concurrency"] = processes
    if spec["memory_max"] and not spec["memory_high"]:
        # Throttle and reclaim before the hard limit kills anything.
        spec["memory_high"] = spec["memory_max"] * 9 // 10
    limit = spec["memory_high"] or spec["memory_max"]
    child = spec["max_memory_per_child"]
    if child is None and spec["pool"] in PROCESS_POOLS and limit:
        # Replace a child after a task that left it over its share, before the cgroup limit hits.
        child = limit // processes
    spec["child_kib"] = max(1, child // 1024) if child else None
    if spec["max_tasks_per_child"] is None:
        spec["max_tasks_per_child"] = 1000 if spec["pool"] in PROCESS_POOLS else 0
    if not spec["stop_timeout"]:
        spec["stop_timeout"] = spec["time_limit"] or 600
    threads = max(1, cpus // (1 if spec["pool"] in ("gevent", "eventlet") else processes))
    ids = spec.pop("gpu_ids")
    per = spec.pop("gpus_per_worker") or len(ids) or 1
    slices = [ids[i : i + per] for i in range(0, len(ids), per)] or [[]]
    total = len(slices) * spec["replicas"]
    args = worker_args(spec)
    host_gpus = list(host.get("gpus") or [])
    instances = []
    for gpus in slices:
        for _ in range(spec["replicas"]):
            env: dict[str, Any] = {name: threads for name in THREAD_CAP_VARS}
            devices: list[str] = []
            if gpus:
                env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
                for gpu in gpus:
                    found = _find_gpu(gpu, host_gpus)
                    devices.append(f"/dev/nvidia{found['minor'] if found else gpu}")
            else:
                # CPU-only: CUDA sees no device even where the nodes exist.
                env["CUDA_VISIBLE_DEVICES"] = ""
            # env may replace the derived thread caps; the plan refuses the names the fleet owns.
            env.update(spec["env"])
            ordinal = len(instances) + 1
            instances.append(
                {
                    **spec,
                    "instance": spec["name"] if total == 1 else f"{spec['name']}-{ordinal}",
                    "args": args,
                    "gpus": gpus,
                    "devices": [*GPU_SHARED_NODES, *devices] if devices else [],
                    "environment": [env_assignment(k, v) for k, v in sorted(env.items())],
                    "cpus": cpu_set_string(cpu_list) if cpu_list else None,
                    "cpu_quota": f"{quota}%" if quota else None,
                    "oom_policy": "continue" if spec["pool"] in PROCESS_POOLS else "stop",
                }
            )
    return instances


def _unit_name_errors(instances: list[dict[str, Any]]) -> list[str]:
    names = [i["instance"] for i in instances]
    return [
        f"celery_workers: the unit name {dup!r} comes from two entries (replicas and GPU slices are "
        "numbered name-1, name-2, ...). Fix: rename one entry."
        for dup in sorted({n for n in names if names.count(n) > 1})
    ]


def _shared_gpu_errors(instances: list[dict[str, Any]]) -> list[str]:
    """A GPU pinned to two units, unless every entry that uses it allows sharing."""
    users: dict[str, list[tuple[str, bool]]] = {}
    for inst in instances:
        for node in inst["devices"][len(GPU_SHARED_NODES) :]:
            users.setdefault(node, []).append((inst["instance"], inst["gpu_sharing"]))
    return [
        f"celery_workers: {node} is pinned to {len(owners)} units ({', '.join(n for n, _ in owners)}); they "
        "would fight over its memory. Fix: give each unit its own GPU, or set gpu_sharing: true on every "
        "entry that uses it."
        for node, owners in sorted(users.items())
        if len(owners) > 1 and not all(sharing for _, sharing in owners)
    ]


def memory_budget(instances: list[dict[str, Any]], host: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The host's memory_max limits and its broker's maxmemory against its RAM times the overcommit."""
    bounded = [i for i in instances if i["memory_max"]]
    unbounded = sorted({i["name"] for i in instances if not i["memory_max"]})
    broker = parse_size(host.get("broker_maxmemory") or "")
    ratio = float(host.get("memory_overcommit") or 1.0)
    warnings = []
    if bounded and unbounded:
        warnings.append(
            f"celery_workers {', '.join(unbounded)} set no memory_max while others on this host do: their "
            "memory is unbounded and not in the budget. Fix: set memory_max on those entries."
        )
    if bounded and host.get("broker") and not broker:
        warnings.append(
            "this host runs the broker with no redis_maxmemory, so Redis's memory is unbounded and not in "
            "the budget. Fix: set redis_maxmemory (e.g. 2G)."
        )
    memtotal = host.get("memtotal_mb")
    if bounded and not memtotal:
        warnings.append(
            "ansible_facts.memtotal_mb is unknown, so the memory_max budget was not checked. "
            "Fix: gather facts (gather_facts: true) before the preflight."
        )
    if not bounded or not memtotal:
        return [], warnings
    parts: dict[tuple[str, int], int] = {}
    for inst in bounded:
        parts[(inst["name"], inst["memory_max"])] = parts.get((inst["name"], inst["memory_max"]), 0) + 1
    total = sum(i["memory_max"] for i in bounded) + (broker or 0)
    allowed = int(memtotal) * 1024**2 * ratio
    if total <= allowed:
        return [], warnings
    breakdown = ", ".join(f"{name} {n}x{mib(size)} MiB" for (name, size), n in sorted(parts.items()))
    if broker:
        breakdown += f", the broker's redis_maxmemory {mib(broker)} MiB"
    over = f"{ratio:g} times its {memtotal} MiB of RAM" if ratio != 1 else f"the host's {memtotal} MiB of RAM"
    return [
        f"the memory_max of its celery_workers adds up to {mib(total)} MiB ({breakdown}), more than {over}: "
        "the limits cannot all hold, and the kernel OOM-kills outside any one worker's limit. Fix: lower "
        "memory_max, replicas or gpus in this host's celery_workers, move an entry to another host, or, to "
        f"let limits overcommit the RAM as Kubernetes limits may, set {OVERCOMMIT_VAR} (e.g. 1.5) for it."
    ], warnings


def rollout_overlap(instances: list[dict[str, Any]], host: dict[str, Any]) -> list[str]:
    """Set each instance's ``handoff``: ``overlap`` where its new unit fits in the budget beside the old.

    A rollout starts the new unit before the old one drains, so both hold memory at once. The units that
    fit in what the budget leaves get that overlap, in order; the rest restart in place, one at a time,
    and the warning names the queues that then wait for them.
    """
    memtotal = host.get("memtotal_mb")
    for inst in instances:
        inst["handoff"] = "overlap"
    if not memtotal:
        return []
    broker = parse_size(host.get("broker_maxmemory") or "") or 0
    allowed = int(memtotal) * 1024**2 * float(host.get("memory_overcommit") or 1.0)
    room = allowed - sum(i["memory_max"] or 0 for i in instances) - broker
    in_place = []
    for inst in instances:
        if not inst["memory_max"]:
            continue
        if inst["memory_max"] <= room:
            room -= inst["memory_max"]
        else:
            inst["handoff"] = "in_place"
            in_place.append(inst)
    return [
        f"celery_workers[{inst['name']}]: the memory budget has no room to run {inst['instance']}'s new "
        f"unit ({mib(inst['memory_max'])} MiB) beside its old one during a rollout, so it restarts in place, "
        f"one unit at a time: its queues {', '.join(inst['queues'])} get no consumer from it for up to "
        f"{inst['stop_timeout'] + 30} s (its stop_timeout plus 30) and its start. Fix: lower memory_max or "
        f"replicas here, or raise {OVERCOMMIT_VAR}, if the overlap should never leave a gap."
        for inst in in_place
    ]


def _overcommit_errors(host: dict[str, Any]) -> list[str]:
    ratio = host.get("memory_overcommit", 1.0)
    try:
        ok = math.isfinite(float(ratio)) and float(ratio) >= 1.0 and not isinstance(ratio, bool)
    except (TypeError, ValueError):
        ok = False
    if ok:
        return []
    return [
        f"{OVERCOMMIT_VAR} {ratio} must be 1.0 (the limits fit in RAM) or more (they may overcommit it). "
        f"Fix: set {OVERCOMMIT_VAR} to 1.0, or e.g. 1.5, for this host."
    ]


def _override_errors(fields: dict[str, Any], overrides: Any) -> list[str]:
    if not isinstance(overrides, dict):
        return [f"{DEFAULTS_VAR} must map entry fields to their defaults. {DEFAULTS_FIX}"]
    unknown = sorted(set(overrides) - set(fields))
    if not unknown:
        return []
    return [
        f"{DEFAULTS_VAR} has unknown fields {', '.join(map(str, unknown))}; the fields are "
        f"{', '.join(sorted(fields))}. {DEFAULTS_FIX}"
    ]


def celery_worker_plan(
    workers: Any,
    fields: dict[str, Any],
    host: dict[str, Any] | None = None,
    overrides: Any = None,
) -> dict[str, list[Any]]:
    """The host's worker plan: ``errors``, ``warnings``, ``instances`` and ``entries``, from one parse."""
    host = host or {}
    overrides = {} if overrides is None else overrides
    errors = _override_errors(fields, overrides)
    if not isinstance(workers, list):
        errors.append(f"celery_workers must be a list of worker entries. {FIX}")
    if errors:
        return {"errors": errors, "warnings": [], "instances": [], "entries": []}
    defaults = {**fields, **overrides}
    seen: set[str] = set()
    entries = [parse_entry(i, entry, defaults, host, seen) for i, entry in enumerate(workers)]
    errors = [error for e in entries for error in e.errors] + _overcommit_errors(host)
    if errors:
        return {"errors": errors, "warnings": [], "instances": [], "entries": []}
    expanded = [expand(e.spec, host) for e in entries]
    instances = [inst for group in expanded for inst in group]
    # Each entry once, with its derived fields, for checks that judge entries rather than units.
    parsed = [
        {
            **{k: v for k, v in group[0].items() if k not in INSTANCE_FIELDS},
            "units": [i["instance"] for i in group],
        }
        for group in expanded
    ]
    errors = _unit_name_errors(instances) + _shared_gpu_errors(instances)
    budget_errors, warnings = memory_budget(instances, host)
    errors += budget_errors
    warnings += rollout_overlap(instances, host)
    return {
        "errors": errors,
        "warnings": warnings,
        "instances": [] if errors else instances,
        "entries": [] if errors else parsed,
    }


UNIT_PREFIX = "celery-worker@"


def slot_instance(unit: str) -> str | None:
    """``celery-worker@high-1.b.service`` -> ``high-1``; None for a unit that is not a worker slot."""
    if not unit.startswith(UNIT_PREFIX) or not unit.endswith(".service"):
        return None
    return unit[len(UNIT_PREFIX) : -len(".service")].partition(".")[0]


def celery_worker_verify(
    rows: list[dict[str, Any]],
    instances: list[dict[str, Any]],
    host: str,
    drained: bool = False,
    paused: list[str] | None = None,
) -> list[str]:
    """Problems between ``celery-fleet-status`` rows of a host and the instances of its plan.

    Each instance has exactly one serving slot, which answers and consumes exactly its queues; a slot
    that drains (deactivating) after a rollout is expected, and finishes on its own. On a host that
    playbooks/drain.yml drained, no slot serves. A queue paused fleet-wide (playbooks/pause.yml) is
    consumed by no unit.
    """
    if drained:
        return [
            f"{host}: {row['unit']} serves although the host is drained. Fix: run playbooks/drain.yml -l "
            f"{host} again to stop it, or playbooks/undrain.yml -l {host} to bring the host back."
            for row in rows
            if slot_instance(row["unit"]) and row.get("active") == "active"
        ]
    held = set(paused or [])
    expected = {i["instance"]: sorted(set(i["queues"]) - held) for i in instances}
    slots: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        name = slot_instance(row["unit"])
        if name is not None:
            slots.setdefault(name, []).append(row)
    errors = []
    for name, queues in sorted(expected.items()):
        found = slots.get(name, [])
        serving = [r for r in found if r.get("active") == "active"]
        unit = f"{UNIT_PREFIX}{name}.*"
        if not serving:
            states = [f"{r['unit']} {r.get('active')} ({r.get('sub')})" for r in found]
            state = ", ".join(states) or "not loaded"
            errors.append(
                f"{host}: no slot of {unit} is active ({state}). Fix: see `journalctl -u '{unit}'`, then "
                "re-run site.yml."
            )
        elif len(serving) > 1:
            errors.append(
                f"{host}: {' and '.join(r['unit'] for r in serving)} both serve; one rollout left its old "
                "slot running. Fix: re-run site.yml, which drains the one that is not enabled."
            )
        elif not serving[0].get("answered"):
            errors.append(
                f"{host}: {serving[0]['unit']} is active but its worker does not answer. Fix: see "
                f"`journalctl -u {serving[0]['unit']}`."
            )
        elif held & set(serving[0].get("queues") or []):
            errors.append(
                f"{host}: {serving[0]['unit']} consumes "
                f"{', '.join(sorted(held & set(serving[0]['queues'])))}, which is paused (it restarted since "
                "the pause). Fix: run playbooks/pause.yml for it again, or playbooks/resume.yml."
            )
        elif serving[0].get("queues") != queues:
            errors.append(
                f"{host}: {serving[0]['unit']} consumes {serving[0].get('queues')} but celery_workers says "
                f"{queues}. Fix: re-run site.yml to roll it out with its configured queues."
            )
    for name in sorted(set(slots) - set(expected)):
        for row in slots[name]:
            if row.get("active") == "active":
                errors.append(
                    f"{host}: {row['unit']} runs but is not in celery_workers. Fix: re-run site.yml, which "
                    "removes it."
                )
    return errors


BATCH = re.compile(r"([1-9][0-9]*)(%?)")


def batch_size(size: Any, total: int) -> int | None:
    """Units per batch of ``celery_worker_rollout_batch``: a count or a share of ``total``; else None."""
    match = BATCH.fullmatch(str(size)) if not isinstance(size, bool) else None
    if not match or (match[2] and int(match[1]) > 100):
        return None
    return max(1, math.ceil(total * int(match[1]) / 100)) if match[2] else int(match[1])


def celery_worker_batches(rollouts: dict[str, dict[str, Any]], size: Any) -> list[dict[str, list[Any]]]:
    """The fleet's rollout in batches, each ``{host: [action, ...]}``; batch 0 is the canary.

    ``rollouts`` maps each host to its units module's ``actions`` and its plan's ``instances``. The
    canary holds one unit for every queue that rolls out (the first, in host and unit order, that
    consumes a queue no earlier pick covers); the rest follow in that order, ``size`` units at a time.
    Each action gains the ``queues`` and ``app`` of its instance.
    """
    todo = []
    for host, rollout in rollouts.items():
        plan = {i["instance"]: i for i in rollout.get("instances") or []}
        for action in rollout.get("actions") or []:
            inst = plan.get(action["instance"], {})
            todo.append((host, {**action, "queues": inst.get("queues", []), "app": inst.get("app")}))
    covered: set[str] = set()
    canary = []
    for queue in sorted({q for _, a in todo for q in a["queues"]}):
        if queue not in covered:
            pick = next(item for item in todo if queue in item[1]["queues"])
            canary.append(pick)
            covered.update(pick[1]["queues"])
    rest = [item for item in todo if item not in canary]
    n = batch_size(size, len(rest)) or 1
    batches = [canary] if canary else []
    batches += [rest[i : i + n] for i in range(0, len(rest), n)]
    out = []
    for batch in batches:
        grouped: dict[str, list[Any]] = {}
        for host, action in batch:
            grouped.setdefault(host, []).append(action)
        out.append(grouped)
    return out


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "celery_worker_plan": celery_worker_plan,
            "celery_worker_verify": celery_worker_verify,
            "celery_worker_batches": celery_worker_batches,
        }
