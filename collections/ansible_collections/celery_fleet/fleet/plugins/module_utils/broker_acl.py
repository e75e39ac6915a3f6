"""The broker's users: one Redis ACL user per component, each allowed only what it needs.

The default user is off. Every component connects as its own user, whose password is derived from
the one vaulted ``redis_password`` (HMAC-SHA256 with the component's name), so the inventory keeps one
secret, no host holds it, and one component's password tells nothing about another's. Redis stores
only each password's SHA-256 (``#<hex>``).

No user may run Redis's dangerous commands (``-@dangerous``: FLUSHALL, FLUSHDB, CONFIG, ACL, DEBUG,
SHUTDOWN, KEYS, MODULE and the like, which also stops ``CONFIG SET maxmemory-policy`` from making
Redis evict queued tasks). Only beat's user may write the lease key; the others may read it. The
metrics exporters' user may only read.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import urlencode

# component -> (what it does, the extra commands it needs beyond +@all -@dangerous)
COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "worker": ("the worker units", ()),
    "beat": ("the beat supervisor and beat; the only writer of the lease", ("info",)),
    "flower": ("Flower", ()),
    "admin": ("the playbooks, verify, status, pause and the canary", ("info",)),
    "metrics": ("the metrics exporters of the broker host; reads only", ("info",)),
}
# Components that may read keys and run read commands only.
READ_ONLY = frozenset({"metrics"})
# Named on top of -@dangerous, so that each rule reads as the issue of record states it.
REFUSED = ("flushall", "flushdb", "config", "acl", "debug", "shutdown", "keys", "module")
GLOB_SPECIAL = frozenset("*?[]\\^-")


def user_name(component: str) -> str:
    """The Redis user of a component: ``celery-worker``, ``celery-beat``, ..."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown broker component {component!r}; one of {', '.join(COMPONENTS)}")
    return f"celery-{component}"


def password(master: str, component: str) -> str:
    """The component's password: 64 hex characters derived from the vaulted master password."""
    user = user_name(component)
    return hmac.new(master.encode(), f"celery-fleet broker user {user}".encode(), hashlib.sha256).hexdigest()


def _glob_literal(char: str) -> str:
    return f"\\{char}" if char in GLOB_SPECIAL else char


def all_keys_but(key: str) -> list[str]:
    """Redis glob patterns that match every key except exactly ``key``.

    A key other than ``key`` either is a proper prefix of it, or extends it, or first differs from it
    at some position: one pattern for each case and position (ACL key patterns are allow-lists only).
    """
    if not key:
        raise ValueError("the excluded key must not be empty")
    literal = [_glob_literal(c) for c in key]
    patterns = ["".join(literal[:i]) for i in range(1, len(key))]  # proper prefixes, exactly
    patterns += ["".join(literal) + "?*"]  # longer keys that start with it
    patterns += ["".join(literal[:i]) + f"[^{literal[i]}]*" for i in range(len(key))]  # first difference
    return patterns


def acl_rules(master: str, component: str, lease_key: str) -> str:
    """The ``user`` line of a component for redis.conf (or an ACL file)."""
    digest = hashlib.sha256(password(master, component).encode()).hexdigest()
    if component == "beat":
        keys = ["~*"]
    elif component in READ_ONLY:
        keys = ["%R~*"]
    else:
        keys = [f"~{p}" for p in all_keys_but(lease_key)] + [f"%R~{''.join(map(_glob_literal, lease_key))}"]
    commands = [
        *(["+@read", "+@connection"] if component in READ_ONLY else ["+@all"]),
        "-@dangerous",
        *(f"-{c}" for c in REFUSED),
        *(f"+{c}" for c in COMPONENTS[component][1]),
    ]
    return " ".join([f"user {user_name(component)}", "reset", "on", f"#{digest}", *keys, "&*", *commands])


def acl_lines(master: str, lease_key: str) -> list[str]:
    """Every ``user`` line: the default user off, then one user per component."""
    return ["user default reset off", *(acl_rules(master, c, lease_key) for c in COMPONENTS)]


def broker_url(
    master: str, component: str, address: str, port: Any, db: Any, *, tls: dict | None = None
) -> str:
    """The URL a component connects with: ``redis://``, or ``rediss://`` when ``tls`` names the files.

    ``tls`` is ``{"ca": ..., "cert": ..., "key": ...}``: the client checks the broker's certificate (and
    its address) against the fleet's CA, and shows its host's own. Celery, kombu and redis-py all read
    these query parameters from the URL, so no app needs ``broker_use_ssl``.
    """
    base = f"{user_name(component)}:{password(master, component)}@{address}:{port}/{db}"
    if not tls:
        return f"redis://{base}"
    query = urlencode(
        {
            "ssl_cert_reqs": "required",
            "ssl_ca_certs": tls["ca"],
            "ssl_certfile": tls["cert"],
            "ssl_keyfile": tls["key"],
        },
        safe="/",
    )
    return f"rediss://{base}?{query}"
