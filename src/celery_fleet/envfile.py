"""Read the environment files systemd gives the fleet's units."""

from __future__ import annotations

import shlex


def read_env_file(text: str) -> dict[str, str]:
    """Parse a systemd EnvironmentFile: KEY=VALUE lines, comments, optional quotes."""
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        words = shlex.split(value) if value else [""]
        env[key.strip()] = " ".join(words)
    return env
