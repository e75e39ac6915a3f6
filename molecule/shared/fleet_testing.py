"""Helpers shared by every scenario's Testinfra tests: run fleet tools on a host as its units do."""

from __future__ import annotations

import json

import pytest

VENV = "/opt/celery-fleet/venv"
# Load the same environment files the units get, without putting a secret on a command line.
FLEET_ENV = "set -a; . /etc/celery-fleet/celery.env; . /etc/celery-fleet/broker.env; set +a; cd /tmp"


def fleet_json(host, command: str):
    """Run a command with the fleet's environment and parse its JSON output."""
    result = host.run(f"{FLEET_ENV}; timeout 120 {command}")
    assert result.rc == 0, f"{command} failed ({result.rc}):\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def exposure(host, unit: str) -> float:
    """The unit's overall `systemd-analyze security` exposure score."""
    out = host.run(f"systemd-analyze security --no-pager {unit} | tail -1").stdout
    return float(out.split("service:")[1].split()[0])


def journal(host, unit: str) -> str:
    return host.run(f"journalctl -u {unit} -n 40 --no-pager").stdout


@pytest.fixture(scope="module")
def hostvars(host):
    return host.ansible.get_variables()
