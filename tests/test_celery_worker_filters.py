"""The worker plan (one parse of every entry into errors, warnings and instances) and the verify filters."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT, load_plugin

plugin = load_plugin("roles/celery_worker/filter_plugins/celery_workers.py")
DEFAULTS = yaml.safe_load((ROOT / "roles/celery_worker/vars/main.yml").read_text())["_celery_worker_fields"]
GIB = 1024**3
MIB = 1024**2
HOST = {
    "cpus": 8,
    "app": "demo_app",
    "gpus": [{"index": i, "uuid": f"GPU-{i}aaa", "minor": i} for i in range(4)],
}


def plan(entries: object, host: dict | None = None) -> dict:
    """The plan of ``entries`` on ``host`` (a host with 8 CPUs, 4 GPUs and the demo app by default)."""
    return plugin.celery_worker_plan(entries, DEFAULTS, HOST if host is None else host)


def errors(entries: object, host: dict | None = None) -> list[str]:
    return plan(entries, host)["errors"]


def expand(entry: dict, host: dict | None = None) -> list[dict]:
    result = plan([entry], host)
    assert result["errors"] == [], result["errors"]
    assert result["instances"], result
    return result["instances"]


def test_the_plugin_exposes_its_filters():
    assert set(plugin.FilterModule().filters()) == {
        "celery_worker_plan",
        "celery_worker_verify",
        "celery_worker_batches",
    }


def test_an_entry_becomes_one_instance_with_its_queues():
    [instance] = expand({"name": "train", "queues": ["training"]})
    assert instance["instance"] == "train"
    assert "--queues=training" in instance["args"]
    assert "--pool=prefork" in instance["args"]
    assert "--prefetch-multiplier=1" in instance["args"]


def test_args_are_the_worker_arguments_after_hostname_and_the_app_rides_along():
    [instance] = expand({"name": "train", "queues": ["training"]})
    # The command line (celery --app ... worker --hostname=...) is rendered into the drop-in from these.
    assert instance["app"] == "demo_app"
    assert not any(a.startswith(("--app", "-A", "--hostname", "-n", "worker")) for a in instance["args"])
    assert all(isinstance(a, str) for a in instance["args"])
    assert not any(line.startswith("CELERY_WORKER_ARGS") for line in instance["environment"])
    [own] = expand({"name": "gpu", "queues": ["training"], "app": "pkg.apps.gpu"})
    assert own["app"] == "pkg.apps.gpu"


@pytest.mark.parametrize("app", ["", "pkg..apps", "pkg apps", "1pkg", "pkg:", "pkg:1x"])
def test_an_app_celery_cannot_take_is_refused(app):
    [error] = errors([{"name": "a", "queues": ["x"], "app": app}], {**HOST, "app": ""})
    assert f"celery_workers[a].app {app!r} is not a module path" in error


def test_several_queues_are_consumed_by_one_worker():
    [instance] = expand({"name": "gpu", "queues": ["training", "extraction"]})
    assert "--queues=training,extraction" in instance["args"]


def test_solo_pool_runs_one_task_at_a_time():
    [instance] = expand({"name": "s", "queues": ["q"], "pool": "solo", "concurrency": 8})
    assert "--concurrency=1" in instance["args"]


def test_max_tasks_per_child_applies_to_prefork_only():
    result = plan([{"name": "p", "queues": ["q"]}, {"name": "t", "queues": ["q"], "pool": "threads"}])
    prefork, threads = result["instances"]
    assert "--max-tasks-per-child=1000" in prefork["args"]
    assert not any(a.startswith("--max-tasks-per-child=") for a in threads["args"])
    [never] = expand({"name": "p", "queues": ["q"], "max_tasks_per_child": 0})
    assert not any(a.startswith("--max-tasks-per-child=") for a in never["args"])


def test_valid_entries_have_no_errors_nor_warnings():
    result = plan([{"name": "a", "queues": ["x"]}, {"name": "b", "queues": ["y"]}])
    assert result["errors"] == [] and result["warnings"] == []
    assert [i["instance"] for i in result["instances"]] == ["a", "b"]


def test_integers_are_read_as_the_argument_spec_converts_them():
    [unit] = expand({"name": "w", "queues": ["q"], "concurrency": "3", "replicas": "1", "nice": "-5"})
    assert "--concurrency=3" in unit["args"]
    assert unit["nice"] == -5


@pytest.mark.parametrize(("value", "shared"), [("false", False), ("no", False), ("true", True), (True, True)])
def test_gpu_sharing_is_read_as_a_bool(value, shared):
    entry = {"name": "x", "queues": ["q"], "gpus": [0], "replicas": 2, "gpu_sharing": value}
    result = plan([entry])
    # "false" is a non-empty string: it must not count as true.
    assert bool(result["errors"]) is not shared, result
    if shared:
        assert all(i["gpu_sharing"] is True for i in result["instances"])


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"name": "a", "queues": ["x"], "pool": "forking"}, "celery_workers[a].pool 'forking' is not one of"),
        (
            {"name": "a", "queues": ["x"], "concurrency": -2},
            "celery_workers[a].concurrency -2 must be a positive",
        ),
        ({"name": "a", "queues": ["x"], "concurrency": "two"}, "celery_workers[a].concurrency 'two' must be"),
        ({"name": "a", "queues": []}, "celery_workers[a].queues must be a non-empty list"),
        ({"name": "a"}, "celery_workers[a].queues must be a non-empty list"),
        ({"name": "A b", "queues": ["x"]}, "celery_workers[0].name 'A b' must be lowercase"),
        ({"name": "-a", "queues": ["x"]}, "celery_workers[0].name '-a' must be lowercase"),
        ({"name": "a", "queues": ["x"], "concurency": 2}, "celery_workers[a] has unknown fields concurency"),
        ({"name": "a", "queues": ["x"], "max_tasks_per_child": -1}, "max_tasks_per_child -1 must be 0"),
        (
            {"name": "a", "queues": ["x"], "loglevel": "loud"},
            "celery_workers[a].loglevel 'loud' is not one of",
        ),
        ({"name": "a", "queues": ["x,y"]}, "celery_workers[a].queues ['x,y'] hold a comma"),
        ({"name": "a", "queues": ["x y"]}, "celery_workers[a].queues ['x y'] hold a comma, whitespace"),
        ({"name": "a", "queues": ["x", "x"]}, "celery_workers[a].queues ['x', 'x'] lists a queue twice"),
    ],
)
def test_invalid_entry_names_the_variable_and_the_fix(entry, fragment):
    [error] = errors([entry])
    assert fragment in error
    assert "Fix" in error


def test_a_plan_needs_a_list_of_mappings():
    [error] = errors({"name": "a"})
    assert error.startswith("celery_workers must be a list of worker entries")
    [error] = errors(["a"])
    assert error.startswith("celery_workers[0] must be a mapping")


def test_duplicate_names_are_refused():
    assert errors([{"name": "a", "queues": ["x"]}, {"name": "a", "queues": ["y"]}]) == [
        "celery_workers[1].name 'a' is used twice; worker names must be unique. "
        "Fix the entry in this host's celery_workers (group_vars or host_vars)."
    ]


def test_a_plan_with_errors_has_no_instances():
    result = plan([{"name": "a", "queues": ["x"]}, {"name": "b", "queues": ["y"], "pool": "fork"}])
    assert result["errors"] and result["instances"] == []


@pytest.mark.parametrize("args", [["-B"], ["--beat"], ["-Q", "other"], ["--concurrency=4"], ["-O", "fair"]])
def test_extra_args_reach_the_command_line_verbatim_after_the_fields(args):
    # Which of them the fleet owns is judged by Celery's own parser (celery_cli_errors), not by spelling here.
    [unit] = expand({"name": "w", "queues": ["q"], "extra_args": args})
    assert unit["args"][-len(args) :] == args
    assert unit["extra_args"] == args


def test_extra_args_are_strings_one_argument_each():
    [unit] = expand({"name": "w", "queues": ["q"], "extra_args": ["--statedb=/var/lib/a b", 5]})
    assert unit["args"][-2:] == ["--statedb=/var/lib/a b", "5"]


def test_gpus_expand_into_one_pinned_isolated_unit_per_slice():
    units = expand({"name": "train", "queues": ["training"], "gpus": [0, 1, 2, 3], "gpus_per_worker": 1})
    assert [u["instance"] for u in units] == ["train-1", "train-2", "train-3", "train-4"]
    for index, unit in enumerate(units):
        assert f'CUDA_VISIBLE_DEVICES="{index}"' in unit["environment"]
        assert 'CUDA_DEVICE_ORDER="PCI_BUS_ID"' in unit["environment"]
        assert unit["devices"] == [*plugin.GPU_SHARED_NODES, f"/dev/nvidia{index}"]


def test_gpu_uuids_pin_by_uuid_and_map_to_the_device_minor():
    host = {"cpus": 8, "app": "demo_app", "gpus": [{"index": 0, "uuid": "GPU-abc", "minor": 3}]}
    [unit] = expand({"name": "g", "queues": ["q"], "gpus": ["GPU-abc"]}, host)
    assert 'CUDA_VISIBLE_DEVICES="GPU-abc"' in unit["environment"]
    assert unit["devices"][-1] == "/dev/nvidia3"


def test_cpu_only_units_see_no_gpu():
    [unit] = expand({"name": "cpu", "queues": ["q"]})
    assert unit["devices"] == []
    assert 'CUDA_VISIBLE_DEVICES=""' in unit["environment"]


def test_replicas_times_slices_units():
    entry = {"name": "x", "queues": ["q"], "gpus": [0, 1], "gpus_per_worker": 1, "replicas": 2}
    # Two replicas on one GPU share its memory: only when asked for.
    assert "pinned to 2 units (x-1, x-2)" in errors([entry])[0]
    units = expand({**entry, "gpu_sharing": True})
    assert [u["instance"] for u in units] == ["x-1", "x-2", "x-3", "x-4"]
    assert [u["gpus"] for u in units] == [[0], [0], [1], [1]]


def test_concurrency_defaults_follow_the_pool_and_cpus():
    by_pool = {
        pool: expand({"name": "w", "queues": ["q"], "pool": pool})[0]["concurrency"]
        for pool in ("prefork", "threads", "solo", "gevent")
    }
    assert by_pool == {"prefork": 8, "threads": 16, "solo": 1, "gevent": 100}
    [pinned] = expand({"name": "w", "queues": ["q"], "cpus": "0-3"})
    assert pinned["concurrency"] == 4
    assert pinned["cpus"] == "0-3"


def test_thread_caps_split_the_units_cpus_between_its_processes():
    [unit] = expand({"name": "w", "queues": ["q"], "cpus": [0, 1, 2, 3, 4, 5], "concurrency": 2})
    assert 'OMP_NUM_THREADS="3"' in unit["environment"]
    assert 'OPENBLAS_NUM_THREADS="3"' in unit["environment"]
    [solo] = expand({"name": "w", "queues": ["q"], "pool": "solo", "cpu_quota": "400%"})
    assert 'MKL_NUM_THREADS="4"' in solo["environment"]
    [mine] = expand({"name": "w", "queues": ["q"], "env": {"OMP_NUM_THREADS": 7}})
    assert 'OMP_NUM_THREADS="7"' in mine["environment"]


def test_memory_limits_are_bytes_and_the_derived_child_cap_is_kib():
    [unit] = expand({"name": "w", "queues": ["q"], "memory_max": "4G", "concurrency": 4})
    assert unit["memory_max"] == 4 * GIB
    assert unit["memory_high"] == 4 * GIB * 9 // 10
    # KiB per child, as --max-memory-per-child takes it: the throttling point shared between 4 processes.
    assert unit["child_kib"] == unit["memory_high"] // 4 // 1024
    assert f"--max-memory-per-child={unit['child_kib']}" in unit["args"]
    assert unit["oom_policy"] == "continue"
    [solo] = expand({"name": "w", "queues": ["q"], "pool": "solo", "memory_max": "1G"})
    assert solo["oom_policy"] == "stop"
    assert not any(a.startswith("--max-memory-per-child") for a in solo["args"])


def test_sizes_of_the_grammar_are_parsed_once_into_bytes():
    [unit] = expand(
        {
            "name": "w",
            "queues": ["q"],
            "memory_max": "1.5GiB",
            "memory_high": "1024mb",
            "max_memory_per_child": "512K",
        }
    )
    assert (unit["memory_max"], unit["memory_high"], unit["max_memory_per_child"]) == (
        3 * GIB // 2,
        GIB,
        512 * 1024,
    )
    assert "--max-memory-per-child=512" in unit["args"]


def test_autoscale_time_limits_and_stop_timeout():
    [unit] = expand(
        {
            "name": "w",
            "queues": ["q"],
            "autoscale": {"min": 2, "max": 8},
            "time_limit": 900,
            "soft_time_limit": 800,
        }
    )
    assert "--autoscale=8,2" in unit["args"]
    assert not any(a.startswith("--concurrency") for a in unit["args"])
    assert {"--time-limit=900", "--soft-time-limit=800"} <= set(unit["args"])
    assert unit["stop_timeout"] == 900
    [plain] = expand({"name": "w", "queues": ["q"]})
    assert plain["stop_timeout"] == 600


def test_environment_values_are_quoted_for_systemd():
    [unit] = expand({"name": "w", "queues": ["q"], "env": {"MODEL": 'a "b" c', "PATHY": "C:\\x", "ON": True}})
    assert 'MODEL="a \\"b\\" c"' in unit["environment"]
    assert 'PATHY="C:\\\\x"' in unit["environment"]
    assert 'ON="true"' in unit["environment"]


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"memory_max": "4 gigs"}, "memory_max '4 gigs' is not a size"),
        ({"memory_max": "4096"}, "memory_max '4096' is not a size"),
        ({"memory_max": 4096}, "memory_max 4096 is not a size"),
        ({"memory_max": "1G", "memory_high": "2G"}, "memory_high 2G is above memory_max 1G"),
        ({"cpus": "3-1"}, "cpus '3-1' must be a CPU set"),
        ({"cpus": "0-15"}, "names CPU 15 but the host has 8"),
        ({"cpu_quota": "lots"}, "cpu_quota 'lots' must be a percentage"),
        ({"nice": 40}, "nice 40 must be an integer from -20 to 19"),
        ({"time_limit": 100, "soft_time_limit": 100}, "soft_time_limit 100 must be below time_limit 100"),
        ({"time_limit": 3600, "stop_timeout": 60}, "stop_timeout 60 is shorter than time_limit 3600"),
        ({"autoscale": {"min": 5, "max": 2}}, "autoscale {'min': 5, 'max': 2} must be"),
        ({"autoscale": {"min": 1, "max": 2}, "pool": "threads"}, "autoscale needs pool prefork"),
        ({"autoscale": {"min": 1, "max": 2}, "concurrency": 3}, "sets both concurrency and autoscale"),
        ({"replicas": 0}, "replicas 0 must be a positive integer"),
        ({"gpus": [7]}, "gpus 7 is not on this host"),
        ({"gpus": ["GPU-nope"]}, "gpus GPU-nope is not on this host"),
        ({"gpus": [0, 1, 2], "gpus_per_worker": 2}, "gpus_per_worker 2 must divide the 3 GPUs"),
        ({"gpus_per_worker": 1}, "gpus_per_worker is set but gpus is empty"),
        ({"gpus": ["cuda0"]}, "are not GPU indices"),
        ({"gpus": [0, "0"]}, "gpus lists a GPU twice"),
        ({"gpu_sharing": "maybe"}, "gpu_sharing 'maybe' must be true or false"),
        ({"extra_args": ["--statedb=/a\nb"]}, "extra_args ['--statedb=/a\\nb'] holds a control character"),
        ({"extra_args": "-B"}, "extra_args must be a list of arguments"),
        ({"env": {"BAD-NAME": "x"}}, "env must map environment variable names"),
        ({"env": {"CELERY_WORKER_BEAT": "1"}}, "env.CELERY_WORKER_BEAT is the fleet's to set"),
        ({"env": {"CUDA_VISIBLE_DEVICES": "1"}}, "env.CUDA_VISIBLE_DEVICES is the fleet's to set"),
        ({"env": {"FLOWER_PORT": "1"}}, "env.FLOWER_PORT is the fleet's to set"),
        ({"env": {"MODEL": "a\nb"}}, "env.MODEL 'a\\nb' holds a control character"),
        ({"env": {"MODEL": ["a"]}}, "env.MODEL ['a'] must be a string or a number"),
        ({"max_memory_per_child": "lots"}, "max_memory_per_child 'lots' is not a size"),
        (
            {"max_memory_per_child": "2G", "memory_max": "2G"},
            "max_memory_per_child 2G is not below memory_max 2G",
        ),
        ({"max_memory_per_child": "1G", "pool": "threads"}, "pool threads has no child processes"),
    ],
)
def test_invalid_limits_name_the_field_and_the_fix(entry, fragment):
    found = errors([{"name": "w", "queues": ["q"], **entry}])
    assert any(fragment in e for e in found), found
    assert all("Fix" in e for e in found)


def test_size_errors_show_the_grammar():
    [error] = errors([{"name": "w", "queues": ["q"], "memory_max": "0.5"}])
    assert "512M, 1.5G, 4GiB" in error
    assert "a bare number is refused" in error


def test_a_gpu_given_to_two_units_is_refused_unless_shared():
    two = [{"name": "a", "queues": ["q"], "gpus": [0]}, {"name": "b", "queues": ["q"], "gpus": [0, 1]}]
    [error] = errors(two)
    assert "/dev/nvidia0 is pinned to 2 units (a, b)" in error
    shared = [{**w, "gpu_sharing": True} for w in two]
    assert errors(shared) == []


def test_uuids_need_nvidia_smi_and_device_nodes_bound_indices():
    nodes = {
        "cpus": 2,
        "app": "demo_app",
        "gpus": [{"index": 0, "uuid": None, "minor": 0}],
        "gpu_source": "device nodes",
    }
    [error] = errors([{"name": "g", "queues": ["q"], "gpus": ["GPU-abc"]}], nodes)
    assert "has no nvidia-smi" in error
    none = {"cpus": 2, "app": "demo_app", "gpus": [], "gpu_source": "none"}
    [error] = errors([{"name": "g", "queues": ["q"], "gpus": [0]}], none)
    assert "not on this host (its GPUs, from none: none)" in error


def test_expanded_unit_names_must_not_collide():
    entries = [{"name": "a", "queues": ["q"], "replicas": 2}, {"name": "a-1", "queues": ["q"]}]
    [error] = errors(entries)
    assert "the unit name 'a-1' comes from two entries" in error


# Memory budget: the host's memory_max limits, plus its broker's maxmemory, against its RAM.


def budget_host(memtotal_mb: int = 4096, **host: object) -> dict:
    return {**HOST, "memtotal_mb": memtotal_mb, **host}


def test_limits_that_fit_the_host_pass():
    entries = [
        {"name": "a", "queues": ["q"], "memory_max": "1G"},
        {"name": "b", "queues": ["q"], "memory_max": "512M"},
    ]
    result = plan(entries, budget_host())
    assert result["errors"] == [] and result["warnings"] == []
    # Exactly the RAM still fits: the limits can all hold.
    assert errors([{"name": "a", "queues": ["q"], "memory_max": "4G"}], budget_host()) == []


def test_limits_beyond_the_hosts_memory_are_an_error():
    result = plan([{"name": "train", "queues": ["q"], "memory_max": "2G", "replicas": 3}], budget_host())
    [error] = result["errors"]
    assert result["instances"] == []
    assert "memory_max of its celery_workers adds up to 6144 MiB (train 3x2048 MiB)" in error
    assert "more than the host's 4096 MiB of RAM" in error
    assert "Fix:" in error
    assert "celery_worker_memory_overcommit" in error


def test_gpu_slices_count_once_each_in_the_budget():
    entry = {"name": "g", "queues": ["q"], "memory_max": "1G", "gpus": [0, 1, 2, 3], "gpus_per_worker": 1}
    [error] = errors([entry], budget_host(3072))
    assert "adds up to 4096 MiB (g 4x1024 MiB)" in error


def test_the_brokers_maxmemory_counts_on_the_broker_host():
    entry = {"name": "a", "queues": ["q"], "memory_max": "3G"}
    assert errors([entry], budget_host(broker=False, broker_maxmemory="")) == []
    [error] = errors([entry], budget_host(broker=True, broker_maxmemory="2G"))
    assert "adds up to 5120 MiB (a 1x3072 MiB, the broker's redis_maxmemory 2048 MiB)" in error
    assert errors([entry], budget_host(broker=True, broker_maxmemory="1024mb")) == []


def test_a_broker_host_without_maxmemory_is_a_warning():
    result = plan([{"name": "a", "queues": ["q"], "memory_max": "1G"}], budget_host(broker=True))
    assert result["errors"] == []
    [warning] = result["warnings"]
    assert "no redis_maxmemory" in warning and "Fix: set redis_maxmemory" in warning


@pytest.mark.parametrize(("ratio", "fits"), [(1.5, True), ("1.5", True), (2.0, True), (1.4, False)])
def test_an_overcommit_ratio_lets_limits_add_up_past_the_ram(ratio, fits):
    entries = [{"name": "a", "queues": ["q"], "memory_max": "3G", "replicas": 2}]
    found = errors(entries, budget_host(memory_overcommit=ratio))
    if fits:
        assert found == []
    else:
        [error] = found
        assert "more than 1.4 times its 4096 MiB of RAM" in error
        assert "celery_worker_memory_overcommit" in error


def test_unbounded_workers_beside_bounded_ones_are_a_warning():
    entries = [{"name": "a", "queues": ["q"], "memory_max": "1G"}, {"name": "free", "queues": ["q"]}]
    result = plan(entries, budget_host())
    assert result["errors"] == []
    [warning] = result["warnings"]
    assert "celery_workers free set no memory_max" in warning
    assert "Fix:" in warning


def test_without_the_hosts_memory_the_budget_is_not_checked():
    assert errors([{"name": "a", "queues": ["q"], "memory_max": "64G"}]) == []


# Reconciliation: service_facts and celery-fleet-status against the plan.


def _row(unit: str, active: str = "active", answered: bool = True, queues: list[str] | None = None) -> dict:
    """A status row of ``unit``'s slot a, or of the slot it names (``high.b``)."""
    return {
        "unit": f"celery-worker@{unit if '.' in unit else unit + '.a'}.service",
        "active": active,
        "sub": "running",
        "answered": answered,
        "queues": queues,
    }


