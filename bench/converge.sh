#!/usr/bin/env bash
# Wall time of a first converge of the lab fleet (3 hosts, fresh containers)
# and of the no-op re-run, against the raw floor: the same apt and pip installs
# done by hand on one fresh host. Appends one JSON line to bench/results/converge.jsonl.
#
# Reproduce: make venv image && bench/converge.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_CONFIG="$PWD/ansible.cfg"
LAB=(-i inventories/lab)
results=bench/results/converge.jsonl
mkdir -p "$(dirname "$results")"

now() { date +%s.%N; }
elapsed() { python3 -c "print(round($2 - $1, 1))"; }

lab_down() { ansible-playbook "${LAB[@]}" scripts/lab-hosts.yml -e lab_state=absent >/dev/null; }
trap lab_down EXIT

lab_down
ansible-playbook "${LAB[@]}" scripts/lab-hosts.yml >/dev/null
ansible-playbook "${LAB[@]}" molecule/shared/prepare.yml >/dev/null

t0=$(now); ansible-playbook "${LAB[@]}" site.yml >/tmp/celery-fleet-bench-first.log; t1=$(now)
echo "first converge: $(elapsed "$t0" "$t1") s"
ansible-playbook "${LAB[@]}" site.yml >/tmp/celery-fleet-bench-noop.log; t2=$(now)
grep -q 'changed=0' /tmp/celery-fleet-bench-noop.log
if grep -E 'changed=[1-9]' /tmp/celery-fleet-bench-noop.log; then
  echo "the no-op re-run changed something" >&2
  exit 1
fi

# Raw floor: the packages and the venv install alone, on a fresh lab host.
lab_down
ansible-playbook "${LAB[@]}" scripts/lab-hosts.yml >/dev/null
ansible-playbook "${LAB[@]}" molecule/shared/prepare.yml >/dev/null
archive=$(ls -t .cache/wheelhouse/wheelhouse-*.tar.gz | head -1)
docker cp "$archive" lab-broker:/root/wheelhouse.tar.gz
t3=$(now)
docker exec lab-broker bash -ec '
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q redis-server python3-venv >/dev/null
  mkdir -p /root/wh && tar -C /root/wh -xzf /root/wheelhouse.tar.gz
  python3 -m venv /root/venv
  /root/venv/bin/pip install -q --no-index --find-links /root/wh/* -r /root/wh/*/requirements.txt'
t4=$(now)

line=$(printf '{"date": "%s", "hosts": 3, "workers": 6, "first_converge_s": %s, "noop_rerun_s": %s, "raw_floor_one_host_s": %s, "machine": "%s cores"}' \
  "$(date -u +%FT%TZ)" "$(elapsed "$t0" "$t1")" "$(elapsed "$t1" "$t2")" "$(elapsed "$t3" "$t4")" "$(nproc)")
echo "$line" | tee -a "$results"
