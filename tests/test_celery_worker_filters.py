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


def test_removed_instances_and_their_files_are_found():
    found = [
        "/etc/celery-fleet/workers/keep.env",
        "/etc/celery-fleet/workers/old.env",
        "/etc/systemd/system/celery-worker@keep.service.d",
        "/etc/systemd/system/celery-worker@old.service.d",
        "/etc/systemd/system/celery-worker@gone.service.d",
    ]
    stale = plugin.celery_worker_stale(found, ["keep"])
    assert stale["instances"] == ["gone", "old"]
    assert stale["paths"] == [
        "/etc/celery-fleet/workers/old.env",
        "/etc/systemd/system/celery-worker@gone.service.d",
        "/etc/systemd/system/celery-worker@old.service.d",
    ]


def test_the_shared_template_drop_in_directory_is_never_stale():
    assert plugin.celery_worker_stale(["/etc/systemd/system/celery-worker@.service.d"], []) == {
        "instances": [],
        "paths": [],
    }


@pytest.mark.parametrize("flag", ["-B", "--beat"])
def test_beat_embedded_in_a_worker_is_refused(flag):
    [error] = plugin.celery_worker_errors([{"name": "a", "queues": ["x"], "extra_args": [flag]}], DEFAULTS)
    assert "celery_workers[a].extra_args embeds beat" in error
    assert "celery_beat group" in error
