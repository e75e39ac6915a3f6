#!/usr/bin/env bash
# What the build host needs, from Debian: a Docker engine (docker.io) for the
# lab and Molecule hosts, debootstrap for their base image, redis-server for
# the unit tests, prometheus for promtool, which checks and tests the alert
# rules, and chromium, whose headless screenshots of Flower and Prometheus the
# README shows (a font, so that their text renders). Starts dockerd when none is running.
set -euo pipefail

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium fonts-dejavu-core)
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
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
