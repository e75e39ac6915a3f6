"""Expand, validate and reconcile a host's ``celery_workers`` list."""

from __future__ import annotations

import math
import re
from typing import Any

DOCUMENTATION = r"""
name: celery_worker_instances
short_description: Expand worker entries into systemd instances
description:
  - Takes a host's C(celery_workers) list, fills each entry's defaults (some derived from the pool, the
    CPUs and the memory limit), expands C(replicas) and GPU slices, and returns one dict per systemd
    instance of C(celery-worker@.service) with the Celery arguments, the environment and the systemd
    limits ready to render.
positional: _input, defaults, host
options:
  _input:
    description: The host's C(celery_workers) list.
    type: list
    elements: dict
    required: true
  defaults:
    description: Values for fields an entry leaves out (C(celery_worker_defaults)).
    type: dict
    required: true
  host:
    description: >-
      What the host has - C(cpus) (online CPU count) and C(gpus) (list of C(index), C(uuid), C(minor)
      read from nvidia-smi or from the /dev/nvidiaN nodes).
    type: dict
    required: false
"""

EXAMPLES = r"""
instances: "{{ celery_workers | celery_worker_instances(celery_worker_defaults, {'cpus': 8, 'gpus': []}) }}"
errors: "{{ celery_workers | celery_worker_errors(celery_worker_defaults, {'cpus': 8, 'gpus': []}) }}"
"""

RETURN = r"""
_value:
  description: >-
    One dict per instance - C(instance), C(args), C(environment) (lines of an environment file), and
    C(memory_max), C(memory_high) (bytes), C(cpus), C(cpu_quota), C(devices), C(oom_policy) besides the
    entry's fields.
  type: list
  elements: dict
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
# Arguments the entry's fields own; set them through the field, not extra_args.
OWNED_ARGS = {
    "-Q": "queues",
    "--queues": "queues",
    "-P": "pool",
    "--pool": "pool",
    "-c": "concurrency",
    "--concurrency": "concurrency",
    "--autoscale": "autoscale",
    "-n": "name",
    "--hostname": "name",
    "--max-tasks-per-child": "max_tasks_per_child",
    "--max-memory-per-child": "max_memory_per_child",
    "--time-limit": "time_limit",
    "--soft-time-limit": "soft_time_limit",
    "--prefetch-multiplier": "prefetch_multiplier",
    "-l": "loglevel",
    "--loglevel": "loglevel",
}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
CPU_SET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
UUID = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]+$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
FIX = "Fix the entry in this host's celery_workers (group_vars or host_vars)."


def parse_size(value: Any) -> int | None:
    """Bytes in a systemd-style size (``4G``, ``512M``, ``1.5G``; base 1024), or None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    match = SIZE.match(str(value))
    if not match:
        return None
    number = float(match.group(1)) * SIZE_UNITS[match.group(2).upper()]
    return int(number) if number > 0 else None


