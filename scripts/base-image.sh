#!/usr/bin/env bash
# Build the Debian 12 systemd base image for the lab and Molecule hosts.
# No container registry is reachable, so the rootfs comes from debootstrap and
# `docker import`. The image tag carries a hash of this recipe: it is rebuilt
# only when the recipe changes.
set -euo pipefail

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,sudo,ca-certificates,iproute2,procps
REPO=celery-fleet-debian12

recipe_hash=$(printf '%s\n' "$SUITE" "$PACKAGES" "$(sed -n '/^# recipe-start/,$p' "$0")" | sha256sum | cut -c1-12)
tag="$REPO:$recipe_hash"

if docker image inspect "$tag" >/dev/null 2>&1; then
  docker tag "$tag" "$REPO:latest"
  echo "$tag"
  exit 0
fi

# recipe-start
rootfs=$(mktemp -d /var/tmp/celery-fleet-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >&2
# A container has no consoles or udev to wait for.
for unit in getty.target systemd-udevd.service systemd-udev-trigger.service \
            systemd-remount-fs.service systemd-firstboot.service; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
echo 'deb http://deb.debian.org/debian bookworm main' > "$rootfs/etc/apt/sources.list"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
: > "$rootfs/etc/machine-id"
tar -C "$rootfs" -c . | docker import \
  --change 'CMD ["/lib/systemd/systemd"]' \
  --change 'ENV container=docker' \
  - "$tag" >&2
docker tag "$tag" "$REPO:latest"
echo "$tag"
