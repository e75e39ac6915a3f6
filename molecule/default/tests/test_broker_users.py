"""The broker's ACL users on the running fleet: each component, with the credentials its unit gets,
is refused what no component may do, and only beat may write the lease. That every component still
works end to end with them is what the rest of the scenario shows (tasks round-trip, beat ticks,
Flower answers, verify and status pass)."""

from __future__ import annotations

import json
import shlex

import pytest
from fleet_testing import PATHS, VENV, on_host, show

LEASE = "celery-fleet:beat-leader"
# Each component's credentials file, as its unit's EnvironmentFile= names it.
FILES = {
    "worker": PATHS["worker_broker_env"],
    "beat": PATHS["beat_broker_env"],
    "flower": PATHS["flower_broker_env"],
    "admin": PATHS["broker_env"],
}
# Harmless forms of what no component may do: refused before they run.
REFUSED = [
    ["FLUSHALL"],
    ["FLUSHDB"],
    ["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
    ["CONFIG", "GET", "requirepass"],
    ["ACL", "LIST"],
    ["ACL", "SETUSER", "intruder", "on", ">pw", "+@all"],
    ["KEYS", "*"],
    ["SHUTDOWN", "ABORT"],
    ["SWAPDB", "0", "1"],
]
PROBE = """\
import json, sys
import redis
from celery_fleet.envfile import read_env_file
env = read_env_file(open(sys.argv[1]).read())
client = redis.Redis.from_url(env["CELERY_BROKER_URL"], socket_timeout=10)
out = {}
def attempt(*command):
    try:
        client.execute_command(*command)
    except redis.RedisError as exc:
        return type(exc).__name__
    return "ran"
out["ping"] = attempt("PING")
out["refused"] = {" ".join(c): attempt(*c) for c in json.loads(sys.argv[2])}
value = client.get(sys.argv[3])
out["lease_read"] = value is not None
# Writing the same value back, keeping its TTL: harmless for beat, refused for everyone else.
out["lease_write"] = attempt("SET", sys.argv[3], value or b"", "XX", "KEEPTTL") if value else "no lease"
print(json.dumps(out))
"""


@pytest.mark.parametrize("component", sorted(FILES))
def test_each_component_is_refused_what_none_may_do(host, component):
    argv = [f"{VENV}/bin/python", "-c", PROBE, FILES[component], json.dumps(REFUSED), LEASE]
    result = host.run(f"cd /tmp && timeout 60 {shlex.join(argv)}")
    assert result.rc == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["ping"] == "ran"
    assert answer["refused"] == {" ".join(c): "NoPermissionError" for c in REFUSED}
    assert answer["lease_read"]
    assert answer["lease_write"] == ("ran" if component == "beat" else "NoPermissionError")


DEFAULT_USER_PROBE = """\
import sys
from urllib.parse import urlsplit
import redis
from celery_fleet.envfile import read_env_file
url = urlsplit(read_env_file(open(sys.argv[1]).read())["CELERY_BROKER_URL"])
# AUTH <password> logs in as the default user, as does AUTH default <password>.
for user in (None, "default"):
    try:
        redis.Redis(host=url.hostname, port=url.port, username=user, password=url.password).ping()
        print("accepted")
    except redis.AuthenticationError:
        print("refused")
"""


def test_the_default_user_is_off_whatever_the_password(host):
    argv = [f"{VENV}/bin/python", "-c", DEFAULT_USER_PROBE, PATHS["broker_env"]]
    result = host.run(f"cd /tmp && timeout 60 {shlex.join(argv)}")
    assert result.stdout.split() == ["refused", "refused"], result.stderr


REACH = """\
targets = {targets}
out = {{u: app.send_task("demo_app.tasks.reach", args=[p], queue="low_priority").get(timeout=60)
        for u, p in targets.items()}}
# The probe itself can succeed: on the worker's own process, as its own user.
out["own"] = app.send_task("demo_app.tasks.reach", args=[out["flower.service"]["pid"]],
                           queue="low_priority").get(timeout=60)
print(json.dumps(out))
"""


def test_a_task_can_neither_read_nor_signal_beat_or_flower(host):
    # Beat and Flower run as users of their own (DynamicUser=), tasks as celery_app_user.
    targets = {u: int(show(host, u, "MainPID")["MainPID"]) for u in ("celery-beat.service", "flower.service")}
    assert all(targets.values()), targets
    out = on_host(host, REACH.format(targets=json.dumps(targets)))
    assert (out["own"]["environ"], out["own"]["signal"]) == ("ok", "ok"), out["own"]
    for unit in targets:
        assert out[unit]["environ"] != "ok", (unit, out[unit])  # hidden (ENOENT) or refused
        assert out[unit]["signal"] == "EPERM", (unit, out[unit])
    users = {u: show(host, u, "User", "DynamicUser") for u in targets}
    assert users == {
        "celery-beat.service": {"User": "celery-beat", "DynamicUser": "yes"},
        "flower.service": {"User": "celery-flower", "DynamicUser": "yes"},
    }