def parse_child_memory(value: Any) -> int | None:
    """KiB for --max-memory-per-child: a bare integer is KiB, as Celery reads it; a string is a size."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value > 0 else None
    size = parse_size(value)
    return None if size is None else max(1, size // 1024)


def parse_cpus(value: Any) -> list[int] | None:
    """The CPUs of a CPU set given as ``"0-3,8"`` or ``[0, 1, 2]``; None if malformed."""
    if isinstance(value, list):
        if value and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value):
            return sorted(set(value))
        return None
    text = str(value).replace(" ", "")
    if not CPU_SET.match(text):
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
    """CPU quota in percent of one CPU, from ``200%`` or ``200``."""
    if isinstance(value, bool):
        return None
    text = str(value).strip().removesuffix("%")
    return int(text) if text.isdigit() and int(text) > 0 else None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _int(value) and value > 0


def _gpu_id(value: Any) -> int | str | None:
    """A GPU as an index or a UUID; None if it is neither."""
    if _int(value) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, str) and UUID.match(value):
        return value
    return None


def _find_gpu(gpu: int | str, host_gpus: list[dict[str, Any]]) -> dict[str, Any] | None:
    key = "index" if isinstance(gpu, int) else "uuid"
    return next((g for g in host_gpus if g.get(key) == gpu), None)


def _spec(entry: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **{k: v for k, v in entry.items() if v is not None}}


def _processes(spec: dict[str, Any], cpus: int) -> int:
    """How many tasks the unit runs at once, at most."""
    if spec["pool"] == "solo":
        return 1
    if spec.get("autoscale"):
        return int(spec["autoscale"]["max"])
    if spec.get("concurrency"):
        return int(spec["concurrency"])
    return {"prefork": cpus, "threads": 2 * cpus}.get(spec["pool"], 100)


def _slices(spec: dict[str, Any]) -> list[list[int | str]]:
    gpus = [_gpu_id(g) for g in spec.get("gpus") or []]
    if not gpus:
        return [[]]
    per = spec.get("gpus_per_worker") or len(gpus)
    return [gpus[i : i + per] for i in range(0, len(gpus), per)]  # type: ignore[misc]


def _env_line(name: str, value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{name}="{escaped}"'


def worker_args(spec: dict[str, Any]) -> list[str]:
    """The ``celery worker`` arguments of one instance, minus app and node name."""
    args = [f"--queues={','.join(spec['queues'])}", f"--pool={spec['pool']}"]
    if spec.get("autoscale"):
        args.append(f"--autoscale={spec['autoscale']['max']},{spec['autoscale']['min']}")
    else:
        args.append(f"--concurrency={spec['concurrency']}")
    args += [f"--prefetch-multiplier={spec['prefetch_multiplier']}", f"--loglevel={spec['loglevel']}"]
    if spec["pool"] in PROCESS_POOLS:
        if spec["max_tasks_per_child"]:
            args.append(f"--max-tasks-per-child={spec['max_tasks_per_child']}")
        if spec["max_memory_per_child"]:
            args.append(f"--max-memory-per-child={spec['max_memory_per_child']}")
    if spec.get("time_limit"):
        args.append(f"--time-limit={spec['time_limit']}")
    if spec.get("soft_time_limit"):
        args.append(f"--soft-time-limit={spec['soft_time_limit']}")
    return args + [str(a) for a in spec.get("extra_args") or []]


def celery_worker_instances(
    workers: list[dict[str, Any]], defaults: dict[str, Any], host: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One dict per systemd instance, in inventory order. Validate with celery_worker_errors first."""
    host = host or {}
    host_cpus = int(host.get("cpus") or 1)
    host_gpus = list(host.get("gpus") or [])
    instances = []
    for entry in workers:
        spec = _spec(entry, defaults)
        cpu_list = parse_cpus(spec["cpus"]) if spec.get("cpus") not in (None, "", []) else None
        quota = parse_quota(spec["cpu_quota"]) if spec.get("cpu_quota") else None
        cpus = len(cpu_list) if cpu_list else (math.ceil(quota / 100) if quota else host_cpus)
        processes = _processes(spec, cpus)
        if not spec.get("autoscale"):
            spec["concurrency"] = processes
        memory_max = parse_size(spec["memory_max"]) if spec.get("memory_max") else None
        memory_high = parse_size(spec["memory_high"]) if spec.get("memory_high") else None
        if memory_max and not memory_high:
            # Throttle and reclaim before the hard limit kills anything.
            memory_high = memory_max * 9 // 10
        child_kib = (
            parse_child_memory(spec["max_memory_per_child"]) if spec.get("max_memory_per_child") else None
        )
        if child_kib is None and spec["pool"] in PROCESS_POOLS and (memory_high or memory_max):
            # Replace a child after a task that left it over its share, before the cgroup limit hits.
            child_kib = (memory_high or memory_max or 0) // processes // 1024
        spec["max_memory_per_child"] = child_kib
        if spec.get("max_tasks_per_child") is None:
            spec["max_tasks_per_child"] = 1000 if spec["pool"] in PROCESS_POOLS else 0
        if not spec.get("stop_timeout"):
            spec["stop_timeout"] = spec.get("time_limit") or 600
        spec["queues"] = list(spec["queues"])
        threads = max(1, cpus // (1 if spec["pool"] in ("gevent", "eventlet") else processes))
        slices = _slices(spec)
        replicas = int(spec.get("replicas") or 1)
        total = len(slices) * replicas
        ordinal = 0
        for gpus in slices:
            for _ in range(replicas):
                ordinal += 1
                env: dict[str, Any] = {name: threads for name in THREAD_CAP_VARS}
                devices: list[str] = []
                if gpus:
                    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
                    for gpu in gpus:
                        found = _find_gpu(gpu, host_gpus)
                        minor = found["minor"] if found else gpu
                        devices.append(f"/dev/nvidia{minor}")
                else:
                    # CPU-only: CUDA sees no device even where the nodes exist.
                    env["CUDA_VISIBLE_DEVICES"] = ""
                env.update(spec.get("env") or {})
                instance = spec["name"] if total == 1 else f"{spec['name']}-{ordinal}"
                args = worker_args(spec)
                instances.append(
                    {
                        **spec,
                        "instance": instance,
                        "args": args,
                        "gpus": gpus,
                        "devices": [*GPU_SHARED_NODES, *devices] if devices else [],
                        "environment": [_env_line("CELERY_WORKER_ARGS", " ".join(args))]
                        + [_env_line(k, v) for k, v in sorted(env.items())],
                        "memory_max": memory_max,
                        "memory_high": memory_high,
                        "cpus": cpu_set_string(cpu_list) if cpu_list else None,
                        "cpu_quota": f"{quota}%" if quota else None,
                        "oom_policy": "continue" if spec["pool"] in PROCESS_POOLS else "stop",
                    }
                )
    return instances


def celery_worker_not_running(services: dict[str, Any], names: list[str]) -> list[str]:
    """The instances in ``names`` that ``service_facts`` does not report as running, in order."""
    running = {
        unit[len("celery-worker@") : -len(".service")]
        for unit, state in services.items()
        if unit.startswith("celery-worker@") and state.get("state") == "running"
    }
    return [name for name in names if name not in running]


def celery_worker_verify(rows: list[dict[str, Any]], instances: list[dict[str, Any]], host: str) -> list[str]:
    """Problems between ``celery-fleet-status`` rows of a host and the instances its inventory expands to."""
    expected = {f"celery-worker@{i['instance']}.service": sorted(i["queues"]) for i in instances}
    found = {r["unit"]: r for r in rows if r["unit"].startswith("celery-worker@")}
    errors = []
    for unit, queues in sorted(expected.items()):
        row = found.get(unit)
        if row is None or row.get("active") != "active":
            state = "not loaded" if row is None else f"{row.get('active')} ({row.get('sub')})"
            errors.append(
                f"{host}: {unit} is {state}. Fix: see `journalctl -u {unit}`, then re-run site.yml "
                "or `systemctl start` it."
            )
        elif not row.get("answered"):
            errors.append(
                f"{host}: {unit} is active but its worker does not answer. Fix: see `journalctl -u {unit}`."
            )
        elif row.get("queues") != queues:
            errors.append(
                f"{host}: {unit} consumes {row.get('queues')} but celery_workers says {queues}. "
                "Fix: re-run site.yml to restart it with its configured queues."
            )
    for unit in sorted(set(found) - set(expected)):
        if found[unit].get("active") == "active":
            errors.append(
                f"{host}: {unit} runs but is not in celery_workers. Fix: re-run site.yml, which removes it."
            )
    return errors


def _limit_errors(where: str, spec: dict[str, Any]) -> list[str]:
    """Problems in the memory, CPU and time fields."""
    errors = []
    for field in ("memory_max", "memory_high"):
        if spec.get(field) not in (None, "") and parse_size(spec[field]) is None:
            errors.append(f"{where}.{field} {spec[field]!r} is not a size; write it like 512M or 4G. {FIX}")
    high, top = parse_size(spec.get("memory_high") or 0), parse_size(spec.get("memory_max") or 0)
    if high and top and high > top:
        errors.append(
            f"{where}.memory_high {spec['memory_high']} is above memory_max {spec['memory_max']}; "
            f"the unit would be killed before it is ever throttled. {FIX}"
        )
    child = spec.get("max_memory_per_child")
    if child not in (None, "", 0) and parse_child_memory(child) is None:
        errors.append(
            f"{where}.max_memory_per_child {child!r} must be a size like 1500M, or an integer in KiB. {FIX}"
        )
    if spec.get("cpus") not in (None, "", []) and parse_cpus(spec["cpus"]) is None:
        errors.append(f'{where}.cpus {spec["cpus"]!r} must be a CPU set like "0-3,8" or [0, 1]. {FIX}')
    if spec.get("cpu_quota") not in (None, "") and parse_quota(spec["cpu_quota"]) is None:
        errors.append(f"{where}.cpu_quota {spec['cpu_quota']!r} must be a percentage like 200%. {FIX}")
    nice = spec.get("nice")
    if nice is not None and (not _int(nice) or not -20 <= nice <= 19):
        errors.append(f"{where}.nice {nice!r} must be an integer from -20 to 19. {FIX}")
    for field in ("stop_timeout", "time_limit", "soft_time_limit"):
        if spec.get(field) is not None and not _positive_int(spec[field]):
            errors.append(f"{where}.{field} {spec[field]!r} must be a positive number of seconds. {FIX}")
    hard, soft, stop = spec.get("time_limit"), spec.get("soft_time_limit"), spec.get("stop_timeout")
    if _positive_int(hard) and _positive_int(soft) and soft >= hard:
        errors.append(
            f"{where}.soft_time_limit {soft} must be below time_limit {hard}, or the task never gets "
            f"the chance to clean up. {FIX}"
        )
    if _positive_int(hard) and _positive_int(stop) and stop < hard:
        errors.append(
            f"{where}.stop_timeout {stop} is shorter than time_limit {hard}: a restart would kill tasks "
            f"still within their limit. Fix: raise stop_timeout to at least {hard} or lower time_limit."
        )
    return errors


def _pool_errors(where: str, spec: dict[str, Any]) -> list[str]:
    """Problems in the pool, its size and its recycling."""
    errors = []
    pool = spec.get("pool")
    if pool not in POOLS:
        errors.append(f"{where}.pool {pool!r} is not one of {', '.join(POOLS)}. {FIX}")
    concurrency, autoscale = spec.get("concurrency"), spec.get("autoscale")
    if concurrency is not None and not _positive_int(concurrency):
        errors.append(f"{where}.concurrency {concurrency!r} must be a positive integer. {FIX}")
    if autoscale is not None:
        if (
            not isinstance(autoscale, dict)
            or set(autoscale) != {"min", "max"}
            or not _int(autoscale["min"])
            or not _positive_int(autoscale["max"])
            or not 0 <= autoscale["min"] <= autoscale["max"]
        ):
            errors.append(
                f"{where}.autoscale {autoscale!r} must be {{min: N, max: M}} with 0 <= N <= M, M > 0. {FIX}"
            )
        elif pool != "prefork":
            errors.append(f"{where}.autoscale needs pool prefork, not {pool}; set concurrency instead. {FIX}")
        if concurrency is not None:
            errors.append(f"{where} sets both concurrency and autoscale; keep one. {FIX}")
    if not _positive_int(spec.get("prefetch_multiplier")):
        errors.append(
            f"{where}.prefetch_multiplier {spec.get('prefetch_multiplier')!r} must be a positive integer. "
            + FIX
        )
    mtpc = spec.get("max_tasks_per_child")
    if mtpc is not None and (not _int(mtpc) or mtpc < 0):
        errors.append(f"{where}.max_tasks_per_child {mtpc!r} must be 0 (never) or more. {FIX}")
    if not _positive_int(spec.get("replicas", 1)):
        errors.append(f"{where}.replicas {spec.get('replicas')!r} must be a positive integer. {FIX}")
    return errors


def _args_env_errors(where: str, spec: dict[str, Any]) -> list[str]:
    errors = []
    extra = spec.get("extra_args") or []
    if not isinstance(extra, list):
        return [f"{where}.extra_args must be a list of arguments. {FIX}"]
    flags = [str(a).split("=", 1)[0] for a in extra]
    if any(f in ("-B", "--beat") for f in flags):
        errors.append(
            f"{where}.extra_args embeds beat in a worker (-B); a second beat dispatches every periodic "
            "task twice. Fix: remove it and list the host in the celery_beat group."
        )
    for flag in dict.fromkeys(f for f in flags if f in OWNED_ARGS):
        errors.append(
            f"{where}.extra_args sets {flag}; Fix: use the entry's {OWNED_ARGS[flag]} field instead."
        )
    env = spec.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and ENV_NAME.match(k) for k in env):
        errors.append(f"{where}.env must map environment variable names to values. {FIX}")
    elif any(isinstance(v, dict | list) for v in env.values()):
        errors.append(f"{where}.env values must be strings or numbers. {FIX}")
    return errors


