"""HTTP peers that misbehave on purpose, on loopback only (tests of the planner's endpoint calls and of
the ``/mepg/*`` routes).

- :class:`MisbehavingEndpoint`: an "OpenAI-compatible server" on raw sockets whose ``mode`` says how it
  answers each request (see :data:`MODES`). It counts requests and keeps each connection open until it
  is closed, so a client that gives up can be seen doing so.
- :func:`raw_exchange`: a client that sends a request in parts with pauses (slow writes, chunked
  bodies) and reads the whole reply.
"""

from __future__ import annotations

import json
import socket
import threading
import time

COMPLETION = json.dumps({"id": "x", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": '{"answer": "ok"}'}, "finish_reason": "stop"}]}
).encode()

MODES = {
    "ok": "one write: a valid completion",
    "split": "a valid completion in two writes 200 ms apart (headers and half the body, then the rest)",
    "chunked": "a valid completion, chunked, in 5 chunks 50 ms apart",
    "never": "accept, read the request, never answer",
    "drip": "headers promising a body, then one byte every 50 ms for ever",
    "huge_length": "Content-Length of 64 MiB, then a slow stream of bytes",
    "huge_chunked": "chunked, 1 MiB chunks without end",
    "garbage": "a line that is not HTTP",
    "close": "accept, read the request, close without a byte",
    "truncated": "Content-Length 400, 40 bytes, close",
    "bad_chunk": "chunked with an invalid chunk-size line",
    "html": "HTTP 200 with an HTML page",
    "http500": "HTTP 500 with a JSON error",
}


class MisbehavingEndpoint:
    """``with MisbehavingEndpoint("never") as ep: ep.url`` -> ``http://127.0.0.1:<port>/v1``."""

    def __init__(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self.requests = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.closed_by_client = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> MisbehavingEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for conn in self._conns:
                conn.close()
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket) -> bool:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            part = conn.recv(65536)
            if not part:
                return False
            data += part
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            part = conn.recv(65536)
            if not part:
                return False
            body += part
        with self._lock:
            self.requests += 1
        return True

    def _wait_for_close(self, conn: socket.socket, seconds: float = 120.0) -> None:
        """Hold the connection until the client closes it (or the server stops)."""
        conn.settimeout(0.05)
        end = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                if conn.recv(1) == b"":
                    self.closed_by_client.set()
                    return
            except TimeoutError:
                continue
            except OSError:
                self.closed_by_client.set()
                return

    def _handle(self, conn: socket.socket) -> None:
        try:
            if not self._read_request(conn):
                return
            getattr(self, "_mode_" + self.mode)(conn)
        except OSError:
            self.closed_by_client.set()
        finally:
            conn.close()

    @staticmethod
    def _head(status: str, headers: dict[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close", "", ""]
        return "\r\n".join(lines).encode()

    def _mode_ok(self, conn):
        conn.sendall(self._head("200 OK", {"Content-Type": "application/json",
                                           "Content-Length": str(len(COMPLETION))}) + COMPLETION)

    def _mode_split(self, conn):
        head = self._head("200 OK", {"Content-Type": "application/json", "Content-Length": str(len(COMPLETION))})
        half = len(COMPLETION) // 2
        conn.sendall(head + COMPLETION[:half])
        time.sleep(0.2)
        conn.sendall(COMPLETION[half:])

    def _mode_chunked(self, conn):
        conn.sendall(self._head("200 OK", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}))
        step = -(-len(COMPLETION) // 5)
        for i in range(0, len(COMPLETION), step):
            part = COMPLETION[i:i + step]
            conn.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            time.sleep(0.05)
        conn.sendall(b"0\r\n\r\n")

    def _mode_never(self, conn):
        self._wait_for_close(conn)

    def _mode_drip(self, conn):
        conn.sendall(self._head("200 OK", {"Content-Type": "application/json", "Content-Length": "100000"}))
        while not self._stop.is_set():
            conn.sendall(b" ")
            time.sleep(0.05)

    def _mode_huge_length(self, conn):
        conn.sendall(self._head("200 OK", {"Content-Type": "application/json",
                                           "Content-Length": str(64 * 2**20)}))
        while not self._stop.is_set():
            conn.sendall(b" " * 1024)
            time.sleep(0.01)

    def _mode_huge_chunked(self, conn):
        conn.sendall(self._head("200 OK", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}))
        chunk = b" " * 2**20
        while not self._stop.is_set():
            conn.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")

    def _mode_garbage(self, conn):
        conn.sendall(b"HELLO THERE, NOT HTTP\r\n\r\n")
        time.sleep(0.1)

    def _mode_close(self, conn):
        return

    def _mode_truncated(self, conn):
        conn.sendall(self._head("200 OK", {"Content-Type": "application/json", "Content-Length": "400"}) + b"{" * 40)

    def _mode_bad_chunk(self, conn):
        conn.sendall(self._head("200 OK", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
                     + b"zz\r\nhello\r\n0\r\n\r\n")
        time.sleep(0.1)

    def _mode_html(self, conn):
        page = b"<html><body>Welcome to nginx</body></html>"
        conn.sendall(self._head("200 OK", {"Content-Type": "text/html", "Content-Length": str(len(page))}) + page)

    def _mode_http500(self, conn):
        page = b'{"error": {"message": "model exploded"}}'
        conn.sendall(self._head("500 Internal Server Error", {"Content-Type": "application/json",
                                                              "Content-Length": str(len(page))}) + page)


def raw_exchange(port: int, parts: list[bytes], *, pause: float = 0.0, timeout: float = 30.0) -> tuple[int, bytes]:
    """Send ``parts`` to ``127.0.0.1:port`` with ``pause`` seconds between them; return (status, body).

    The server's reply is read until it closes the connection (requests should say ``Connection: close``).
    """
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for i, part in enumerate(parts):
                if i and pause:
                    time.sleep(pause)
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (and closed) before the whole request was sent
        try:
            while not _complete(data) and (got := sock.recv(65536)):
                data += got
        except ConnectionResetError:
            pass  # closed with unread request bytes: what arrived before is the answer
    if not data:
        raise ConnectionError(f"127.0.0.1:{port} closed the connection without an answer")
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def _complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole reply with a Content-Length (a server may linger before closing)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out


def post_request(path: str, body: bytes, *, chunked: bool = False, chunk_size: int = 4096,
                 content_length: int | None = None) -> list[bytes]:
    """The parts of a POST to ``path`` on loopback: headers, then the body in pieces (``chunked``
    transfer coding when asked). ``content_length`` overrides the header (to lie about the size)."""
    headers = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", "Connection: close"]
    if chunked:
        headers.append("Transfer-Encoding: chunked")
    else:
        headers.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    parts = ["\r\n".join(headers).encode() + b"\r\n\r\n"]
    for i in range(0, len(body), chunk_size):
        piece = body[i:i + chunk_size]
        parts.append(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
    if chunked:
        parts.append(b"0\r\n\r\n")
    return parts
