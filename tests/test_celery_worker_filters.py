"""The worker entry expansion, validation and reconciliation filters."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT, load_plugin

plugin = load_plugin("roles/celery_worker/filter_plugins/celery_workers.py")
DEFAULTS = yaml.safe_load((ROOT / "roles/celery_worker/defaults/main.yml").read_text())[
    "celery_worker_defaults"
]


def test_an_entry_becomes_one_instance_with_its_queues():
    [instance] = plugin.celery_worker_instances([{"name": "train", "queues": ["training"]}], DEFAULTS)
    assert instance["instance"] == "train"
    assert "--queues=training" in instance["args"]
    assert "--pool=prefork" in instance["args"]
    assert "--prefetch-multiplier=1" in instance["args"]


def test_several_queues_are_consumed_by_one_worker():
    [instance] = plugin.celery_worker_instances(
        [{"name": "gpu", "queues": ["training", "extraction"]}], DEFAULTS
    )
    assert "--queues=training,extraction" in instance["args"]


def test_solo_pool_runs_one_task_at_a_time():
    [instance] = plugin.celery_worker_instances(
        [{"name": "s", "queues": ["q"], "pool": "solo", "concurrency": 8}], DEFAULTS
    )
    assert "--concurrency=1" in instance["args"]


def test_max_tasks_per_child_applies_to_prefork_only():
    [prefork, threads] = plugin.celery_worker_instances(
        [{"name": "p", "queues": ["q"]}, {"name": "t", "queues": ["q"], "pool": "threads"}], DEFAULTS
    )
    assert any(a.startswith("--max-tasks-per-child=") for a in prefork["args"])
    assert not any(a.startswith("--max-tasks-per-child=") for a in threads["args"])


def test_valid_entries_have_no_errors():
    assert (
        plugin.celery_worker_errors(
            [{"name": "a", "queues": ["x"]}, {"name": "b", "queues": ["y"]}], DEFAULTS
        )
        == []
    )


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"name": "a", "queues": ["x"], "pool": "forking"}, "celery_workers[a].pool 'forking' is not one of"),
        (
            {"name": "a", "queues": ["x"], "concurrency": -2},
            "celery_workers[a].concurrency -2 must be a positive",
        ),
        ({"name": "a", "queues": []}, "celery_workers[a].queues must be a non-empty list"),
        ({"name": "a"}, "celery_workers[a].queues must be a non-empty list"),
        ({"name": "A b", "queues": ["x"]}, "celery_workers[0].name 'A b' must be lowercase"),
        ({"name": "a", "queues": ["x"], "concurency": 2}, "celery_workers[a] has unknown fields concurency"),
        ({"name": "a", "queues": ["x"], "max_tasks_per_child": -1}, "max_tasks_per_child -1 must be 0"),
    ],
)
def test_invalid_entry_names_the_variable_and_the_fix(entry, fragment):
    [error] = plugin.celery_worker_errors([entry], DEFAULTS)
    assert fragment in error
    assert "Fix" in error


def test_duplicate_names_are_refused():
    errors = plugin.celery_worker_errors(
        [{"name": "a", "queues": ["x"]}, {"name": "a", "queues": ["y"]}], DEFAULTS
    )
    assert errors == [
        "celery_workers[1].name 'a' is used twice; worker names must be unique. "
        "Fix the entry in this host's celery_workers (group_vars or host_vars)."
    ]


@pytest.mark.parametrize("flag", ["-B", "--beat"])
def test_beat_embedded_in_a_worker_is_refused(flag):
    [error] = plugin.celery_worker_errors([{"name": "a", "queues": ["x"], "extra_args": [flag]}], DEFAULTS)
    assert "celery_workers[a].extra_args embeds beat" in error
    assert "celery_beat group" in error


HOST = {"cpus": 8, "gpus": [{"index": i, "uuid": f"GPU-{i}aaa", "minor": i} for i in range(4)]}


def expand(entry: dict, host: dict | None = HOST) -> list[dict]:
    errors = plugin.celery_worker_errors([entry], DEFAULTS, host)
    assert errors == []
    return plugin.celery_worker_instances([entry], DEFAULTS, host)


def test_gpus_expand_into_one_pinned_isolated_unit_per_slice():
    units = expand({"name": "train", "queues": ["training"], "gpus": [0, 1, 2, 3], "gpus_per_worker": 1})
    assert [u["instance"] for u in units] == ["train-1", "train-2", "train-3", "train-4"]
    for index, unit in enumerate(units):
        assert f'CUDA_VISIBLE_DEVICES="{index}"' in unit["environment"]
        assert 'CUDA_DEVICE_ORDER="PCI_BUS_ID"' in unit["environment"]
        assert unit["devices"] == [*plugin.GPU_SHARED_NODES, f"/dev/nvidia{index}"]


def test_gpu_uuids_pin_by_uuid_and_map_to_the_device_minor():
    host = {"cpus": 8, "gpus": [{"index": 0, "uuid": "GPU-abc", "minor": 3}]}
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
    assert "pinned to 2 units (x-1, x-2)" in plugin.celery_worker_errors([entry], DEFAULTS, HOST)[0]
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


def test_memory_limits_and_the_derived_child_cap():
    [unit] = expand({"name": "w", "queues": ["q"], "memory_max": "4G", "concurrency": 4})
    assert unit["memory_max"] == 4 * 1024**3
    assert unit["memory_high"] == 4 * 1024**3 * 9 // 10
    # KiB per child: the throttling point shared between 4 processes.
    assert unit["max_memory_per_child"] == unit["memory_high"] // 4 // 1024
    assert f"--max-memory-per-child={unit['max_memory_per_child']}" in unit["args"]
    assert unit["oom_policy"] == "continue"
    [solo] = expand({"name": "w", "queues": ["q"], "pool": "solo", "memory_max": "1G"})
    assert solo["oom_policy"] == "stop"
    assert not any(a.startswith("--max-memory-per-child") for a in solo["args"])


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


def test_environment_values_are_quoted_for_systemd():
    [unit] = expand({"name": "w", "queues": ["q"], "env": {"MODEL": 'a "b" c'}})
    assert 'MODEL="a \\"b\\" c"' in unit["environment"]


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"memory_max": "4 gigs"}, "memory_max '4 gigs' is not a size"),
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
        ({"extra_args": ["-Q", "other"]}, "extra_args sets -Q; Fix: use the entry's queues field"),
        ({"extra_args": ["--concurrency=4"]}, "extra_args sets --concurrency"),
        ({"env": {"BAD-NAME": "x"}}, "env must map environment variable names"),
        ({"max_memory_per_child": "lots"}, "max_memory_per_child 'lots' must be a size"),
    ],
)
def test_invalid_limits_name_the_field_and_the_fix(entry, fragment):
    errors = plugin.celery_worker_errors([{"name": "w", "queues": ["q"], **entry}], DEFAULTS, HOST)
    assert any(fragment in e for e in errors), errors
    assert all("Fix" in e for e in errors)


def test_a_gpu_given_to_two_units_is_refused_unless_shared():
    two = [{"name": "a", "queues": ["q"], "gpus": [0]}, {"name": "b", "queues": ["q"], "gpus": [0, 1]}]
    [error] = plugin.celery_worker_errors(two, DEFAULTS, HOST)
    assert "/dev/nvidia0 is pinned to 2 units (a, b)" in error
    shared = [{**w, "gpu_sharing": True} for w in two]
    assert plugin.celery_worker_errors(shared, DEFAULTS, HOST) == []


def test_uuids_need_nvidia_smi_and_device_nodes_bound_indices():
    nodes = {"cpus": 2, "gpus": [{"index": 0, "uuid": None, "minor": 0}], "gpu_source": "device nodes"}
    [error] = plugin.celery_worker_errors(
        [{"name": "g", "queues": ["q"], "gpus": ["GPU-abc"]}], DEFAULTS, nodes
    )
    assert "has no nvidia-smi" in error
    none = {"cpus": 2, "gpus": [], "gpu_source": "none"}
    [error] = plugin.celery_worker_errors([{"name": "g", "queues": ["q"], "gpus": [0]}], DEFAULTS, none)
    assert "not on this host (its GPUs, from none: none)" in error


def test_expanded_unit_names_must_not_collide():
    entries = [{"name": "a", "queues": ["q"], "replicas": 2}, {"name": "a-1", "queues": ["q"]}]
    [error] = plugin.celery_worker_errors(entries, DEFAULTS, HOST)
    assert "the unit name 'a-1' comes from two entries" in error


def test_not_running_reads_service_facts():
    services = {
        "celery-worker@a.service": {"state": "running"},
        "celery-worker@b.service": {"state": "stopped"},
        "redis-server.service": {"state": "running"},
    }
    assert plugin.celery_worker_not_running(services, ["a", "b", "c"]) == ["b", "c"]


def _row(unit: str, active: str = "active", answered: bool = True, queues: list[str] | None = None) -> dict:
    return {
        "unit": f"celery-worker@{unit}.service",
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


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([_row("low", queues=["a", "b"])], "h1: celery-worker@high.service is not loaded"),
        (
            [_row("high", active="inactive", queues=None), _row("low", queues=["a", "b"])],
            "h1: celery-worker@high.service is inactive",
        ),
        (
            [_row("high", answered=False), _row("low", queues=["a", "b"])],
            "h1: celery-worker@high.service is active but its worker does not answer",
        ),
        (
            [_row("high", queues=["celery", "high_priority"]), _row("low", queues=["a", "b"])],
            "h1: celery-worker@high.service consumes ['celery', 'high_priority'] but celery_workers says "
            "['high_priority']",
        ),
        (
            [_row("high", queues=["high_priority"]), _row("low", queues=["a"])],
            "h1: celery-worker@low.service consumes ['a'] but celery_workers says ['a', 'b']",
        ),
        (
            [
                _row("high", queues=["high_priority"]),
                _row("low", queues=["a", "b"]),
                _row("old", queues=["x"]),
            ],
            "h1: celery-worker@old.service runs but is not in celery_workers",
        ),
    ],
    ids=["missing", "stopped", "silent", "extra queue", "missing queue", "stray unit"],
)
def test_verify_names_each_problem_with_the_host_and_a_fix(rows, message):
    [problem] = plugin.celery_worker_verify(rows, VERIFY_INSTANCES, "h1")
    assert problem.startswith(message) and "Fix:" in problem, problem


def test_verify_ignores_a_stopped_unit_that_is_no_longer_in_the_inventory():
    rows = [
        _row("high", queues=["high_priority"]),
        _row("low", queues=["a", "b"]),
        _row("old", active="inactive"),
    ]
    assert plugin.celery_worker_verify(rows, VERIFY_INSTANCES, "h1") == []
