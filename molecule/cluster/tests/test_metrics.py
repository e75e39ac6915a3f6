"""The fleet as Prometheus on cluster-flower sees it: real exporters, real scrapes, the shipped rules."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import time

import pytest
from fleet_testing import ROOT, exposure, on_host, other, worker_units

# Prometheus and its loopback exporters run on the Flower host; the fleet's hosts are reached from it.
testinfra_hosts = ["ansible://cluster-flower"]

FLEET_HOSTS = {
    "cluster-broker",
    "cluster-worker1",
    "cluster-worker2",
    "cluster-flower",
    "cluster-beat1",
    "cluster-beat2",
}
GPU_QUEUES = ("training", "extraction")
# The scenario scrapes and evaluates every 5 s and fires CeleryQueueWithoutConsumer after 10 s: a change
# shows within a few intervals. The bound is generous for a loaded CI machine, never a measured time.
SETTLE = 120
PROMETHEUS = "http://127.0.0.1:9090"
# The README's pictures, as this test run takes them.
PICTURES = ROOT / "docs" / "img"
_spec = importlib.util.spec_from_file_location("lab_forward", ROOT / "scripts" / "lab_forward.py")
lab_forward = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lab_forward)


def prometheus(host, path: str, **params: str) -> dict:
    """One call to Prometheus's HTTP API on its loopback, from its own host."""
    script = (
        "import json, sys, urllib.parse, urllib.request\n"
        f"url = {PROMETHEUS + path!r} + '?' + urllib.parse.urlencode(json.loads(sys.argv[1]))\n"
        "print(urllib.request.urlopen(url, timeout=10).read().decode())\n"
    )
    result = host.run(f"python3 -c {shlex.quote(script)} {shlex.quote(json.dumps(params))}")
    assert result.rc == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["status"] == "success", body
    return body["data"]


def query(host, expr: str) -> dict[tuple, float]:
    """An instant query: ``{labels as sorted pairs: value}``."""
    data = prometheus(host, "/api/v1/query", query=expr)
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in data["result"]}


def until(host, expr: str, check, what: str) -> dict[tuple, float]:
    """Query ``expr`` until ``check(result)`` holds, for at most SETTLE seconds."""
    deadline = time.monotonic() + SETTLE
    while True:
        result = query(host, expr)
        if check(result):
            return result
        assert time.monotonic() < deadline, f"{what}: {expr} is still {result} after {SETTLE} s"
        time.sleep(2)


def by(result: dict[tuple, float], label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for labels, value in result.items()}


def firing(host, queue: str) -> dict[tuple, float]:
    return query(
        host, f'ALERTS{{alertname="CeleryQueueWithoutConsumer",alertstate="firing",queue="{queue}"}}'
    )


def test_prometheus_scrapes_every_exporter_of_the_fleet(host):
    up = until(
        host,
        "up",
        lambda r: len(r) >= len(FLEET_HOSTS) + 4 and all(v == 1 for v in r.values()),
        "every target up",
    )
    targets = {(dict(k)["job"], dict(k)["instance"]) for k in up}
    assert {("node", h) for h in FLEET_HOSTS} <= targets
    assert {
        ("redis", "cluster-broker"),
        ("celery-fleet", "cluster-flower"),
        ("flower", "cluster-flower"),
    } <= targets


def test_redis_memory_and_persistence_are_reported(host):
    used = by(query(host, "redis_memory_used_bytes"), "instance")
    assert used["cluster-broker"] > 0
    assert "cluster-broker" in by(query(host, "redis_memory_max_bytes"), "instance")  # 0: no cap here
    assert by(query(host, "redis_aof_enabled"), "instance") == {"cluster-broker": 1.0}
    assert by(query(host, "redis_aof_last_write_status"), "instance") == {"cluster-broker": 1.0}


def test_every_shipped_rule_evaluates_against_the_real_series(host):
    groups = prometheus(host, "/api/v1/rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert {
        "CeleryQueueWithoutConsumer",
        "CeleryBeatTwoLeaders",
        "CeleryRedisRefusesWrites",
        "CeleryTaskFailureRate",
        "celery_fleet:queue_consumers",
    } <= set(rules)
    assert {name: r["health"] for name, r in rules.items() if r["health"] != "ok"} == {}


