#!/usr/bin/env bash
# Make sure a Docker engine answers: install Debian's docker.io when there is
# none, and start dockerd when none is running.
set -euo pipefail

if ! command -v dockerd >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q docker.io
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q debootstrap
fi
if docker info >/dev/null 2>&1; then
  exit 0
fi
# No init system to ask on a bare build machine: start the daemon directly.
nohup dockerd >/var/log/celery-fleet-dockerd.log 2>&1 &
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not come up within 60 s; see /var/log/celery-fleet-dockerd.log" >&2
exit 1
