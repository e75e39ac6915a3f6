#!/usr/bin/python
"""Read the GPUs a host has: from nvidia-smi where the driver is installed, else from /dev/nvidiaN nodes."""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: celery_worker_gpus
short_description: List a host's NVIDIA GPUs with their index, UUID and device minor number
description:
  - With C(nvidia-smi) on the PATH, queries C(index,uuid,minor_number) of every GPU.
  - Without it, lists the C(/dev/nvidiaN) character devices; their minor number is taken as the index.
  - Read-only; supports check mode.
options: {}
"""

RETURN = r"""
source:
  description: C(nvidia-smi), C(device nodes), or C(none).
  type: str
gpus:
  description: One dict per GPU with C(index), C(uuid) (null without nvidia-smi) and C(minor).
  type: list
  elements: dict
"""

EXAMPLES = r"""
- name: Read the host's GPUs
  celery_worker_gpus:
  register: gpus
"""

NODE = re.compile(r"^nvidia(\d+)$")


def parse_nvidia_smi(output: str) -> list[dict[str, Any]]:
    """Rows of ``index, uuid, minor_number`` as printed by ``--format=csv,noheader``."""
    gpus = []
    for line in output.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 3 and fields[0].isdigit():
            minor = int(fields[2]) if fields[2].isdigit() else int(fields[0])
            gpus.append({"index": int(fields[0]), "uuid": fields[1], "minor": minor})
    return gpus


def device_nodes(dev: str = "/dev") -> list[dict[str, Any]]:
    gpus = []
    for name in sorted(os.listdir(dev)):
        match = NODE.match(name)
        if match and stat.S_ISCHR(os.stat(os.path.join(dev, name)).st_mode):
            gpus.append({"index": int(match.group(1)), "uuid": None, "minor": int(match.group(1))})
    return sorted(gpus, key=lambda g: g["index"])


def main() -> None:
    module = AnsibleModule(argument_spec={}, supports_check_mode=True)
    smi = module.get_bin_path("nvidia-smi")
    if smi:
        rc, out, err = module.run_command(
            [smi, "--query-gpu=index,uuid,minor_number", "--format=csv,noheader"]
        )
        if rc != 0:
            module.fail_json(msg=f"nvidia-smi failed (rc {rc}): {err.strip() or out.strip()}")
        module.exit_json(changed=False, source="nvidia-smi", gpus=parse_nvidia_smi(out))
    nodes = device_nodes()
    module.exit_json(changed=False, source="device nodes" if nodes else "none", gpus=nodes)


if __name__ == "__main__":
    main()