def test_every_routed_queue_has_its_consumers(host):
    consumers = until(
        host, "celery_fleet:queue_consumers", lambda r: len(r) >= 6, "a consumer count per queue"
    )
    counts = by(consumers, "queue")
    # Two GPU units consume each GPU queue; one unit each of cluster-worker1's queues.
    assert counts == {
        "high_priority": 1,
        "datasets": 1,
        "processing": 1,
        "low_priority": 1,
        "training": 2,
        "extraction": 2,
    }


def test_worker_units_are_up_with_their_restart_counts(host):
    active = query(host, 'node_systemd_unit_state{name=~"celery-worker@.+",state="active"} == 1')
    assert {dict(k)["instance"] for k in active} == {"cluster-worker1", "cluster-worker2"}
    restarts = query(host, 'node_systemd_service_restart_total{name=~"celery-worker@.+"}')
    assert {dict(k)["name"] for k in restarts} >= {dict(k)["name"] for k in active}


def test_task_outcomes_and_runtimes_come_from_flower(host):
    # The verify playbook and the round-trip test ran tasks; every worker sends task events (-E).
    succeeded = until(
        host,
        'sum by (task) (flower_events_total{type="task-succeeded"})',
        lambda r: len(r) > 0,
        "task outcomes in Flower's metrics",
    )
    assert all(v > 0 for v in succeeded.values())
    assert query(host, "sum(flower_task_runtime_seconds_count)")


def test_exactly_one_beat_leader_now_and_never_two(host):
    until(host, "celery_fleet:beat_leaders", lambda r: list(r.values()) == [1.0], "one beat leader")
    leaders = query(host, "celery_fleet:beat_leader")
    assert {dict(k)["instance"] for k in leaders} <= {"cluster-beat1", "cluster-beat2"}
    # Every evaluation since Prometheus started, the failovers of side_effect.yml included.
    assert list(query(host, "max_over_time(celery_fleet:beat_leaders[1h])").values()) == [1.0]


def test_leadership_moved_across_the_failovers_and_one_host_led_at_a_time(host):
    done = other(host, "cluster-broker").file("/var/lib/celery-fleet-test-side-effects-done")
    if not done.exists:
        pytest.skip("the failovers of side_effect.yml have not run yet (the first verify)")
    history = prometheus(
        host,
        "/api/v1/query_range",
        query="celery_fleet:beat_leader",
        start=str(time.time() - 3600),
        end=str(time.time()),
        step="5",
    )
    leaders = {r["metric"]["instance"] for r in history["result"]}
    assert leaders == {"cluster-beat1", "cluster-beat2"}, history
    # At each step the one-leader count: never two, whichever host held it.
    count = prometheus(
        host,
        "/api/v1/query_range",
        query="celery_fleet:beat_leaders",
        start=str(time.time() - 3600),
        end=str(time.time()),
        step="5",
    )
    assert {float(v) for _, v in count["result"][0]["values"]} <= {0.0, 1.0}


def test_depth_and_the_no_consumer_alert_follow_a_stopped_worker(host, browser):
    gpu_host = other(host, "cluster-worker2")
    units = sorted(worker_units(gpu_host).values())
    assert len(units) == 2, units
    assert not firing(host, "training")
    published = 7
    assert gpu_host.run(f"systemctl stop {' '.join(units)}").rc == 0
    try:
        until(
            host,
            "celery_fleet:queue_consumers",
            lambda r: by(r, "queue").get("training") == 0,
            "no consumer of training once its units stopped",
        )
        on_host(
            host,
            f"for _ in range({published}):\n    app.send_task('demo_app.tasks.ping', queue='training')\n"
            "print(json.dumps('sent'))",
        )
        until(
            host,
            'celery_fleet_queue_messages{queue="training"}',
            lambda r: list(r.values()) == [published],
            f"depth {published} after {published} tasks with no consumer",
        )
        until(
            host,
            'celery_fleet_queue_oldest_message_age_seconds{queue="training"} > 0',
            bool,
            "the oldest message's age grows",
        )
        until(
            host,
            'ALERTS{alertname="CeleryQueueWithoutConsumer",alertstate="firing",queue="training"}',
            bool,
            "CeleryQueueWithoutConsumer fires for training",
        )
        # The README's picture of Prometheus's alerts page, while this alert fires.
        page = browser(9090, "/classic/alerts", "prometheus-alerts.png")
        assert "CeleryQueueWithoutConsumer" in page, page[-2000:]
    finally:
        assert gpu_host.run(f"systemctl start {' '.join(units)}").rc == 0
    until(
        host,
        'celery_fleet_queue_messages{queue="training"}',
        lambda r: list(r.values()) == [0],
        "the queue drained once its workers started again",
    )
    until(
        host,
        'ALERTS{alertname="CeleryQueueWithoutConsumer",queue="training"}',
        lambda r: not r,
        "CeleryQueueWithoutConsumer clears",
    )


