"""celery-fleet-metrics against a real redis-server with the fleet's ACL, fed by a real Celery producer."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest
import redis
from ansible_collections.celery_fleet.fleet.plugins.module_utils import broker_acl
from celery import Celery
from conftest import ROOT, RedisServer, free_port
from prometheus_client.parser import text_string_to_metric_families

from celery_fleet.metrics import QueueWatch, sub_queues

MASTER = "metrics-broker-3b1f9c0e2d4a"
LEASE = "celery-fleet:beat-leader"


@pytest.fixture
def server(tmp_path):
    lines = broker_acl.acl_lines(MASTER, LEASE)
    server = RedisServer(tmp_path, "\n".join(lines) + "\n", user="tester")
    server.start()
    yield server
    server.stop()


def url(server: RedisServer, component: str) -> str:
    return broker_acl.broker_url(MASTER, component, "127.0.0.1", server.port, 0)


def producer(server: RedisServer) -> Celery:
    app = Celery("probe", broker=url(server, "admin"))
    app.conf.broker_transport_options = {"priority_steps": [0, 3, 6, 9]}
    return app


def publish(app: Celery, queue: str, count: int, **options) -> None:
    for _ in range(count):
        app.send_task("probe.noop", queue=queue, **options)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_depth_sums_the_priority_sub_queues_and_age_follows_the_tail(server):
    app = producer(server)
    reader = server.client()
    clock = Clock()
    watch = QueueWatch(reader, ["jobs", "idle"], clock=clock)
    assert watch.poll() == {
        "jobs": {"messages": 0, "oldest_age": 0.0},
        "idle": {"messages": 0, "oldest_age": 0.0},
    }
    publish(app, "jobs", 3)
    publish(app, "jobs", 2, priority=5)  # kombu puts these in a sub-queue of their own
    assert sum(reader.llen(key) for key in sub_queues("jobs")[1:]) == 2
    clock.now = 1010.0
    assert watch.poll()["jobs"] == {"messages": 5, "oldest_age": 0.0}
    publish(app, "jobs", 4)
    clock.now = 1030.0
    assert watch.poll()["jobs"] == {"messages": 9, "oldest_age": 20.0}
    # Consumers take from the tail: the first five (stamped at 1010) go, then the age is the next batch's.
    for _ in range(3):
        reader.rpop("jobs")
    for key in sub_queues("jobs")[1:]:
        while reader.rpop(key):
            pass
    clock.now = 1040.0
    assert watch.poll()["jobs"] == {"messages": 4, "oldest_age": 10.0}
    while reader.rpop("jobs"):
        pass
    clock.now = 1050.0
    assert watch.poll()["jobs"] == {"messages": 0, "oldest_age": 0.0}
    assert watch.poll()["idle"] == {"messages": 0, "oldest_age": 0.0}


def test_a_burst_bigger_than_a_poll_reads_is_still_counted(server, monkeypatch):
    monkeypatch.setattr("celery_fleet.metrics.MAX_NEW", 10)
    monkeypatch.setattr("celery_fleet.metrics.PAGE", 4)
    app = producer(server)
    clock = Clock()
    watch = QueueWatch(server.client(), ["jobs"], clock=clock)
    publish(app, "jobs", 25)
    assert watch.poll()["jobs"] == {"messages": 25, "oldest_age": 0.0}
    clock.now += 7
    assert watch.poll()["jobs"] == {"messages": 25, "oldest_age": 7.0}


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_the_exporter_serves_the_queues_as_the_read_only_metrics_user(server, tmp_path):
    publish(producer(server), "jobs", 6)
    port = free_port()
    env = {"CELERY_BROKER_URL": url(server, "metrics"), "PYTHONPATH": str(ROOT / "src")}
    argv = [sys.executable, "-m", "celery_fleet.metrics", "--address", "127.0.0.1", "--port", str(port)]
    exporter = subprocess.Popen(
        [*argv, "--queue", "jobs", "--queue", "idle", "--interval", "0.5"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        metrics: dict = {}
        while time.monotonic() < deadline:
            try:
                metrics = scrape(port)
            except OSError:
                time.sleep(0.2)
                continue
            if metrics.get("celery_fleet_broker_up", {}).get(()) == 1:
                break
            time.sleep(0.2)
        assert metrics["celery_fleet_broker_up"][()] == 1
        assert metrics["celery_fleet_queue_messages"] == {(("queue", "idle"),): 0, (("queue", "jobs"),): 6}
        assert set(metrics["celery_fleet_queue_oldest_message_age_seconds"]) == {
            (("queue", "idle"),),
            (("queue", "jobs"),),
        }
        # The exporter's user reads; it can change nothing.
        reader = server.client()
        reader.execute_command(
            "AUTH", broker_acl.user_name("metrics"), broker_acl.password(MASTER, "metrics")
        )
        with pytest.raises(redis.exceptions.NoPermissionError):
            reader.rpop("jobs")
    finally:
        exporter.terminate()
        _, err = exporter.communicate(timeout=10)
    assert "Traceback" not in err, err[-2000:]
