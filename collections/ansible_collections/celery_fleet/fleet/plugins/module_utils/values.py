"""The fleet's rules for the scalar values several roles take: TCP ports and broker passwords."""

from __future__ import annotations

import re
from typing import Any

# A broker password goes into redis:// URLs and Redis's ACL file unquoted: URL-safe characters only.
PASSWORD = re.compile(r"[A-Za-z0-9._~-]{16,}", re.ASCII)
PASSWORD_FORMS = "16+ characters of [A-Za-z0-9._~-], e.g. `openssl rand -hex 24`"


def port_error(where: str, value: Any, fix: str) -> str | None:
    """The message for a value that is not a TCP port (1-65535, a number or its digits), else None."""
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535:
        return None
    return f"{where} {value!r} is not a TCP port (1-65535). {fix}"


def password_error(where: str, value: Any, fix: str) -> str | None:
    """The message for a broker password that is short (placeholders all are) or not URL-safe, else None."""
    if isinstance(value, str) and PASSWORD.fullmatch(value):
        return None
    return f"{where} is empty, a placeholder or not URL-safe; it must be {PASSWORD_FORMS}. {fix}"