def listening(host, port: int) -> list[str]:
    lines = host.run("ss -Htln").stdout.splitlines()
    return sorted({line.split()[3] for line in lines if line.split()[3].endswith(f":{port}")})


def test_every_metrics_endpoint_listens_on_a_private_address_or_loopback(host):
    for name in FLEET_HOSTS:
        address = (
            other(host, name).ansible.get_variables()["ansible_host"] if name == "cluster-worker1" else None
        )
        bound = listening(other(host, name), 9100)
        assert len(bound) == 1 and not bound[0].startswith(("0.0.0.0:", "*:", "[::]:")), f"{name}: {bound}"
        if address:
            assert bound == [f"{address}:9100"]
    # Prometheus, the Redis exporter and celery-fleet-metrics: loopback only.
    for port in (9090, 9121, 9808):
        assert listening(host, port) == [f"127.0.0.1:{port}"]


def scrape(host, url: str) -> str:
    """What a GET of ``url`` from ``host`` gets: its status, or the error that stopped it."""
    script = (
        "import sys, urllib.request\n"
        "try:\n    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)\n"
        "except Exception as e:\n    print(type(e).__name__)\n"
    )
    return host.run(f"python3 -c {shlex.quote(script)} {shlex.quote(url)}").stdout.strip()


def test_node_exporter_answers_prometheus_only(host):
    # The broker's node exporter: Prometheus's host gets it, another fleet host does not (IPAddressDeny=).
    assert scrape(host, "http://172.30.78.10:9100/metrics") == "200"
    assert scrape(other(host, "cluster-worker2"), "http://172.30.78.10:9100/metrics") != "200"


def test_celery_fleet_metrics_unit_exposure_is_under_its_bar(host):
    assert exposure(host, "celery-fleet-metrics") <= 1.0


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium on this machine, reaching Flower and Prometheus on cluster-flower's loopback
    through scripts/lab_forward.py. Only loopback: every other name resolves to nothing."""
    listeners = {port: lab_forward.serve("cluster-flower", port, 0) for port in (5555, 9090)}
    local = {port: listener.getsockname()[1] for port, listener in listeners.items()}
    profile = tmp_path_factory.mktemp("chromium")

    def chromium(url: str, *action: str) -> str:
        result = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-domain-reliability",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--user-data-dir={profile}",
                "--window-size=1400,900",
                "--virtual-time-budget=10000",
                *action,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    def take(port: int, path: str, picture: str, auth: str = "") -> str:
        """The page's DOM once its scripts ran, and its screenshot in docs/img/``picture``."""
        url = f"http://{auth + '@' if auth else ''}127.0.0.1:{local[port]}{path}"
        PICTURES.mkdir(parents=True, exist_ok=True)
        (PICTURES / picture).unlink(missing_ok=True)
        chromium(url, f"--screenshot={PICTURES / picture}")
        assert (PICTURES / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return chromium(url, "--dump-dom")

    yield take
    for listener in listeners.values():
        listener.close()


def test_flower_workers_page_shows_every_worker_of_the_fleet(host, browser, hostvars):
    login = f"{hostvars['flower_user']}:{hostvars['flower_password']}"
    # Each serving unit celery-worker@<instance>.<slot> is the node <instance>.<slot>@<host>.
    nodes = {
        f"{unit.removeprefix('celery-worker@').removesuffix('.service')}@{name}"
        for name in ("cluster-worker1", "cluster-worker2")
        for unit in worker_units(other(host, name)).values()
    }
    assert len(nodes) >= 4, nodes
    page = browser(5555, "/workers", "flower-workers.png", login)
    assert [node for node in sorted(nodes) if node not in page] == [], page[-2000:]
