"""systemd's notify protocol (sd_notify(3)): one datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET``.

The protocol is a stable, documented interface of a few lines, so it is written here rather than taken
from a library: ``sdnotify`` has had no release since 2017, and ``systemd-python`` is a C extension that
needs libsystemd's headers to build, which an offline wheelhouse cannot count on.
"""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    """Sends states to systemd, or nothing when the process was not started by a notify unit."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        # Taken out of the environment, so that task code (and prefork's children) cannot speak for the unit.
        address = environ.pop("NOTIFY_SOCKET", "")
        watchdog_pid = environ.pop("WATCHDOG_PID", "")
        watchdog_usec = environ.pop("WATCHDOG_USEC", "")
        self._socket: socket.socket | None = None
        if address:
            if address.startswith("@"):  # an abstract socket
                address = "\0" + address[1:]
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.connect(address)
        # The watchdog interval, in seconds, if systemd asked this very process for pings.
        self.watchdog: float | None = None
        if watchdog_usec and (not watchdog_pid or int(watchdog_pid) == os.getpid()):
            self.watchdog = int(watchdog_usec) / 1e6
        self.pid = os.getpid()

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **states: str | int) -> None:
        """Send ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``... as keyword arguments (``READY=1``)."""
        if self._socket is None or os.getpid() != self.pid:  # a forked child is not the unit's main process
            return
        message = "\n".join(f"{key}={value}" for key, value in states.items())
        # systemd restarted or the socket is gone: nothing to tell, and the worker must not stop for it.
        with contextlib.suppress(OSError):
            self._socket.send(message.encode())
