#!/usr/bin/env bash
# Wall time of a no-op re-run as the number of worker units on one host grows:
# 1 unit, then 32, on the same fresh systemd container. Times both the worker
# play alone (playbooks/workers.yml, REPEAT times) and the whole site.yml
# (preflight and verify included, REPEAT_SITE times),
# and appends one JSON line per size to bench/results/worker_scale.jsonl.
#
# Reproduce: make venv image && bench/worker_scale.sh   (about 10 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_CONFIG="$PWD/ansible.cfg"
INV=(-i bench/inventory)
REPEAT=${REPEAT:-3}
REPEAT_SITE=${REPEAT_SITE:-1}
results=bench/results/worker_scale.jsonl
mkdir -p "$(dirname "$results")"

now() { date +%s.%N; }
down() { ansible-playbook "${INV[@]}" scripts/lab-hosts.yml -e lab_state=absent >/dev/null; }
trap down EXIT

noop() {  # noop <playbook> <workers>: print the wall time of one run that must change nothing
  local t0 t1 log=/tmp/celery-fleet-bench-scale.log
  t0=$(now)
  if ! ansible-playbook "${INV[@]}" "$1" -e "{\"bench_workers\": $2}" >"$log"; then
    tail -20 "$log" >&2; exit 1
  fi
  t1=$(now)
  if grep -E 'changed=[1-9]' "$log"; then echo "the no-op run of $1 changed something" >&2; exit 1; fi
  python3 -c "print(round($t1 - $t0, 1))"
}

down
ansible-playbook "${INV[@]}" scripts/lab-hosts.yml >/dev/null
ansible-playbook "${INV[@]}" molecule/shared/prepare.yml >/dev/null
for n in 1 32; do
  ansible-playbook "${INV[@]}" site.yml -e "{\"bench_workers\": $n}" >/tmp/celery-fleet-bench-scale-converge.log
  units=$(docker exec bench-fleet systemctl list-units --state=active --plain --no-legend 'celery-worker@*' | wc -l)
  [ "$units" -eq "$n" ] || { echo "expected $n active worker units, found $units" >&2; exit 1; }
  workers_s=(); site_s=()
  for _ in $(seq "$REPEAT"); do
    workers_s+=("$(noop playbooks/workers.yml "$n")") && [ -n "${workers_s[-1]}" ] || exit 1
  done
  for _ in $(seq "$REPEAT_SITE"); do
    site_s+=("$(noop site.yml "$n")") && [ -n "${site_s[-1]}" ] || exit 1
  done
  line=$(python3 - "$n" "${workers_s[*]}" "${site_s[*]}" "$(nproc)" <<'PY'
import json, statistics, sys, datetime
n, w, s, cores = sys.argv[1:]
w, s = [float(x) for x in w.split()], [float(x) for x in s.split()]
print(json.dumps({"date": datetime.datetime.now(datetime.timezone.utc).strftime("%FT%TZ"), "worker_units": int(n),
                  "noop_workers_play_s": w, "noop_workers_play_median_s": statistics.median(w),
                  "noop_site_s": s, "noop_site_median_s": statistics.median(s) if s else None, "machine": f"{cores} cores"}))
PY
)
  echo "$line" | tee -a "$results"
done
