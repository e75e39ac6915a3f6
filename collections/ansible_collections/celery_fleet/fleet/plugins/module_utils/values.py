"""The fleet's rules for the scalar values several roles take: TCP ports, broker passwords, addresses and
Prometheus durations."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

# A broker password goes into redis:// URLs and Redis's ACL file unquoted: URL-safe characters only.
PASSWORD = re.compile(r"[A-Za-z0-9._~-]{16,}", re.ASCII)
PASSWORD_FORMS = "16+ characters of [A-Za-z0-9._~-], e.g. `openssl rand -hex 24`"
# Prometheus's duration (prometheus/common model.ParseDuration): integers with a unit, each unit at most
# once, largest first. Zero, which Prometheus takes, is refused: every fleet duration must be crossable.
DURATION_UNITS = ("y", "w", "d", "h", "m", "s", "ms")
DURATION = re.compile("".join(rf"(?:[0-9]+{unit})?" for unit in DURATION_UNITS), re.ASCII)
DURATION_FORMS = "a number and a unit, largest first, like 90s, 5m or 1h30m; units y w d h m s ms; not 0"


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


def address_error(where: str, value: Any, fix: str, ipv6: bool = True) -> str | None:
    """The message for a value that is not one IP address (IPv4 only when ``ipv6`` is false), else None."""
    kinds = (ipaddress.IPv4Address, ipaddress.IPv6Address) if ipv6 else (ipaddress.IPv4Address,)
    if isinstance(value, str):
        for kind in kinds:
            try:
                kind(value)
            except ValueError:
                continue
            return None
    forms = "an IPv4 or IPv6 address, like 10.0.0.5" if ipv6 else "an IPv4 address, like 10.0.0.5"
    return f"{where} {value!r} is not {forms}. {fix}"


def network_error(where: str, value: Any, fix: str) -> str | None:
    """The message for a value that is not an IP network (10.0.0.0/24, 10.0.0.5, fd00::/64), else None."""
    if isinstance(value, str) and value == value.strip():
        try:
            ipaddress.ip_network(value, strict=True)
        except ValueError:
            pass
        else:
            return None
    return f"{where} {value!r} is not an IP network like 10.0.0.0/24 (no host bits set) or one address. {fix}"


def duration_error(where: str, value: Any, fix: str) -> str | None:
    """The message for a value that is not a non-zero Prometheus duration (1h30m, 90s), else None."""
    nonzero = isinstance(value, str) and any(c in "123456789" for c in value)
    if nonzero and DURATION.fullmatch(value):
        return None
    return f"{where} {value!r} is not a Prometheus duration ({DURATION_FORMS}). {fix}"
