"""Jinja filters for the rules every role shares: systemd quoting, the size grammar, what the fleet owns."""

from __future__ import annotations

from typing import Any

from ansible_collections.celery_fleet.fleet.plugins.module_utils import broker_acl
from ansible_collections.celery_fleet.fleet.plugins.module_utils.ownership import (
    CONTROL,
    ENV_NAME,
    LOGLEVELS,
    app_error,
    env_owner,
)
from ansible_collections.celery_fleet.fleet.plugins.module_utils.sizes import parse_size, size_error
from ansible_collections.celery_fleet.fleet.plugins.module_utils.systemd import env_assignment, exec_command
from ansible_collections.celery_fleet.fleet.plugins.module_utils.values import (
    address_error,
    duration_error,
    network_error,
    password_error,
    port_error,
)

DOCUMENTATION = r"""
name: systemd_exec
short_description: Quote a command for a unit's ExecStart=, one argument per list item
description:
  - C(systemd_exec) makes each item one double-quoted systemd word, with C(\), C(") and control characters
    escaped and C(%) and C($) doubled, so systemd passes it to the program unchanged, as one argument.
  - C(systemd_env(value)) is one C(NAME="value") line of an environment file that systemd reads back as
    exactly that value (C(\\) and C(") escaped).
  - C(size_bytes) is the bytes of a size of the fleet's one grammar (C(512M), C(1.5G)), or none.
  - C(size_errors(where, fix)) is [] for a size, else the message showing the accepted forms.
  - C(app_errors(where, fix)) is [] for what C(celery --app) takes, else the message.
  - C(loglevel_errors(where, fix)) is [] for a log level Celery takes, else the message.
  - C(port_errors(where, fix)) is [] for a TCP port (1-65535), else the message.
  - C(password_errors(where, fix)) is [] for a broker password (16+ URL-safe characters, no
    placeholder), else the message; the value itself never appears in it.
  - C(address_errors(where, fix, ipv6=true)) is [] for one IP address, else the message.
  - C(network_errors(where, fix)) is [] for one IP network (C(10.0.0.0/24)), else the message.
  - C(duration_errors(where, fix)) is [] for a non-zero Prometheus duration (C(90s), C(1h30m)), else the
    message.
  - C(broker_acl(lease_key)) of the master C(redis_password) is the broker's C(user) lines (the default
    user off, one user per component, worker, beat, flower and admin, passwords stored hashed).
  - C(broker_url(component, address, port, db, tls)) of the master is the URL of that component's user,
    with its derived password; C(rediss://) with the CA, certificate and key of C(tls) when it names them.
  - C(broker_password(component)) of the master is that component's derived password; C(broker_user) of
    a component, its Redis user.
  - C(env_errors(where, fix)) lists the problems of an environment mapping, among them the names the
    fleet owns (C(CELERY_*), C(FLOWER_*), the GPU pinning).
positional: _input
options:
  _input:
    description: The command and its arguments; a size; an environment mapping.
    type: raw
    required: true
"""

EXAMPLES = r"""
exec_start: "{{ ['/usr/bin/celery', '--app', 'pkg.apps.beat', 'beat'] | celery_fleet.fleet.systemd_exec }}"
maxmemory: "{{ redis_maxmemory | celery_fleet.fleet.size_bytes }}"
"""

RETURN = r"""
_value:
  description: The quoted command line; the bytes; the list of messages.
  type: raw
"""


def systemd_exec(argv: list[Any]) -> str:
    return exec_command(argv)


def systemd_env(name: str, value: Any) -> str:
    return env_assignment(name, value)


def size_bytes(value: Any) -> int | None:
    return parse_size(value)


def size_errors(value: Any, where: str, fix: str) -> list[str]:
    error = size_error(where, value, fix)
    return [error] if error else []


def app_errors(value: Any, where: str, fix: str) -> list[str]:
    error = app_error(where, value)
    return [f"{error} {fix}"] if error else []


def loglevel_errors(value: Any, where: str, fix: str) -> list[str]:
    if isinstance(value, str) and value.upper() in LOGLEVELS:
        return []
    return [f"{where} {value!r} is not one of {', '.join(LOGLEVELS)}. {fix}"]


def port_errors(value: Any, where: str, fix: str) -> list[str]:
    error = port_error(where, value, fix)
    return [error] if error else []


def password_errors(value: Any, where: str, fix: str) -> list[str]:
    error = password_error(where, value, fix)
    return [error] if error else []


def address_errors(value: Any, where: str, fix: str, ipv6: bool = True) -> list[str]:
    error = address_error(where, value, fix, ipv6)
    return [error] if error else []


def network_errors(value: Any, where: str, fix: str) -> list[str]:
    error = network_error(where, value, fix)
    return [error] if error else []


def duration_errors(value: Any, where: str, fix: str) -> list[str]:
    error = duration_error(where, value, fix)
    return [error] if error else []


def broker_acl_lines(master: str, lease_key: str) -> list[str]:
    return broker_acl.acl_lines(master, lease_key)


def broker_url(master: str, component: str, address: str, port: Any, db: Any, tls: Any = None) -> str:  # noqa: PLR0917 -- a filter's arguments
    return broker_acl.broker_url(master, component, address, port, db, tls=tls or None)


def broker_password(master: str, component: str) -> str:
    return broker_acl.password(master, component)


def broker_user(component: str) -> str:
    return broker_acl.user_name(component)


def env_errors(env: Any, where: str, fix: str) -> list[str]:
    if not isinstance(env, dict) or not all(isinstance(k, str) and ENV_NAME.fullmatch(k) for k in env):
        return [f"{where} must map environment variable names to values. {fix}"]
    errors = []
    for name, value in env.items():
        owner = env_owner(name)
        if owner:
            errors.append(f"{where}.{name} is the fleet's to set: {owner}. Fix: remove it from {where}.")
        elif isinstance(value, dict | list) or value is None or CONTROL.search(str(value)):
            errors.append(f"{where}.{name} {value!r} must be a string or a number, on one line. {fix}")
    return errors


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "systemd_exec": systemd_exec,
            "systemd_env": systemd_env,
            "size_bytes": size_bytes,
            "size_errors": size_errors,
            "env_errors": env_errors,
            "app_errors": app_errors,
            "loglevel_errors": loglevel_errors,
            "port_errors": port_errors,
            "password_errors": password_errors,
            "address_errors": address_errors,
            "network_errors": network_errors,
            "duration_errors": duration_errors,
            "broker_acl": broker_acl_lines,
            "broker_url": broker_url,
            "broker_password": broker_password,
            "broker_user": broker_user,
        }