def _gpu_errors(where: str, spec: dict[str, Any], host: dict[str, Any] | None) -> list[str]:
    errors: list[str] = []
    gpus = spec.get("gpus") or []
    per = spec.get("gpus_per_worker")
    if not isinstance(gpus, list):
        return [f"{where}.gpus must be a list of GPU indices or UUIDs. {FIX}"]
    bad = [g for g in gpus if _gpu_id(g) is None]
    if bad:
        errors.append(f"{where}.gpus {bad!r} are not GPU indices (0, 1, ...) or UUIDs (GPU-...). {FIX}")
    ids = [_gpu_id(g) for g in gpus]
    if len(set(ids)) != len(ids):
        errors.append(f"{where}.gpus lists a GPU twice. {FIX}")
    if per is not None:
        if not gpus:
            errors.append(f"{where}.gpus_per_worker is set but gpus is empty. {FIX}")
        elif not _positive_int(per) or len(gpus) % per:
            errors.append(
                f"{where}.gpus_per_worker {per!r} must divide the {len(gpus)} GPUs in gpus evenly. {FIX}"
            )
    if host is None or not gpus or bad:
        return errors
    host_gpus = list(host.get("gpus") or [])
    source = host.get("gpu_source") or "nvidia-smi"
    for gpu in ids:
        if isinstance(gpu, str) and source != "nvidia-smi":
            errors.append(
                f"{where}.gpus {gpu} is a UUID but the host has no nvidia-smi to map it to a device. "
                "Fix: give the GPU index, or install the NVIDIA driver first."
            )
        elif gpu is not None and _find_gpu(gpu, host_gpus) is None:
            have = ", ".join(str(g.get("index")) for g in host_gpus) or "none"
            errors.append(
                f"{where}.gpus {gpu} is not on this host (its GPUs, from {source}: {have}). "
                "Fix: use a GPU the host has, or move the entry to a host with that GPU."
            )
    return errors


