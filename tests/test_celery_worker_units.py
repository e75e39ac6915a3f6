"""The one-step writer of worker instance files, and the GPU reader, on a real file tree."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import load_plugin

units = load_plugin("roles/celery_worker/library/celery_worker_units.py")
gpus = load_plugin("roles/celery_worker/library/celery_worker_gpus.py")


def params(tmp_path: Path, names: dict[str, str]) -> dict:
    return {
        "instances": {
            n: {"env": f"ARGS={v}\n", "dropin": f"[Service]\nNice={v}\n"} for n, v in names.items()
        },
        "unit": "celery-worker",
        "target": "celery.target",
        "unit_dir": str(tmp_path / "system"),
        "env_dir": str(tmp_path / "workers"),
        "dropin_name": "20-instance.conf",
    }


def run(p: dict) -> dict:
    todo = units.plan(p)
    units.apply(todo)
    return todo


def test_first_run_writes_files_and_enables_every_instance(tmp_path):
    todo = run(params(tmp_path, {"a": "1", "b": "2"}))
    assert todo["changed_instances"] == ["a", "b"]
    assert (tmp_path / "workers/a.env").read_text() == "ARGS=1\n"
    assert oct((tmp_path / "workers/a.env").stat().st_mode & 0o777) == "0o600"
    assert (
        tmp_path / "system/celery-worker@b.service.d/20-instance.conf"
    ).read_text() == "[Service]\nNice=2\n"
    link = tmp_path / "system/celery.target.wants/celery-worker@a.service"
    assert os.readlink(link) == str(tmp_path / "system/celery-worker@.service")


def test_second_run_changes_nothing(tmp_path):
    run(params(tmp_path, {"a": "1", "b": "2"}))
    todo = units.plan(params(tmp_path, {"a": "1", "b": "2"}))
    assert (todo["writes"], todo["links"], todo["removals"]) == ([], [], [])


def test_a_change_touches_only_its_instance(tmp_path):
    run(params(tmp_path, {"a": "1", "b": "2"}))
    todo = run(params(tmp_path, {"a": "1", "b": "3"}))
    assert todo["changed_instances"] == ["b"]


def test_removed_and_renamed_instances_lose_every_file(tmp_path):
    run(params(tmp_path, {"a": "1", "b": "2"}))
    (tmp_path / "system/celery-worker@.service.d").mkdir()  # the shared drop-ins stay
    todo = run(params(tmp_path, {"a": "1", "c": "2"}))
    assert todo["removed_instances"] == ["b"]
    assert todo["changed_instances"] == ["c"]
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert not [p for p in left if "@b" in p or p.endswith("b.env")]
    assert "system/celery-worker@.service.d" in left


def test_nvidia_smi_rows_and_device_nodes(tmp_path):
    rows = "0, GPU-1f2e, 0\n1, GPU-9a8b, 2\n"
    assert gpus.parse_nvidia_smi(rows) == [
        {"index": 0, "uuid": "GPU-1f2e", "minor": 0},
        {"index": 1, "uuid": "GPU-9a8b", "minor": 2},
    ]
    # A regular file named like a GPU node is not one.
    (tmp_path / "nvidia0").write_text("")
    assert gpus.device_nodes(str(tmp_path)) == []
