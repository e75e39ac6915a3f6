"""Every public role variable is in meta/argument_specs.yml with a description, and only those."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT

ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "defaults" / "main.yml").exists())


def test_every_role_is_checked():
    assert ROLES == [
        "celery_app",
        "celery_beat",
        "celery_fleet",
        "celery_metrics",
        "celery_prometheus",
        "celery_worker",
        "flower",
        "redis",
    ]


@pytest.mark.parametrize("role", ROLES)
def test_specs_and_defaults_do_not_drift(role):
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert sorted(defaults) == sorted(options)
    for name, option in options.items():
        # celery_workers is the fleet-wide worker list DESIGN.md names; the rest are <role>_*.
        assert name.startswith(f"{role}_") or name == "celery_workers", f"{name} lacks the {role}_ prefix"
        assert option.get("description"), f"{name} has no description"


@pytest.mark.parametrize("role", ROLES)
def test_literal_defaults_match_the_specs(role):
    defaults = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text()) or {}
    options = yaml.safe_load((ROOT / "roles" / role / "meta" / "argument_specs.yml").read_text())[
        "argument_specs"
    ]["main"]["options"]
    for name, option in options.items():
        if "default" in option:
            assert option["default"] == defaults[name], name