VERIFY_INSTANCES = [
    {"instance": "high", "queues": ["high_priority"]},
    {"instance": "low", "queues": ["b", "a"]},
]


def test_verify_accepts_workers_that_consume_exactly_their_queues():
    rows = [_row("high", queues=["high_priority"]), _row("low", queues=["a", "b"])]
    assert plugin.celery_worker_verify(rows, VERIFY_INSTANCES, "h1") == []


def test_verify_reads_the_instances_of_a_plan():
    instances = plan([{"name": "w", "queues": ["b", "a"], "replicas": 2}])["instances"]
    rows = [_row("w-1", queues=["a", "b"]), _row("w-2", queues=["a", "b"])]
    assert plugin.celery_worker_verify(rows, instances, "h1") == []


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([_row("low", queues=["a", "b"])], "h1: no slot of celery-worker@high.* is active (not loaded)"),
        (
            [_row("high", active="inactive", queues=None), _row("low", queues=["a", "b"])],
            "h1: no slot of celery-worker@high.* is active (celery-worker@high.a.service inactive",
        ),
        (
            [_row("high.a", active="deactivating"), _row("low", queues=["a", "b"])],
            "h1: no slot of celery-worker@high.* is active (celery-worker@high.a.service deactivating",
        ),
        (
            [_row("high", answered=False), _row("low", queues=["a", "b"])],
            "h1: celery-worker@high.a.service is active but its worker does not answer",
        ),
        (
            [_row("high", queues=["celery", "high_priority"]), _row("low", queues=["a", "b"])],
            "h1: celery-worker@high.a.service consumes ['celery', 'high_priority'] but celery_workers says "
            "['high_priority']",
        ),
        (
            [_row("high", queues=["high_priority"]), _row("low", queues=["a"])],
            "h1: celery-worker@low.a.service consumes ['a'] but celery_workers says ['a', 'b']",
        ),
        (
            [
                _row("high", queues=["high_priority"]),
                _row("high.b", queues=["high_priority"]),
                _row("low", queues=["a", "b"]),
            ],
            "h1: celery-worker@high.a.service and celery-worker@high.b.service both serve",
        ),
        (
            [
                _row("high", queues=["high_priority"]),
                _row("low", queues=["a", "b"]),
                _row("old", queues=["x"]),
            ],
            "h1: celery-worker@old.a.service runs but is not in celery_workers",
        ),
    ],
    ids=["missing", "stopped", "draining", "silent", "extra queue", "missing queue", "two serve", "stray"],
)
def test_verify_names_each_problem_with_the_host_and_a_fix(rows, message):
    [problem] = plugin.celery_worker_verify(rows, VERIFY_INSTANCES, "h1")
    assert problem.startswith(message) and "Fix:" in problem, problem


