"""The alert rules that roles/celery_prometheus ships, rendered with the role's defaults and judged by
promtool (Debian's prometheus package): valid rules, and each alert firing, and clearing, on series
shaped as the fleet's exporters write them (tests/prometheus/rules_test.yml)."""

from __future__ import annotations

import itertools
import random
import shutil
import subprocess

import jinja2
import pytest
import yaml
from ansible.plugins.filter.core import comment
from ansible_collections.celery_fleet.fleet.plugins.module_utils import values
from conftest import ROOT, load_plugin

ROLE = ROOT / "roles" / "celery_prometheus"
fleet_filters = load_plugin("collections/ansible_collections/celery_fleet/fleet/plugins/filter/fleet.py")


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


# Durations: preflight's rule (celery_fleet.fleet.duration_errors) against promtool's parser ----------

UNITS = values.DURATION_UNITS
_pick = random.Random(1417)
# Every ordered, non-empty choice of units, largest first, with a number each: what Prometheus takes.
TAKEN = [
    "".join(f"{_pick.choice(['1', '7', '30', '007', '99'])}{unit}" for unit in chosen)
    for size in range(1, len(UNITS) + 1)
    for chosen in itertools.combinations(UNITS, size)
]
REFUSED = (
    [f"1{small}1{large}" for large, small in itertools.combinations(UNITS, 2)]  # smallest first
    + [f"1{unit}1{unit}" for unit in UNITS]  # a unit twice
    + [f"{number}{unit}" for unit in ("m", "h") for number in ("1.5", "-1", "+1", "1e3", "0x10", "\u0661")]
    + [f"1{unit.upper()}" for unit in ("y", "w", "d", "h", "m", "s")]  # units are lower case
    + ["1us", "1ns", "1µs", "1h 30m", " 1m", "1m ", "m", "90", "1mm", "1min", "1sec", "P1D", "1m\n"]
)
ZERO = ["0s", "0m", "0h0m0s", "00ms"]


def errors(value: object) -> list[str]:
    return fleet_filters.duration_errors(value, "celery_prometheus_interval", "Fix: it.")


def promtool_takes(promtool: str, tmp_path, durations: list[str]) -> bool:
    groups = [{"name": f"g{i}", "interval": d, "rules": []} for i, d in enumerate(durations)]
    (tmp_path / "durations.yml").write_text(yaml.safe_dump({"groups": groups}))
    return run(promtool, "check", "rules", "durations.yml", cwd=tmp_path).returncode == 0


def test_preflight_takes_every_duration_promtool_takes(promtool, tmp_path):
    assert len(TAKEN) == 2 ** len(UNITS) - 1
    assert promtool_takes(promtool, tmp_path, TAKEN)
    assert {d: errors(d) for d in TAKEN if errors(d)} == {}


@pytest.mark.parametrize("duration", REFUSED)
def test_preflight_refuses_what_promtool_refuses(promtool, tmp_path, duration):
    assert not promtool_takes(promtool, tmp_path, [duration])
    [message] = errors(duration)
    assert message.startswith(f"celery_prometheus_interval {duration!r} is not a Prometheus duration (")
    assert message.endswith("Fix: it.")


@pytest.mark.parametrize("duration", ZERO)
def test_preflight_refuses_zero_which_promtool_takes(promtool, tmp_path, duration):
    # Deliberate: a zero window fires at once, a zero interval or retention means Prometheus's default.
    assert promtool_takes(promtool, tmp_path, [duration])
    assert errors(duration)


@pytest.mark.parametrize("value", [90, 1.5, None, True, ["5m"], ""])
def test_preflight_refuses_what_is_no_string(value):
    assert errors(value)
