"""The controller's wheelhouse builder: input digest, pins and target-side markers."""

from __future__ import annotations

import zipfile
from pathlib import Path

from conftest import load_plugin

wheelhouse = load_plugin("roles/celery_app/library/celery_wheelhouse.py")


def make_project(root: Path, body: str = "X = 1\n") -> Path:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "pkg"\nversion = "1.0"\n')
    (root / "src" / "pkg" / "__init__.py").write_text(body)
    return root


def make_wheel(house: Path, name: str, version: str, requires: list[str]) -> None:
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)
    )
    with zipfile.ZipFile(house / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_the_digest_follows_the_app_source(tmp_path):
    project = make_project(tmp_path / "app")
    before = wheelhouse.digest_inputs([project], [], "3.11.2", ["manylinux2014_x86_64"])
    assert before == wheelhouse.digest_inputs([project], [], "3.11.2", ["manylinux2014_x86_64"])
    (project / "src" / "pkg" / "__init__.py").write_text("X = 2\n")
    assert wheelhouse.digest_inputs([project], [], "3.11.2", ["manylinux2014_x86_64"]) != before


def test_the_digest_follows_the_target_python_and_requirements(tmp_path):
    project = make_project(tmp_path / "app")
    base = wheelhouse.digest_inputs([project], [], "3.11.2", ["p"])
    assert wheelhouse.digest_inputs([project], [], "3.11.7", ["p"]) != base
    assert wheelhouse.digest_inputs([project], ["flower==2.2.0"], "3.11.2", ["p"]) != base


def test_build_litter_does_not_change_the_digest(tmp_path):
    project = make_project(tmp_path / "app")
    before = wheelhouse.digest_inputs([project], [], "3.11.2", ["p"])
    (project / "src" / "pkg" / "__pycache__").mkdir()
    (project / "src" / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (project / "src" / "pkg.egg-info").mkdir()
    assert wheelhouse.digest_inputs([project], [], "3.11.2", ["p"]) == before


def test_every_wheel_is_pinned():
    names = [
        "celery-5.7.0-py3-none-any.whl",
        "tornado-6.5-cp39-abi3-manylinux2014_x86_64.whl",
        "Foo_Bar-1.0-py3-none-any.whl",
    ]
    assert wheelhouse.pins(names) == ["celery==5.7.0", "foo-bar==1.0", "tornado==6.5"]


def test_markers_are_evaluated_for_the_target_python_not_the_controllers(tmp_path):
    make_wheel(tmp_path, "redis", "8.1.0", ['async-timeout>=4.0.3; python_full_version < "3.11.3"'])
    old_target = wheelhouse.target_environment("3.11.2", "x86_64")
    new_target = wheelhouse.target_environment("3.11.7", "x86_64")
    assert wheelhouse.missing_requirements(tmp_path, ["redis"], old_target) == ["async-timeout>=4.0.3"]
    assert wheelhouse.missing_requirements(tmp_path, ["redis"], new_target) == []


def test_extras_pull_in_their_dependencies(tmp_path):
    make_wheel(tmp_path, "celery", "5.7.0", ["kombu>=5", 'redis>=4; extra == "redis"'])
    make_wheel(tmp_path, "kombu", "5.7.0", [])
    env = wheelhouse.target_environment("3.11.2", "x86_64")
    assert wheelhouse.missing_requirements(tmp_path, ["celery"], env) == []
    assert wheelhouse.missing_requirements(tmp_path, ["celery[redis]"], env) == ["redis>=4"]
