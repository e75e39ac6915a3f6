"""The one size grammar of celery-fleet: worker limits, per-child caps, the broker's maxmemory, the budget.

A size is a number and a unit, always base 1024, the way systemd reads ``MemoryMax=``:

    size   := number unit
    number := digits [ "." digits ]
    unit   := ( "K" | "M" | "G" | "T" ) [ "B" | "iB" ]      (case-insensitive)

``512M``, ``1.5G``, ``4GiB`` and Redis's own ``512mb`` all parse; a bare number does not,
because systemd would read it as bytes, Celery's ``--max-memory-per-child`` as KiB and Redis
as bytes: the unit must be said. A size must come to at least one whole byte.
"""

from __future__ import annotations

import re
from typing import Any

UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
GRAMMAR = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<unit>[KMGT])(?:B|iB)?", re.IGNORECASE | re.ASCII)
# What every size error shows, so the fix is in the message.
FORMS = "a number and a unit, base 1024: 512M, 1.5G, 4GiB, 64K or 2T (a bare number is refused)"


def parse_size(value: Any) -> int | None:
    """Bytes in ``value``, or None when it is not a size of the grammar above."""
    if not isinstance(value, str):
        return None
    match = GRAMMAR.fullmatch(value)
    if not match:
        return None
    number = int(float(match["number"]) * UNITS[match["unit"].upper()])
    return number if number >= 1 else None


def size_error(where: str, value: Any, fix: str) -> str | None:
    """The message for a value that is not a size, or None when it is one."""
    if parse_size(value) is not None:
        return None
    return f"{where} {value!r} is not a size; write {FORMS}. {fix}"


def mib(size: int | float) -> str:
    """Bytes as whole MiB, for messages."""
    return f"{size / 1024**2:.0f}"
