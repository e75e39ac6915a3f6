"""The broker's ACL users against a real redis-server loaded with the very lines redis.conf gets.

Each component's refusals are asked of Redis itself (``ACL DRYRUN``, which checks a command against a
user without running it), for every command of Redis's own ``@dangerous`` category and the ones the
fleet names; the lease key's protection is checked for keys generated around it; and a real worker
and a real beat publish run as their users.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator

import pytest
import redis
from ansible_collections.celery_fleet.fleet.plugins.module_utils import broker_acl
from conftest import RedisServer
from redis.backoff import NoBackoff
from redis.retry import Retry

MASTER = "lab-broker-7f3c9a1e5d2b4c68"
LEASE = "celery-fleet:beat-leader"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RedisServer]:
    lines = broker_acl.acl_lines(MASTER, LEASE)
    server = RedisServer(tmp_path_factory.mktemp("acl"), "\n".join(lines) + "\n", user="tester")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def connect(server: RedisServer, **kwargs: str) -> redis.Redis:
    """A client that tries once: redis-py would otherwise retry a refused login with backoff."""
    return redis.Redis(port=server.port, socket_timeout=5, retry=Retry(NoBackoff(), 0), **kwargs)


def as_component(server: RedisServer, component: str) -> redis.Redis:
    return connect(
        server, username=broker_acl.user_name(component), password=broker_acl.password(MASTER, component)
    )


def allowed(server: RedisServer, component: str, *command: str) -> bool:
    answer = server.client().execute_command("ACL", "DRYRUN", broker_acl.user_name(component), *command)
    return answer in (b"OK", "OK")


def command_lines(server: RedisServer, name: str) -> list[list[str]]:
    """Each form of a command (each subcommand of a container) with as many dummy arguments as it needs."""
    command, _, sub = name.partition("|")
    info = server.client().execute_command("COMMAND", "INFO", command)[command]
    if not info["subcommands"]:
        return [[command] + ["x"] * (abs(info["arity"]) - 1)]
    subs = [(entry[0].decode(), entry[1]) for entry in info["subcommands"]]
    return [
        full.split("|") + ["x"] * (abs(arity) - 2)
        for full, arity in subs
        if not sub or full == f"{command}|{sub}"
    ]


def test_the_default_user_is_off(server):
    with pytest.raises(redis.AuthenticationError):
        connect(server).ping()
    with pytest.raises(redis.AuthenticationError):
        connect(server, password=MASTER).ping()


@pytest.mark.parametrize("component", broker_acl.COMPONENTS)
def test_each_component_logs_in_with_its_own_derived_password_only(server, component):
    assert as_component(server, component).ping()
    others = [c for c in broker_acl.COMPONENTS if c != component]
    for other in others:  # another component's password is not this one's
        with pytest.raises(redis.AuthenticationError):
            connect(
                server, username=broker_acl.user_name(component), password=broker_acl.password(MASTER, other)
            ).ping()
    with pytest.raises(redis.AuthenticationError):  # nor is the master itself
        connect(server, username=broker_acl.user_name(component), password=MASTER).ping()


def dangerous_commands(server: RedisServer) -> list[str]:
    """Every command of this Redis's own @dangerous category, and the ones the fleet names."""
    names = {
        c.decode() if isinstance(c, bytes) else c
        for c in server.client().execute_command("ACL", "CAT", "dangerous")
    }
    return sorted(names | set(broker_acl.REFUSED))


