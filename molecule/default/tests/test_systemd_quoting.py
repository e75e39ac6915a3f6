"""Each argument the fleet writes into an ExecStart= reaches the program as exactly that one argument,
as the host's real systemd parses it. The cases come from systemd's own syntax: every character it
treats specially (quotes, escapes, specifiers, variables, separators, whitespace), each printable ASCII
character, and combinations of them."""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "collections"))
from ansible_collections.celery_fleet.fleet.plugins.module_utils.systemd import exec_command  # noqa: E402

UNIT = "celery-fleet-test-quoting.service"
OUT = "/run/celery-fleet-test-quoting.json"
# What systemd's ExecStart= parser gives meaning to (systemd.service(5), systemd.syntax(7)).
SPECIAL = ['"', "'", "\\", "%", "$", ";", " ", "\t", "@", "-", ":", "+", "!", "{", "}", "%i", "%%", "$$"]


def cases() -> list[str]:
    rng = random.Random(20261201)
    out = ["", "--queues=a b", "--app ${CELERY_APP}", "$CELERY_WORKER_ARGS", "%H%i%n", "a\\nb", "ünïcødé ✓"]
    out += [f"x{char}y" for char in string.printable if char not in "\r\n\x0b\x0c"]
    out += SPECIAL
    out += ["".join(rng.choice([*SPECIAL, *string.ascii_letters]) for _ in range(12)) for _ in range(40)]
    return out


def test_every_argument_reaches_the_program_unchanged(host):
    args = cases()
    program = f"import json, sys; open({OUT!r}, 'w').write(json.dumps(sys.argv[1:]))"
    unit = f"[Service]\nType=oneshot\nExecStart={exec_command(['/usr/bin/python3', '-c', program, *args])}\n"
    host.run(f"cat > /run/systemd/system/{UNIT} <<'UNIT'\n{unit}UNIT")
    try:
        host.run("systemctl daemon-reload")
        started = host.run(f"systemctl start {UNIT}")
        assert started.rc == 0, started.stderr + host.run(f"journalctl -u {UNIT} -n 20 --no-pager").stdout
        assert json.loads(host.file(OUT).content_string) == args
    finally:
        host.run(f"rm -f /run/systemd/system/{UNIT} {OUT}; systemctl daemon-reload")
