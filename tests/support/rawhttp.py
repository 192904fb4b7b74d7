"""HTTP/1.1 written by hand on a socket, for what a polite client (httpx, h11) never sends: `Transfer-Encoding: Chunked`
in another case, a declared length with no body behind it, a body that never ends."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes

    def json(self):
        return json.loads(self.body)


def chunked(body: bytes, size: int = 65_536, end: bool = True) -> list[bytes]:
    """`body` framed as HTTP chunks of `size` bytes, with the closing empty chunk unless `end` is false (a body that
    has not ended: a server must answer from what it has)."""
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return [*parts, b"0\r\n\r\n"] if end else parts


def request(port: int, method: str, path: str, headers: dict[str, str], parts: Iterable[bytes] = (),
            timeout: float = 10.0) -> RawResponse:
    """Send `method path` with exactly `headers` (nothing added: no Host unless given) and then each of `parts` as
    it is, which need not make a whole body: the answer must then come without the rest. Reads until the answer
    is complete (its Content-Length) or the server closes. A server that answers before reading everything may
    close while parts are still unsent; that is not an error here. (The socket is never half-closed: uvicorn
    takes that for a client that went away.)"""
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in
                                                  {**headers, "Connection": "close"}.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        try:
            for part in parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while not _complete(data) and (chunk := sock.recv(65_536)):
                data += chunk
        except ConnectionResetError:
            if not data:
                raise
    return _parse(data)


def _complete(data: bytes) -> bool:
    """A whole response with a Content-Length is in `data`."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _parse(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        raise AssertionError(f"no HTTP response: {data[:200]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return RawResponse(int(lines[0].split()[1]), headers, body)
