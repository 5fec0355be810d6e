"""What the command and a warm server say to each other over the server's Unix socket.

The command sends its standard streams (as file descriptors, SCM_RIGHTS) with one byte, then
the job as length-prefixed JSON: argv, working folder, environment, ``sys.path``. The server
(and the child, for a hand-back) answer with JSON lines: ``{"pid": n}`` once the child runs,
``{"restart": {name: value}}`` when the child hands the job back (``warm.FreshImports``), and
last ``{"exit": status}`` or ``{"signal": number}``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import asdict, dataclass

STREAMS = 3  # stdin, stdout, stderr
_LENGTH = struct.Struct("!I")


@dataclass(frozen=True)
class Job:
    argv: list[str]
    cwd: str
    env: dict[str, str]
    path: list[str]


def send_job(sock: socket.socket, job: Job, fds: list[int]) -> None:
    socket.send_fds(sock, [b"J"], fds)
    body = json.dumps(asdict(job)).encode()
    sock.sendall(_LENGTH.pack(len(body)) + body)


def receive_job(sock: socket.socket) -> tuple[Job, list[int]]:
    """The job and the descriptors of its streams (the caller closes them)."""
    marker, fds, _flags, _address = socket.recv_fds(sock, 1, STREAMS)
    if marker != b"J" or len(fds) != STREAMS:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("not a shrinkflow job request")
    (length,) = _LENGTH.unpack(_read_exactly(sock, _LENGTH.size))
    return Job(**json.loads(_read_exactly(sock, length))), fds


def send_message(sock: socket.socket, **message: object) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def messages(sock: socket.socket):
    """The JSON lines the server sends, until it closes the connection."""
    buffer = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the connection closed mid-request")
        data += chunk
    return data
