"""The delivery cap against a real redis-server and a real prefork worker whose child is killed."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from celery import Celery
from conftest import RedisServer, demo_env
from demo_app.delivery import MIN_COUNTER_TTL, DeliveryCappedTask, DeliveryLimitExceeded

NODE = "capped@test"


def start_prefork_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    """A real prefork worker with one child: a killed child is replaced, the worker lives on."""
    argv = [sys.executable, "-m", "celery", "--app", "demo_app", "worker", f"--hostname={NODE}"]
    argv += [
        "--queues=high_priority",
        "--pool=prefork",
        "--concurrency=1",
        "--without-mingle",
        "--without-gossip",
    ]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@contextmanager
def client_app(env: dict[str, str]) -> Iterator[Celery]:
    """A bare Celery client on the test broker; it sends by task name, as another service would."""
    app = Celery("delivery-test", broker=env["CELERY_BROKER_URL"], backend=env["CELERY_RESULT_BACKEND"])
    app.conf.update(
        redis_socket_timeout=10,
        redis_socket_connect_timeout=5,
        broker_transport_options={"socket_timeout": 10, "socket_connect_timeout": 5},
    )
    try:
        yield app
    finally:
        app.close()


def counters(env: dict[str, str]) -> list[bytes]:
    backend = redis.Redis.from_url(env["CELERY_RESULT_BACKEND"], socket_timeout=5, socket_connect_timeout=5)
    try:
        return list(backend.scan_iter("celery:deliveries:*"))
    finally:
        backend.close()


@pytest.fixture
def prefork(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    env = demo_env(redis_server)
    log = tmp_path / "worker.log"
    worker = start_prefork_worker(env, log)
    try:
        yield env, log
        assert worker.poll() is None, "the worker died:\n" + log.read_text()
    finally:
        stop(worker)


def test_a_task_that_kills_its_process_every_time_fails_after_max_deliveries(prefork, redis_server):
    env, log = prefork
    with client_app(env) as app:
        result = app.send_task("demo_app.tasks.crash", queue="high_priority")
        result.get(timeout=120, propagate=False)
        assert result.state == "FAILURE", log.read_text()
        assert isinstance(result.result, DeliveryLimitExceeded)
        assert f"task {result.id} (demo_app.tasks.crash) was delivered 4 times" in str(result.result)
        runs = redis_server.client().lrange("demo:crashes", 0, -1)
        assert runs.count(result.id.encode()) == DeliveryCappedTask.max_deliveries
        # Acked, not requeued: the queue is empty and the same worker still serves.
        assert redis_server.client().llen("high_priority") == 0
        pong = app.send_task("demo_app.tasks.ping", queue="high_priority").get(timeout=30)
        assert pong["worker"] == NODE
    assert counters(env) == []


def test_tasks_that_finish_run_once_and_leave_no_counter(prefork, redis_server):
    env, log = prefork
    with client_app(env) as app:
        sent = [app.send_task("demo_app.tasks.sleep", args=(0.05,), queue="high_priority") for _ in range(5)]
        for result in sent:
            assert result.get(timeout=60)["slept"] == 0.05, log.read_text()
    runs = redis_server.client().lrange("demo:runs", 0, -1)
    assert sorted(runs) == sorted(r.id.encode() for r in sent)
    assert counters(env) == []


def test_the_cap_is_per_task_per_retry_and_overridable(redis_server):
    """The counting itself, on the real Redis, for a task with its own max_deliveries."""
    app = Celery("cap-unit", backend=redis_server.url, broker="memory://")

    @app.task(base=DeliveryCappedTask, bind=True, max_deliveries=2, shared=False)
    def job(self):
        return "ran"

    task_id = str(uuid.uuid4())
    key = f"celery:deliveries:{task_id}:0"
    job.push_request(id=task_id, retries=0, is_eager=False)
    try:
        job.before_start(task_id, (), {})
        job.before_start(task_id, (), {})
        client = redis_server.client()
        assert int(client.get(key)) == 2
        assert MIN_COUNTER_TTL - 5 <= client.ttl(key) <= MIN_COUNTER_TTL
        with pytest.raises(DeliveryLimitExceeded, match=r"delivered 3 times.*max_deliveries=2"):
            job.before_start(task_id, (), {})
        job.after_return("FAILURE", None, task_id, (), {}, None)
        assert client.exists(key) == 0
    finally:
        job.pop_request()
    # A retry reuses the task id but starts its own count.
    job.push_request(id=task_id, retries=1, is_eager=False)
    try:
        job.before_start(task_id, (), {})
        assert int(redis_server.client().get(f"celery:deliveries:{task_id}:1")) == 1
    finally:
        job.pop_request()
    app.close()


def test_without_a_redis_backend_the_cap_is_off_and_the_task_runs():
    app = Celery("cap-off", broker="memory://")

    @app.task(base=DeliveryCappedTask, bind=True, max_deliveries=1, shared=False)
    def job(self):
        return "ran"

    job.push_request(id="t", retries=0, is_eager=False)
    try:
        for _ in range(3):
            job.before_start("t", (), {})
    finally:
        job.pop_request()