def test_verify_accepts_an_old_slot_that_drains_beside_the_serving_one():
    rows = [
        _row("high.a", active="deactivating", queues=["high_priority"]),
        _row("high.b", queues=["high_priority"]),
        _row("low.b", queues=["a", "b"]),
    ]
    assert plugin.celery_worker_verify(rows, VERIFY_INSTANCES, "h1") == []


def test_verify_ignores_a_stopped_unit_that_is_no_longer_in_the_inventory():
    rows = [
        _row("high", queues=["high_priority"]),
        _row("low", queues=["a", "b"]),
        _row("old", active="inactive"),
    ]
    assert plugin.celery_worker_verify(rows, VERIFY_INSTANCES, "h1") == []


def test_the_plan_lists_each_entry_once_with_its_units_and_derived_fields():
    result = plan(
        [
            {"name": "g", "queues": ["training"], "gpus": [0, 1], "gpus_per_worker": 1, "time_limit": 900},
            {"name": "x", "queues": ["y"], "replicas": 2},
        ],
        HOST,
    )
    assert [(e["name"], e["units"]) for e in result["entries"]] == [
        ("g", ["g-1", "g-2"]),
        ("x", ["x-1", "x-2"]),
    ]
    [g, _] = result["entries"]
    # Derived once, for every check that judges the entry: stop_timeout from time_limit.
    assert g["stop_timeout"] == 900
    assert "devices" not in g and "environment" not in g


