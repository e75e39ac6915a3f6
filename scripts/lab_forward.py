#!/usr/bin/env python3
"""Reach a port on a lab container's loopback from this machine's loopback.

Flower and Prometheus listen on their host's loopback only, as on a real fleet, where you would use
``ssh -L``. The lab's containers have no SSH, so each connection to ``127.0.0.1:LOCAL`` here is carried
through ``docker exec -i CONTAINER python3`` to ``127.0.0.1:PORT`` inside the container.

    scripts/lab_forward.py lab-broker 5555 9090      # Flower and Prometheus, until Ctrl-C
    scripts/lab_forward.py lab-broker 9090:19090     # container port 9090 on local port 19090
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import threading

# Runs in the container: stdin to the port, the port to stdout.
RELAY = """\
import socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    while data := sys.stdin.buffer.read1(65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
"""


def pump(read, write, done) -> None:
    with contextlib.suppress(OSError, ValueError):
        while data := read(65536):
            write(data)
    done()


def carry(client: socket.socket, container: str, port: int) -> None:
    """One connection: the client's bytes to the container's port and back, until either side closes."""
    relay = subprocess.Popen(
        ["docker", "exec", "-i", container, "python3", "-c", RELAY, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )

    def to_container(data: bytes) -> None:
        relay.stdin.write(data)
        relay.stdin.flush()

    def close_container() -> None:
        with contextlib.suppress(OSError):
            relay.stdin.close()

    def close_client() -> None:
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)

    up = threading.Thread(target=pump, args=(client.recv, to_container, close_container), daemon=True)
    up.start()
    pump(relay.stdout.read1, client.sendall, close_client)
    up.join(timeout=5)
    relay.wait(timeout=5)
    client.close()


def serve(container: str, port: int, local: int) -> socket.socket:
    """Listen on 127.0.0.1:``local`` (0: any free port) in a thread; return the socket (close it to stop)."""
    listener = socket.create_server(("127.0.0.1", local))

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                threading.Thread(target=carry, args=(client, container, port), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("container")
    parser.add_argument("ports", nargs="+", help="PORT, or PORT:LOCAL to listen on another local port")
    args = parser.parse_args(argv)
    for spec in args.ports:
        port, _, local = spec.partition(":")
        serve(args.container, int(port), int(local or port))
        print(f"http://127.0.0.1:{local or port}/  ->  {args.container} 127.0.0.1:{port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