@pytest.mark.parametrize("component", broker_acl.COMPONENTS)
def test_no_component_may_run_a_dangerous_command(server, component):
    extra = set(broker_acl.COMPONENTS[component][1])
    refused = [c for c in dangerous_commands(server) if c not in extra]
    assert {"flushall", "flushdb", "config", "acl", "debug", "shutdown", "keys", "module"} <= set(refused)
    let_through = [
        line for name in refused for line in command_lines(server, name) if allowed(server, component, *line)
    ]
    assert let_through == []
    # And for real, harmless variants (DEBUG and MODULE are also off in redis.conf, so they fail earlier):
    client = as_component(server, component)
    for command in (
        ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
        ("CONFIG", "GET", "requirepass"),
        ("ACL", "LIST"),
        ("KEYS", "*"),
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("SHUTDOWN", "ABORT"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    assert server.client().config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def keys_around(key: str, count: int = 300) -> list[str]:
    """Keys generated from ``key``: itself, its prefixes and extensions, one-character edits, random keys."""
    rng = random.Random(key)
    alphabet = string.printable.strip() + "*?[]\\^-"
    out = {key, key + "x", key + "*", "x" + key, key[:-1], key.upper()}
    out |= {key[:i] for i in range(1, len(key))}
    for _ in range(count):
        i = rng.randrange(len(key))
        edit = rng.choice(("replace", "insert", "delete"))
        c = rng.choice(alphabet)
        if edit == "replace":
            out.add(key[:i] + c + key[i + 1 :])
        elif edit == "insert":
            out.add(key[:i] + c + key[i:])
        else:
            out.add(key[:i] + key[i + 1 :])
        out.add("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30))))
    return sorted(k for k in out if k)


@pytest.mark.parametrize("lease", [LEASE, "x", "a*b?c[d]e\\f^g-h", "tenant:42:beat", "]", "^-^"])
def test_only_beat_may_write_the_lease_the_metrics_user_nothing_and_the_rest_every_other_key(tmp_path, lease):
    lines = broker_acl.acl_lines(MASTER, lease)
    server = RedisServer(tmp_path, "\n".join(lines) + "\n", user="tester")
    server.start()
    try:
        for key in keys_around(lease, 80):
            for component in broker_acl.COMPONENTS:
                writes = allowed(server, component, "SET", key, "v")
                expected = component == "beat" or (key != lease and component not in broker_acl.READ_ONLY)
                assert writes == expected, (component, key)
                assert allowed(server, component, "GET", key), (component, key)
            assert not allowed(server, "worker", "DEL", lease)
    finally:
        server.stop()


def test_passwords_are_long_distinct_and_derived_only_from_the_master():
    passwords = {c: broker_acl.password(MASTER, c) for c in broker_acl.COMPONENTS}
    assert len(set(passwords.values())) == len(passwords)
    assert all(len(p) == 64 and set(p) <= set(string.hexdigits.lower()) for p in passwords.values())
    assert broker_acl.password(MASTER, "worker") == passwords["worker"]
    assert broker_acl.password(MASTER + "x", "worker") != passwords["worker"]
    assert all(MASTER not in line for line in broker_acl.acl_lines(MASTER, LEASE))
    assert all(p not in line for line in broker_acl.acl_lines(MASTER, LEASE) for p in passwords.values())


def test_a_worker_runs_tasks_and_beat_publishes_under_their_own_users(server, tmp_path, monkeypatch):
    from conftest import demo_env, run_demo, start_demo_worker  # noqa: PLC0415

    from celery_fleet import beat_fence  # noqa: PLC0415

    def url(component: str, db: int) -> str:
        return broker_acl.broker_url(MASTER, component, "127.0.0.1", server.port, db)

    env = demo_env(server, CELERY_BROKER_URL=url("worker", 0), CELERY_RESULT_BACKEND=url("worker", 1))
    from demo_app.celery import QUEUES  # noqa: PLC0415

    worker = start_demo_worker(env, "acl@test", ",".join(QUEUES))
    try:
        client_env = {**env, "CELERY_BROKER_URL": url("admin", 0), "CELERY_RESULT_BACKEND": url("admin", 1)}
        result = run_demo(client_env)
        assert result.returncode == 0, result.stderr
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    # Beat's fenced publish: its user may hold the lease and run the push script.
    beat = as_component(server, "beat")
    assert beat.set(LEASE, "token", px=10_000)
    monkeypatch.setenv(beat_fence.LEASE_KEY_ENV, LEASE)
    monkeypatch.setenv(beat_fence.LEASE_TOKEN_ENV, "token")
    from kombu import Connection, Exchange, Queue  # noqa: PLC0415

    queue = Queue("acl-beat", Exchange("acl-beat"), routing_key="acl-beat")
    with (
        Connection(url("beat", 0), transport=beat_fence.transport_class()) as connection,
        connection.Producer() as producer,
    ):
        producer.publish(
            {"x": 1}, exchange=queue.exchange, routing_key="acl-beat", declare=[queue], retry=False
        )
    assert server.client().llen("acl-beat") == 1


@pytest.mark.parametrize("char", sorted(set(string.punctuation + " ") - {"/"}))
def test_a_tls_url_hands_its_files_to_kombu_redis_py_and_celery_unchanged(char):
    # Every printable character a path can hold, URL delimiters included, reaches each parser intact.
    from celery.backends.redis import RedisBackend  # noqa: PLC0415
    from kombu.utils.url import url_to_parts  # noqa: PLC0415
    from redis.connection import SSLConnection, parse_url  # noqa: PLC0415

    tls = {name: f"/etc/fleet{char}x/tls/{name}.pem" for name in ("ca", "cert", "key")}
    url = broker_acl.broker_url(MASTER, "worker", "10.0.0.5", 6380, 0, tls=tls)
    assert url.startswith("rediss://")
    expected = {"ssl_ca_certs": tls["ca"], "ssl_certfile": tls["cert"], "ssl_keyfile": tls["key"]}
    redis_py = parse_url(url)
    assert redis_py["connection_class"] is SSLConnection
    assert {k: redis_py[k] for k in expected} == expected
    assert redis_py["ssl_cert_reqs"] == "required"
    from kombu.utils.url import parse_url as kombu_parse  # noqa: PLC0415

    kombu_ssl = kombu_parse(url)["ssl"]
    assert {k: kombu_ssl[k] for k in expected} == expected
    assert url_to_parts(url).hostname == "10.0.0.5"
    from celery import Celery  # noqa: PLC0415

    backend = RedisBackend(app=Celery(set_as_current=False), url=url)
    assert {k: backend.connparams[k] for k in expected} == expected


def test_without_tls_the_url_is_plain_redis():
    assert broker_acl.broker_url(MASTER, "worker", "127.0.0.1", 6379, 0).startswith("redis://celery-worker:")