def test_verify_expects_nothing_to_serve_on_a_drained_host():
    rows = [_row("high.a", active="inactive"), _row("low.b", active="deactivating")]
    assert plugin.celery_worker_verify(rows, VERIFY_INSTANCES, "h1", drained=True) == []
    [problem] = plugin.celery_worker_verify([_row("high.b")], VERIFY_INSTANCES, "h1", drained=True)
    assert problem.startswith("h1: celery-worker@high.b.service serves although the host is drained")


def test_verify_expects_a_paused_queue_to_be_consumed_by_no_unit():
    rows = [_row("high", queues=["high_priority"]), _row("low", queues=["b"])]
    assert plugin.celery_worker_verify(rows, VERIFY_INSTANCES, "h1", paused=["a"]) == []
    rows = [_row("high", queues=["high_priority"]), _row("low", queues=["a", "b"])]
    [problem] = plugin.celery_worker_verify(rows, VERIFY_INSTANCES, "h1", paused=["a"])
    assert problem.startswith("h1: celery-worker@low.a.service consumes a, which is paused"), problem


# celery_worker_defaults: fleet-wide overrides of some fields


def test_a_partial_override_changes_only_the_fields_it_names():
    result = plugin.celery_worker_plan(
        [{"name": "w", "queues": ["q"]}], DEFAULTS, HOST, {"loglevel": "WARNING", "replicas": 2}
    )
    assert result["errors"] == []
    assert [i["instance"] for i in result["instances"]] == ["w-1", "w-2"]
    assert {i["loglevel"] for i in result["instances"]} == {"WARNING"}
    # Fields the override leaves out keep their own defaults.
    assert {i["pool"] for i in result["instances"]} == {DEFAULTS["pool"]}


def test_an_entry_field_wins_over_the_fleet_wide_override():
    result = plugin.celery_worker_plan(
        [{"name": "w", "queues": ["q"], "loglevel": "DEBUG"}], DEFAULTS, HOST, {"loglevel": "WARNING"}
    )
    assert [i["loglevel"] for i in result["instances"]] == ["DEBUG"]


@pytest.mark.parametrize(
    "overrides", [{"memmory_max": "1G"}, {"name": "shared"}, {"queues": ["q"]}, ["pool", "solo"], "solo"]
)
def test_an_override_outside_the_fields_is_refused(overrides):
    [error] = plugin.celery_worker_plan([{"name": "w", "queues": ["q"]}], DEFAULTS, HOST, overrides)["errors"]
    assert error.startswith("celery_worker_defaults ")
    assert "Fix: correct celery_worker_defaults" in error
    if isinstance(overrides, dict):
        assert f"unknown fields {next(iter(overrides))}" in error
        assert "memory_max" in error  # the accepted fields are listed