def _shared_gpu_errors(workers: list[Any], defaults: dict[str, Any], host: dict[str, Any]) -> list[str]:
    """A GPU pinned to two units, unless every entry that uses it allows sharing."""
    users: dict[Any, list[tuple[str, bool]]] = {}
    try:
        instances = celery_worker_instances(workers, defaults, host)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return []
    for inst in instances:
        for node in inst["devices"][len(GPU_SHARED_NODES) :]:
            users.setdefault(node, []).append((inst["instance"], bool(inst.get("gpu_sharing"))))
    errors = []
    for node, owners in sorted(users.items()):
        if len(owners) > 1 and not all(sharing for _, sharing in owners):
            names = ", ".join(name for name, _ in owners)
            errors.append(
                f"celery_workers: {node} is pinned to {len(owners)} units ({names}); they would fight over "
                "its memory. Fix: give each unit its own GPU, or set gpu_sharing: true on every entry "
                "that uses it."
            )
    return errors


def celery_worker_errors(
    workers: Any, defaults: dict[str, Any], host: dict[str, Any] | None = None
) -> list[str]:
    """Every problem in a ``celery_workers`` list, each naming the variable and the fix.

    With ``host`` (see celery_worker_instances), GPUs and CPUs are checked against what the host has.
    """
    if not isinstance(workers, list):
        return [f"celery_workers must be a list of worker entries. {FIX}"]
    errors = []
    seen: set[str] = set()
    for index, entry in enumerate(workers):
        where = f"celery_workers[{index}]"
        if not isinstance(entry, dict):
            errors.append(f"{where} must be a mapping with name and queues. {FIX}")
            continue
        spec = _spec(entry, defaults)
        name = spec.get("name")
        if not isinstance(name, str) or not name or not set(name) <= NAME_CHARS or name[0] in "-_":
            errors.append(f"{where}.name {name!r} must be lowercase letters, digits, '-' or '_'. {FIX}")
        elif name in seen:
            errors.append(f"{where}.name {name!r} is used twice; worker names must be unique. {FIX}")
        else:
            seen.add(name)
            where = f"celery_workers[{name}]"
        queues = spec.get("queues")
        if not isinstance(queues, list) or not queues or not all(isinstance(q, str) and q for q in queues):
            errors.append(f"{where}.queues must be a non-empty list of queue names. {FIX}")
        unknown = sorted(set(entry) - set(defaults) - {"name", "queues"})
        if unknown:
            errors.append(f"{where} has unknown fields {', '.join(unknown)}. {FIX}")
        errors += _pool_errors(where, spec) + _limit_errors(where, spec) + _args_env_errors(where, spec)
        errors += _gpu_errors(where, spec, host)
        cpus = parse_cpus(spec["cpus"]) if spec.get("cpus") not in (None, "", []) else None
        if cpus and host and host.get("cpus") and max(cpus) >= int(host["cpus"]):
            errors.append(
                f"{where}.cpus {spec['cpus']!r} names CPU {max(cpus)} but the host has {host['cpus']} "
                f"(0-{int(host['cpus']) - 1}). {FIX}"
            )
    if errors:
        return errors
    instances = celery_worker_instances(workers, defaults, host)
    names = [i["instance"] for i in instances]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(
            f"celery_workers: the unit name {dup!r} comes from two entries (replicas and GPU slices are "
            f"numbered name-1, name-2, ...). Fix: rename one entry."
        )
    return errors + _shared_gpu_errors(workers, defaults, host or {})


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "celery_worker_instances": celery_worker_instances,
            "celery_worker_errors": celery_worker_errors,
            "celery_worker_not_running": celery_worker_not_running,
            "celery_worker_verify": celery_worker_verify,
        }
