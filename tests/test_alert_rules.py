"""The alert rules that roles/celery_prometheus ships, rendered with the role's defaults and judged by
promtool (Debian's prometheus package): valid rules, and each alert firing, and clearing, on series
shaped as the fleet's exporters write them (tests/prometheus/rules_test.yml)."""

from __future__ import annotations

import shutil
import subprocess

import jinja2
import pytest
import yaml
from ansible.plugins.filter.core import comment
from conftest import ROOT

ROLE = ROOT / "roles" / "celery_prometheus"


def render(**overrides: object) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["comment"] = comment
    values = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text()) | overrides
    template = env.from_string((ROLE / "templates" / "celery-fleet.rules.yml.j2").read_text())
    return template.render(ansible_managed="Ansible managed", **values)


@pytest.fixture
def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed; run scripts/host-prereqs.sh")
    return path


def run(promtool: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_rules_are_valid_prometheus_rules(promtool, tmp_path):
    (tmp_path / "rules.yml").write_text(render())
    checked = run(promtool, "check", "rules", "rules.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 14 rules found" in checked.stdout


def test_every_alert_fires_and_clears_as_its_tests_say(promtool, tmp_path):
    (tmp_path / "rules.yml").write_text(render())
    shutil.copy(ROOT / "tests" / "prometheus" / "rules_test.yml", tmp_path)
    tested = run(promtool, "test", "rules", "rules_test.yml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert the rules define has a test case.
    alerts = {r["alert"] for g in yaml.safe_load(render())["groups"] for r in g["rules"] if "alert" in r}
    cases = yaml.safe_load((ROOT / "tests" / "prometheus" / "rules_test.yml").read_text())["tests"]
    tested_alerts = {
        a["alertname"] for t in cases for a in t.get("alert_rule_test", []) if a.get("exp_alerts")
    }
    assert alerts == tested_alerts


def test_the_thresholds_are_the_inventorys():
    # A lower backlog bar makes the same series fire: the threshold reaches the rule.
    rules = yaml.safe_load(render(celery_prometheus_backlog_messages=5000))
    [backlog] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "CeleryQueueBacklog"]
    assert backlog["expr"].endswith("> 5000")
