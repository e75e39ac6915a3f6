"""Which layer of the preflight refuses which input, and that no earlier layer does.

Like linux-system-roles/systemd's tests/tests_invalid_input.yml, each bad input is pinned to the layer
meant to catch it:

1. ``spec``: the role's meta/argument_specs.yml, as roles/celery_fleet/tasks/validate.yml runs it
   (ansible.builtin.validate_argument_spec: the spec's variables, types converted, unknown suboptions
   refused). It only validates: the roles go on reading the variables as the inventory wrote them.
2. ``plan``: the Python filters behind the roles' own asserts: the worker plan (celery_worker_plan) on the
   inventory's raw values, and the shared size, app and environment filters of celery_fleet.fleet.
3. ``cli``: celery_cli_errors on what Celery's own parser (celery_fleet.cli_report, run here with this
   environment's Celery as preflight runs it with the wheelhouse's) says the arguments and env set.

A case with layer None passes all three; its ``expect`` checks what the plan made of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from conftest import ROOT, load_plugin

from celery_fleet import cli_report

workers_plugin = load_plugin("roles/celery_worker/filter_plugins/celery_workers.py")
checks = load_plugin("playbooks/filter_plugins/fleet_checks.py")
fleet = load_plugin("collections/ansible_collections/celery_fleet/fleet/plugins/filter/fleet.py")
DEFAULTS = yaml.safe_load((ROOT / "roles/celery_worker/vars/main.yml").read_text())["_celery_worker_fields"]
LAYERS = ("spec", "plan", "cli")
ROLES = ("celery_worker", "celery_app", "celery_fleet", "celery_beat", "redis")
SPECS = {
    role: yaml.safe_load((ROOT / f"roles/{role}/meta/argument_specs.yml").read_text())["argument_specs"][
        "main"
    ]["options"]
    for role in ROLES
}
# The worker host the plan sees: 8 CPUs, 2 GPUs, 4 GiB of RAM, the demo app.
HOST = {
    "cpus": 8,
    "gpus": [{"index": i, "uuid": f"GPU-{i}", "minor": i} for i in range(2)],
    "gpu_source": "nvidia-smi",
    "memtotal_mb": 4096,
    "app": "demo_app",
}


@dataclass
class Case:
    id: str
    role: str
    variables: dict[str, Any]
    layer: str | None
    fragment: str = ""
    # What Celery's parser must say the arguments set (cli cases).
    parsed: list[str] | None = None
    # A check of the plan's first instance (accepted cases).
    expect: Callable[[dict[str, Any]], bool] | None = None
    host: dict[str, Any] = field(default_factory=dict)


def entry(case_id: str, layer: str | None, fragment: str = "", **fields: Any) -> Case:
    """A case of one worker entry, ``w`` consuming ``q``, with ``fields``."""
    extra = {k: fields.pop(k) for k in ("parsed", "expect", "host") if k in fields}
    variables = {"celery_workers": [{"name": "w", "queues": ["q"], **fields}]}
    return Case(case_id, "celery_worker", variables, layer, fragment, **extra)


# Layers --------------------------------------------------------------------------------------------------


def spec_errors(case: Case) -> list[str]:
    """validate_argument_spec: the variables the spec names, checked (and converted) by the spec."""
    spec = SPECS[case.role]
    provided = {name: value for name, value in case.variables.items() if name in spec}
    result = ArgumentSpecValidator(spec).validate(provided, validate_role_argument_spec=True)
    return list(result.error_messages)


def worker_plan(case: Case) -> dict[str, Any]:
    v = case.variables
    host = {**HOST, "memory_overcommit": v.get("celery_worker_memory_overcommit", 1.0), **case.host}
    return workers_plugin.celery_worker_plan(
        v.get("celery_workers", []), DEFAULTS, host, v.get("celery_worker_defaults")
    )


def plan_errors(case: Case) -> list[str]:
    """The roles' asserts: the worker plan, and the shared filters the other roles' asserts call."""
    v = case.variables
    if case.role == "celery_worker":
        return worker_plan(case)["errors"]
    if case.role == "redis":
        maxmemory = v.get("redis_maxmemory", "")
        return fleet.size_errors(maxmemory, "redis_maxmemory", "Fix.") if maxmemory else []
    if case.role == "celery_app":
        return fleet.env_errors(v.get("celery_app_env", {}), "celery_app_env", "Fix.")
    if case.role == "celery_fleet":
        return fleet.app_errors(v.get("celery_fleet_app", "demo_app"), "celery_fleet_app", "Fix.")
    if case.role == "celery_beat":
        return fleet.app_errors(v.get("celery_beat_app", "demo_app"), "celery_beat_app", "")
    return []


def sources(case: Case) -> list[dict[str, Any]]:
    """What preflight hands Celery's parsers for this role's variables (playbooks/preflight.yml)."""
    v = case.variables
    if case.role == "celery_worker":
        entries = {i["name"]: i for i in worker_plan(case)["instances"]}
        return [
            {
                "command": "worker",
                "args": e["extra_args"],
                "env": e["env"],
                "where": f"h1: celery_workers[{name}].extra_args",
                "env_where": f"h1: celery_workers[{name}].env",
            }
            for name, e in entries.items()
        ]
    if case.role == "celery_app":
        env = v.get("celery_app_env", {})
        where = "h1: celery_app_env"
        return [{"command": "worker", "args": [], "env": env, "where": where, "env_where": where}]
    if case.role == "celery_beat":
        args = v.get("celery_beat_extra_args", [])
        return [{"command": "beat", "args": args, "env": {}, "where": "h1: celery_beat_extra_args"}]
    return []


def parse(found: list[dict[str, Any]]) -> dict[str, Any]:
    return cli_report.report([{"command": s["command"], "args": s["args"]} for s in found])


def cli_errors(case: Case) -> list[str]:
    found = sources(case)
    return checks.celery_cli_errors(parse(found), found)["errors"]


LAYER_ERRORS = {"spec": spec_errors, "plan": plan_errors, "cli": cli_errors}


# Cases ---------------------------------------------------------------------------------------------------

CASES = [
    # 1. The argument spec: types, choices, required suboptions, unknown fields.
    entry("concurrency two", "spec", "'concurrency' is of type str", concurrency="two"),
    entry("nice 2.5", "spec", "'nice' is of type float", nice=2.5),
    entry("pool fork", "spec", "value of pool must be one of", pool="fork"),
    entry("autoscale without max", "spec", "missing required arguments: max", autoscale={"min": 1}),
    entry("misspelt field", "spec", "celery_workers.concurency. Supported parameters include", concurency=2),
    entry("queues a mapping", "spec", "'queues' is of type dict", queues={"q": 1}),
    Case(
        "overcommit lots",
        "celery_worker",
        {"celery_workers": [], "celery_worker_memory_overcommit": "lots"},
        "spec",
        "unable to convert to float",
    ),
    Case("restart never", "celery_worker", {"celery_worker_restart": "never"}, "spec", "must be one of"),
    Case("redis port", "redis", {"redis_port": "six"}, "spec", "'redis_port' is of type str"),
    Case(
        "beat args a mapping", "celery_beat", {"celery_beat_extra_args": {"a": 1}}, "spec", "is of type dict"
    ),
    # Accepted by the spec, and read by the plan as the spec converts them.
    entry("concurrency '2'", None, concurrency="2", expect=lambda i: "--concurrency=2" in i["args"]),
    entry(
        "gpu_sharing 'false' alone",
        None,
        gpus=[0],
        gpu_sharing="false",
        expect=lambda i: not i["gpu_sharing"],
    ),
    entry(
        "gpu_sharing 'true'",
        None,
        gpus=[0],
        replicas=2,
        gpu_sharing="true",
        expect=lambda i: i["gpu_sharing"],
    ),
    entry("a size", None, memory_max="1.5G", expect=lambda i: i["memory_max"] == 3 * 1024**3 // 2),
    entry(
        "allowed extra_args", None, extra_args=["--without-gossip", "-O", "fair"], parsed=["without_gossip"]
    ),
    # 2. The plan (and the roles' asserts): what a type cannot say.
    entry(
        "gpu_sharing 'false' is false",
        "plan",
        "/dev/nvidia0 is pinned to 2 units (w-1, w-2)",
        gpus=[0],
        replicas=2,
        gpu_sharing="false",
    ),
    entry("memory_max '0.5'", "plan", "memory_max '0.5' is not a size", memory_max="0.5"),
    # The spec turns 4096 into "4096"; the plan reads the inventory's 4096, a bare number either way.
    entry("memory_max 4096", "plan", "memory_max 4096 is not a size", memory_max=4096),
    entry("memory_max 4 gigs", "plan", "memory_max '4 gigs' is not a size", memory_max="4 gigs"),
    entry(
        "child above memory_max",
        "plan",
        "max_memory_per_child 6G is not below memory_max 5G",
        memory_max="5G",
        max_memory_per_child="6G",
    ),
    entry("child cap on threads", "plan", "no child processes", pool="threads", max_memory_per_child="1G"),
    entry(
        "memory_high above max",
        "plan",
        "memory_high 2G is above memory_max 1G",
        memory_max="1G",
        memory_high="2G",
    ),
    entry(
        "embedded beat by env",
        "plan",
        "env.CELERY_WORKER_BEAT is the fleet's to set",
        env={"CELERY_WORKER_BEAT": "1"},
    ),
    entry(
        "gpu pinning by env",
        "plan",
        "env.CUDA_VISIBLE_DEVICES is the fleet's",
        env={"CUDA_VISIBLE_DEVICES": "1"},
    ),
    entry("flower option by env", "plan", "env.FLOWER_PORT is the fleet's to set", env={"FLOWER_PORT": "1"}),
    entry("queue with a comma", "plan", "hold a comma", queues=["a,b"]),
    # The spec splits a string into a list; the plan reads the string the inventory wrote.
    entry("queues a string", "plan", "queues must be a non-empty list", queues="a,b"),
    entry("extra_args a string", "plan", "extra_args must be a list of arguments", extra_args="-B"),
    entry("newline in an argument", "plan", "holds a control character", extra_args=["--statedb=/a\nb"]),
    entry(
        "soft not below hard",
        "plan",
        "soft_time_limit 600 must be below",
        time_limit=600,
        soft_time_limit=600,
    ),
    entry("stop before hard", "plan", "stop_timeout 60 is shorter than", time_limit=3600, stop_timeout=60),
    entry("gpu the host lacks", "plan", "gpus 7 is not on this host", gpus=[7]),
    entry("bad name", "plan", "name 'Bad_Name' must be lowercase", name="Bad_Name"),
    entry("bad app", "plan", "app 'pkg..x' is not a module path", app="pkg..x"),
    entry(
        "over the RAM",
        "plan",
        "adds up to 6144 MiB (w 2x3072 MiB), more than the host's 4096 MiB of RAM",
        memory_max="3G",
        replicas=2,
    ),
    Case(
        "over the RAM, overcommit allowed",
        "celery_worker",
        {
            "celery_workers": [{"name": "w", "queues": ["q"], "memory_max": "3G", "replicas": 2}],
            "celery_worker_memory_overcommit": 1.5,
        },
        None,
    ),
    Case(
        "over the RAM, overcommit too small",
        "celery_worker",
        {
            "celery_workers": [{"name": "w", "queues": ["q"], "memory_max": "3G", "replicas": 2}],
            "celery_worker_memory_overcommit": "1.25",
        },
        "plan",
        "set celery_worker_memory_overcommit",
    ),
    Case(
        "redis maxmemory bare",
        "redis",
        {"redis_maxmemory": "512"},
        "plan",
        "redis_maxmemory '512' is not a size",
    ),
    Case(
        "redis maxmemory an int",
        "redis",
        {"redis_maxmemory": 512},
        "plan",
        "redis_maxmemory 512 is not a size",
    ),
    Case("redis maxmemory", "redis", {"redis_maxmemory": "512mb"}, None),
    Case(
        "app env CELERY_",
        "celery_app",
        {"celery_app_env": {"CELERY_BROKER_URL": "redis://x"}},
        "plan",
        "celery_app_env.CELERY_BROKER_URL is the fleet's to set",
    ),
    Case("fleet app", "celery_fleet", {"celery_fleet_app": "demo app"}, "plan", "is not a module path"),
    Case("beat app", "celery_beat", {"celery_beat_app": "demo_app:"}, "plan", "is not a module path"),
    # 3. Celery's own parser: what the arguments and the environment really set.
    entry("-B", "cli", "turns on a beat inside the worker (beat)", extra_args=["-B"], parsed=["beat"]),
    entry(
        "--beat", "cli", "turns on a beat inside the worker (beat)", extra_args=["--beat"], parsed=["beat"]
    ),
    entry(
        "-Q",
        "cli",
        "sets queues, which the entry's queues field owns",
        extra_args=["-Q", "x"],
        parsed=["queues"],
    ),
    entry("-c", "cli", "sets concurrency", extra_args=["-c", "4"], parsed=["concurrency"]),
    entry("--purge", "cli", "sets purge, which the unit owns", extra_args=["--purge"], parsed=["purge"]),
    entry("--nope", "cli", "refused by `celery worker`'s own parser", extra_args=["--nope"]),
    entry(
        "settings", "cli", "which Celery reads as app settings", extra_args=["broker_pool_limit=1"], parsed=[]
    ),
    entry(
        "env BROKER_URL", "cli", "sets BROKER_URL, which Celery's command line reads", env={"BROKER_URL": "x"}
    ),
    Case(
        "app env BROKER_URL",
        "celery_app",
        {"celery_app_env": {"BROKER_URL": "redis://x"}},
        "cli",
        "h1: celery_app_env sets BROKER_URL",
    ),
    Case(
        "beat loglevel",
        "celery_beat",
        {"celery_beat_extra_args": ["--loglevel=DEBUG"]},
        "cli",
        "sets loglevel, which the fleet owns",
        parsed=["loglevel"],
    ),
    Case("beat max interval", "celery_beat", {"celery_beat_extra_args": ["--max-interval=5"]}, None),
]
# Inputs the plan once read unlike the spec, crashed on, or let by.
KNOWN_BUGS = [
    entry(
        "gpus_per_worker '1'",
        None,
        gpus=[0, 1],
        gpus_per_worker="1",
        expect=lambda i: i["gpus"] == [0],
    ),
    entry(
        "autoscale strings",
        None,
        autoscale={"min": "1", "max": "4"},
        expect=lambda i: "--autoscale=4,1" in i["args"],
    ),
    entry("env name with a newline", "plan", "env must map environment variable names", env={"FOO\n": "1"}),
    entry("app with a newline", "plan", "is not a module path", app="demo_app\n"),
    entry("size with a newline", "plan", "is not a size", memory_max="1G\n"),
    entry("superscript quota", "plan", "must be a percentage", cpu_quota="\u00b2%"),
    entry("superscript gpu", "plan", "are not GPU indices", gpus=["\u00b2"]),
    entry("kelvin sign", "plan", "is not a size", memory_max="4\u212a"),
]


def _id(case: Case) -> str:
    return f"{case.layer or 'accepted'}: {case.id}"


def check_layers(case: Case) -> None:
    for layer in LAYERS:
        errors = LAYER_ERRORS[layer](case)
        if layer == case.layer:
            assert errors, f"{case.id}: the {layer} layer accepts it"
            assert any(case.fragment in e for e in errors), (case.fragment, errors)
            return
        assert errors == [], f"{case.id}: refused by the {layer} layer already: {errors}"
    assert case.layer is None
    if case.expect is not None:
        instances = worker_plan(case)["instances"]
        assert instances and case.expect(instances[0]), instances[:1]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_each_input_is_refused_by_its_layer_and_no_earlier_one(case):
    check_layers(case)


@pytest.mark.parametrize("case", KNOWN_BUGS, ids=_id)
def test_inputs_the_plan_once_got_wrong(case):
    check_layers(case)


@pytest.mark.parametrize("case", [c for c in CASES if c.parsed is not None], ids=_id)
def test_the_cli_layer_judges_what_celerys_parser_says(case):
    [parsed] = parse(sources(case))["parsed"]
    assert parsed["error"] is None
    assert parsed["set"][: len(case.parsed)] == case.parsed


def test_every_layer_is_exercised():
    assert {c.layer for c in CASES} == {*LAYERS, None}
    assert {c.role for c in CASES} == set(ROLES)


def test_a_misspelt_role_variable_is_caught_by_no_layer():
    # validate_argument_spec checks only the variables its spec names: celery_worker_memory_overcomit is
    # ignored, and the default 1.0 applies. Pinned so that a layer catching it is noticed.
    case = Case(
        "misspelt variable",
        "celery_worker",
        {
            "celery_workers": [{"name": "w", "queues": ["q"], "memory_max": "3G", "replicas": 2}],
            "celery_worker_memory_overcomit": 1.5,
        },
        "plan",
        "more than the host's 4096 MiB of RAM",
    )
    check_layers(case)
