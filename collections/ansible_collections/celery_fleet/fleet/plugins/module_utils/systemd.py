"""systemd's command-line syntax: each argument of an ``ExecStart=`` reaches the program as one argument.

systemd splits ``ExecStart=`` on whitespace, unquotes double-quoted words and resolves C escapes in
them, expands ``%`` specifiers and ``$VAR``/``${VAR}`` environment references anywhere on the line.
Quoting every word, escaping ``\\`` and ``"``, writing control characters as ``\\xNN`` and doubling
``%`` and ``$`` leaves nothing for systemd to reinterpret: whatever a value holds (spaces, quotes,
``;``, ``%i``, ``$CELERY_APP``), the process gets it byte for byte as one argument.
"""

from __future__ import annotations

from collections.abc import Iterable


def quote_arg(arg: str) -> str:
    """One argument as a double-quoted systemd word."""
    out = []
    for char in arg:
        if char in '\\"':
            out.append("\\" + char)
        elif char == "$":
            out.append("$$")
        elif char == "%":
            out.append("%%")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def exec_command(argv: Iterable[str]) -> str:
    """Words of an ``ExecStart=`` line passing ``argv`` unchanged."""
    return " ".join(quote_arg(str(arg)) for arg in argv)


# Inside double quotes systemd's EnvironmentFile= parser unescapes these; it expands no variables.
ENV_ESCAPED = '"\\'


def env_assignment(name: str, value: object) -> str:
    """One ``NAME="value"`` line of an EnvironmentFile= that systemd reads back as exactly ``value``."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return name + '="' + "".join("\\" + c if c in ENV_ESCAPED else c for c in text) + '"'
