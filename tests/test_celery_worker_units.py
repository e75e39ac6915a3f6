"""The one-step writer of worker instance files, and the GPU reader, on a real file tree."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import load_plugin

units = load_plugin("roles/celery_worker/library/celery_worker_units.py")
gpus = load_plugin("roles/celery_worker/library/celery_worker_gpus.py")


def params(tmp_path: Path, names: dict[str, str], handoff: str = "overlap", drained: bool = False) -> dict:
    return {
        "instances": {
            n: {"env": f"ARGS={v}\n", "dropin": f"[Service]\nNice={v}\n", "handoff": handoff}
            for n, v in names.items()
        },
        "unit": "celery-worker",
        "target": "celery.target",
        "unit_dir": str(tmp_path / "system"),
        "env_dir": str(tmp_path / "workers"),
        "dropin_name": "20-instance.conf",
        "drained": drained,
    }


def run(p: dict, states: dict[str, str] | None = None) -> dict:
    todo = units.plan(p, states or {})
    units.apply(todo)
    return todo


def enabled(tmp_path: Path) -> list[str]:
    wants = tmp_path / "system/celery.target.wants"
    return sorted(p.name for p in wants.iterdir()) if wants.is_dir() else []


def dropin(tmp_path: Path, slot: str) -> str:
    return (tmp_path / f"system/celery-worker@{slot}.service.d/20-instance.conf").read_text()


def test_first_run_writes_slot_a_of_every_instance_and_enables_it(tmp_path):
    todo = run(params(tmp_path, {"x": "1", "y": "2"}))
    assert todo["changed_instances"] == ["x", "y"]
    assert todo["actions"] == [
        {"instance": "x", "unit": "x.a", "mode": "start", "old": None},
        {"instance": "y", "unit": "y.a", "mode": "start", "old": None},
    ]
    assert (tmp_path / "workers/x.a.env").read_text() == "ARGS=1\n"
    assert oct((tmp_path / "workers/x.a.env").stat().st_mode & 0o777) == "0o600"
    assert dropin(tmp_path, "y.a") == "[Service]\nNice=2\n"
    link = tmp_path / "system/celery.target.wants/celery-worker@x.a.service"
    assert os.readlink(link) == str(tmp_path / "system/celery-worker@.service")


def test_a_serving_fleet_with_its_files_needs_nothing(tmp_path):
    run(params(tmp_path, {"x": "1", "y": "2"}))
    todo = units.plan(params(tmp_path, {"x": "1", "y": "2"}), {"x.a": "active", "y.a": "active"})
    assert (todo["writes"], todo["links"], todo["unlinks"], todo["removals"], todo["actions"]) == (
        [],
        [],
        [],
        [],
        [],
    )


def test_a_unit_that_is_not_running_is_started_without_rewriting(tmp_path):
    run(params(tmp_path, {"x": "1"}))
    todo = units.plan(params(tmp_path, {"x": "1"}), {"x.a": "failed"})
    assert todo["writes"] == []
    assert todo["actions"] == [{"instance": "x", "unit": "x.a", "mode": "start", "old": None}]


def test_a_change_to_a_serving_unit_goes_to_its_other_slot_which_takes_over(tmp_path):
    run(params(tmp_path, {"x": "1", "y": "2"}))
    todo = run(params(tmp_path, {"x": "1", "y": "3"}), {"x.a": "active", "y.a": "active"})
    assert todo["changed_instances"] == ["y"]
    assert todo["actions"] == [{"instance": "y", "unit": "y.b", "mode": "handoff", "old": "y.a"}]
    # The old slot keeps its files (it drains from them); only the new one is enabled.
    assert dropin(tmp_path, "y.a") == "[Service]\nNice=2\n"
    assert dropin(tmp_path, "y.b") == "[Service]\nNice=3\n"
    assert enabled(tmp_path) == ["celery-worker@x.a.service", "celery-worker@y.b.service"]
    # Once the old slot has drained, the next run removes its files and changes nothing else.
    todo = run(params(tmp_path, {"x": "1", "y": "3"}), {"x.a": "active", "y.b": "active", "y.a": "inactive"})
    assert todo["actions"] == [] and todo["writes"] == []
    assert not (tmp_path / "workers/y.a.env").exists()
    assert not (tmp_path / "system/celery-worker@y.a.service.d").exists()


def test_the_next_change_goes_back_to_the_first_slot(tmp_path):
    run(params(tmp_path, {"x": "1"}))
    run(params(tmp_path, {"x": "2"}), {"x.a": "active"})
    todo = run(params(tmp_path, {"x": "3"}), {"x.b": "active"})
    assert todo["actions"] == [{"instance": "x", "unit": "x.a", "mode": "handoff", "old": "x.b"}]
    assert dropin(tmp_path, "x.a") == "[Service]\nNice=3\n"


def test_while_the_other_slot_still_drains_the_live_one_serves_on_unchanged(tmp_path):
    run(params(tmp_path, {"x": "1"}))
    run(params(tmp_path, {"x": "2"}), {"x.a": "active"})
    todo = run(params(tmp_path, {"x": "3"}), {"x.a": "deactivating", "x.b": "active"})
    # No restart (that would leave the queue without a consumer while x.b drains): deferred instead.
    assert todo["actions"] == [] and todo["deferred"] == ["x"] and todo["writes"] == []
    assert dropin(tmp_path, "x.a") == "[Service]\nNice=1\n"
    assert dropin(tmp_path, "x.b") == "[Service]\nNice=2\n"
    # Once x.a has exited, the change hands over to it.
    todo = run(params(tmp_path, {"x": "3"}), {"x.b": "active"})
    assert todo["actions"] == [{"instance": "x", "unit": "x.a", "mode": "handoff", "old": "x.b"}]


def test_a_unit_without_room_to_overlap_restarts_in_place(tmp_path):
    run(params(tmp_path, {"x": "1"}))
    todo = run(params(tmp_path, {"x": "2"}, handoff="in_place"), {"x.a": "active"})
    assert todo["actions"] == [{"instance": "x", "unit": "x.a", "mode": "restart", "old": None}]
    assert enabled(tmp_path) == ["celery-worker@x.a.service"]


def test_a_run_that_died_before_starting_the_new_slot_hands_over_from_the_serving_one(tmp_path):
    run(params(tmp_path, {"x": "1"}))
    run(params(tmp_path, {"x": "2"}), {"x.a": "active"})  # x.b written and enabled, never started
    todo = run(params(tmp_path, {"x": "2"}), {"x.a": "active", "x.b": "failed"})
    assert todo["actions"] == [{"instance": "x", "unit": "x.b", "mode": "handoff", "old": "x.a"}]
    assert todo["retire"] == []


def test_a_serving_slot_that_is_not_live_is_retired(tmp_path):
    run(params(tmp_path, {"x": "1"}))
    run(params(tmp_path, {"x": "2"}), {"x.a": "active"})
    # The rollout stopped before it retired x.a: both serve, x.b is live.
    todo = run(params(tmp_path, {"x": "2"}), {"x.a": "active", "x.b": "active"})
    assert todo["retire"] == ["x.a"] and todo["actions"] == []


def test_removed_renamed_and_legacy_instances_lose_every_file(tmp_path):
    run(params(tmp_path, {"x": "1", "y": "2"}))
    (tmp_path / "system/celery-worker@.service.d").mkdir()  # the shared drop-ins stay
    legacy = tmp_path / "system/celery-worker@x.service.d"  # one unit per instance, before slots
    legacy.mkdir()
    (tmp_path / "workers/x.env").write_text("OLD=1\n")
    states = {"x.a": "active", "y.a": "active", "x": "active"}
    todo = run(params(tmp_path, {"x": "1", "z": "2"}), states)
    assert todo["removed_units"] == ["x", "y.a"]
    assert todo["changed_instances"] == ["z"]
    # Still running, they are disabled at once but keep their drop-ins and environments until they stop.
    assert sorted(Path(p).name for p in todo["leftovers"]) == [
        "celery-worker@x.service.d",
        "celery-worker@y.a.service.d",
        "x.env",
        "y.a.env",
    ]
    assert enabled(tmp_path) == ["celery-worker@x.a.service", "celery-worker@z.a.service"]
    for path in todo["leftovers"]:
        units.shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert not [p for p in left if "@y" in p or p.endswith(("y.a.env", "/x.env", "@x.service.d"))]
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


def test_a_drained_host_gets_its_settings_but_nothing_is_enabled_or_started(tmp_path):
    run(params(tmp_path, {"x": "1", "y": "2"}))
    states = {"x.a": "inactive", "y.a": "deactivating"}
    todo = run(params(tmp_path, {"x": "1", "y": "3"}, drained=True), states)
    assert todo["actions"] == [] and todo["retire"] == []
    assert dropin(tmp_path, "y.a") == "[Service]\nNice=3\n"
    assert enabled(tmp_path) == []
    # Undrained, the same settings need only a start.
    todo = run(params(tmp_path, {"x": "1", "y": "3"}), {})
    assert [a["mode"] for a in todo["actions"]] == ["start", "start"]
    assert enabled(tmp_path) == ["celery-worker@x.a.service", "celery-worker@y.a.service"]
