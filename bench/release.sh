#!/usr/bin/env bash
# A release under load, the old way and the new: per queue, the largest gap between two task
# starts while `site.yml` rolls a changed app out, and the rollout's wall time.
#
#   old: the deploy as of OLD_REF (default 89fc91d, before the zero-stall rollout), which
#        restarted every worker at once with `systemctl restart` (each waits for its drain)
#   new: this checkout: new units beside the old, canary first, old ones drain on their release
#
# Both deploy the same demo app (this checkout's, with the load task) on a fresh bench container,
# then roll a copy of it that differs in one line (same version) while demo_app.load sends a short
# task to every queue each 0.5 s, 3 s tasks to two, and one 180 s task to `processing`. Appends one
# JSON line per way to bench/results/release.jsonl.
#
# Reproduce: make venv image && bench/release.sh   (about 14 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/.venv/bin:$PATH" ANSIBLE_CONFIG="$ROOT/ansible.cfg"
OLD_REF=${OLD_REF:-89fc91d}
LONG=${LONG:-180}
results=bench/results/release.jsonl
work=$(mktemp -d /tmp/celery-fleet-bench-release.XXXXXX)
C=bench-fleet
QUEUES=high_priority,datasets,processing,training,extraction,low_priority
mkdir -p "$(dirname "$results")"

down() { (cd "$ROOT" && ansible-playbook -i bench/inventory scripts/lab-hosts.yml -e lab_state=absent >/dev/null) || true; }
cleanup() { down; git -C "$ROOT" worktree remove --force "$work/old" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The default scenario's workers: one unit per queue, `processing` with two processes for the long task.
cat >"$work/workers.yml" <<'EOF'
celery_workers:
  - {name: high, queues: [high_priority], concurrency: 2}
  - {name: datasets, queues: [datasets], pool: threads, concurrency: 4}
  - {name: processing, queues: [processing], concurrency: 2}
  - {name: gpu, queues: [training, extraction], pool: solo}
  - {name: low, queues: [low_priority], concurrency: 1}
EOF
for v in v1 v2; do
  cp -r examples/demo_app "$work/$v" && rm -rf "$work/$v/src/demo_app/__pycache__"
done
echo 'RELEASE_NOTE = "v2"' >>"$work/v2/src/demo_app/tasks.py"
git worktree add --detach "$work/old" "$OLD_REF" >/dev/null

fleet_py() {  # fleet_py <args>: the current release's python on the host, with the units' environment
  docker exec "$C" sh -c "set -a; . /etc/celery-fleet/celery.env; . /etc/celery-fleet/broker.env; cd /tmp; \
    \$(readlink -f /opt/celery-fleet/venv)/bin/python $*"
}

run_way() {  # run_way <name> <checkout>
  local name=$1 tree=$2 since until t0 t1 verdict
  down
  (cd "$tree" && export ANSIBLE_CONFIG="$tree/ansible.cfg" && ansible-playbook -i "$ROOT/bench/inventory" scripts/lab-hosts.yml >/dev/null &&
    ansible-playbook -i "$ROOT/bench/inventory" molecule/shared/prepare.yml >/dev/null &&
    ansible-playbook -i "$ROOT/bench/inventory" site.yml -e "@$work/workers.yml" \
      -e "{\"celery_app_sources\": [\"$work/v1\"]}" >"$work/$name-v1.log") || { tail -30 "$work/$name-v1.log"; exit 1; }
  docker exec "$C" rm -f /tmp/load.stop /tmp/load-sent.json
  docker exec "$C" systemd-run --unit=bench-load --working-directory=/tmp \
    --property=EnvironmentFile=/etc/celery-fleet/celery.env --property=EnvironmentFile=/etc/celery-fleet/broker.env \
    "$(docker exec "$C" readlink -f /opt/celery-fleet/venv)/bin/python" -m demo_app.load send --queues=$QUEUES \
    --interval=0.5 --medium-queues=high_priority,datasets --long-queue=processing --long="$LONG" \
    --stop-file=/tmp/load.stop --sent=/tmp/load-sent.json >/dev/null
  sleep 5
  since=$(date +%s.%N); t0=$since
  (cd "$tree" && export ANSIBLE_CONFIG="$tree/ansible.cfg" && ansible-playbook -i "$ROOT/bench/inventory" site.yml -e "@$work/workers.yml" \
    -e "{\"celery_app_sources\": [\"$work/v2\"]}" >"$work/$name-v2.log") || { tail -30 "$work/$name-v2.log"; exit 1; }
  t1=$(date +%s.%N); until=$t1
  docker exec "$C" touch /tmp/load.stop
  for _ in $(seq 30); do
    [ "$(docker exec "$C" systemctl is-active bench-load || true)" = active ] || break
    sleep 1
  done
  verdict=$(fleet_py -m demo_app.load check --sent /tmp/load-sent.json --since "$since" --until "$until" \
    --timeout $((LONG + 120)))
  python3 - "$name" "$OLD_REF" "$t0" "$t1" "$verdict" "$(nproc)" <<'PY' | tee -a "$results"
import datetime, json, sys
name, ref, t0, t1, verdict, cores = sys.argv[1:]
v = json.loads(verdict)
print(json.dumps({
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%FT%TZ"),
    "way": name, "old_ref": ref if name == "restart-all" else None,
    "rollout_s": round(float(t1) - float(t0), 1),
    "largest_gap_s": {q: g["gap"] for q, g in v["gaps"].items()},
    "tasks": v["sent"], "lost": len(v["lost"]), "ran_twice": len(v["duplicates"]),
    "machine": f"{cores} cores",
}))
PY
}

run_way restart-all "$work/old"
run_way zero-stall "$ROOT"
