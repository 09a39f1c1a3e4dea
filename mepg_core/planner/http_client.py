"""A bounded, cancellable HTTP POST for the planner's endpoint calls (standard library only).

One exchange (connect, send, read the whole reply) runs in a daemon worker thread on ``http.client``.
The caller waits for it in slices of :data:`POLL_S` seconds and checks a :class:`CallBudget` between
slices: when the budget's deadline passes or its cancel check says so, the socket is shut down (the
worker ends at once) and the caller gets :class:`~.errors.EndpointTimeoutError` or
:class:`~.errors.CallInterrupted` straight away. :func:`post` blocks the calling thread;
:func:`apost` awaits the same exchange without blocking an event loop.

The reply body is read whole, however the server writes it (``Content-Length``, chunked, many small
writes, until close) and refused past ``max_bytes``. A reply that is not valid HTTP (a garbage status
line, a body cut short, a broken chunk, a close without an answer) is
:class:`~.errors.EndpointBadResponseError`; only a failure to connect is
:class:`~.errors.EndpointUnreachableError`. Every message names the URL as :class:`Target` shows it:
without user-info and with query values masked. Proxies from the environment are not used (local
servers are the common case; ``aiohttp``, which ComfyUI's own requests use, ignores them too).
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import (
    BackendError,
    CallInterrupted,
    EndpointBadResponseError,
    EndpointResponseTooLargeError,
    EndpointTimeoutError,
    EndpointUnreachableError,
)

__all__ = ["POLL_S", "CallBudget", "HTTPReply", "Target", "apost", "asleep", "post", "sleep"]

#: how often a waiting caller checks the deadline and the cancel check (seconds)
POLL_S = 0.05


@dataclass(frozen=True)
class Target:
    """A parsed ``http(s)://host[:port]/path[?query]`` URL. ``shown`` is the form safe to print."""

    scheme: str
    host: str
    port: int
    path: str  # path + "?" + query, as sent in the request line
    shown: str

    @classmethod
    def parse(cls, url: str, what: str = "endpoint URL") -> Target:
        """Raise :class:`~.errors.BackendError` (never echoing a secret) for anything but a plain http(s) URL.

        User-info (``user:key@host``) is refused: it would be saved with the workflow and shown in logs.
        """
        if not isinstance(url, str) or not url.strip():
            raise BackendError(f"{what} is empty; give the server's base URL, e.g. http://127.0.0.1:11434/v1")
        url = url.strip()
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise BackendError(f"{what} is not a valid URL (check the host and the port number)") from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise BackendError(f"{what} must start with http:// or https:// and name a host")
        if "@" in parts.netloc:
            raise BackendError(f"{what} carries credentials (user:key@host), which would be saved with the "
                               "workflow and shown in logs; remove them and put the key in an environment "
                               "variable named in api_key_env")
        if not parts.hostname or any(c.isspace() for c in url):
            raise BackendError(f"{what} has no valid host name")
        host = parts.hostname
        port = port or (443 if parts.scheme == "https" else 80)
        path = parts.path or "/"
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
        shown_query = "&".join(f"{k}=***" for k, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        shown = f"{parts.scheme}://{netloc}{path}" + (f"?{shown_query}" if shown_query else "")
        return cls(parts.scheme, host, port, path + (f"?{parts.query}" if parts.query else ""), shown)


@dataclass
class CallBudget:
    """A total deadline (``seconds`` from now) and an optional cancel check for one call, retries included.

    ``should_cancel()`` returns true to cancel (it may also raise; the exception then propagates). It is
    called every :data:`POLL_S` seconds while a call waits, so it must be cheap.
    """

    seconds: float
    should_cancel: Callable[[], bool] | None = None
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def cancelled(self) -> bool:
        return self.should_cancel is not None and bool(self.should_cancel())

    def check(self, shown_url: str) -> None:
        """Raise :class:`~.errors.CallInterrupted` or :class:`~.errors.EndpointTimeoutError` when due."""
        if self.cancelled():
            raise CallInterrupted(f"the call to {shown_url} was interrupted")
        if self.remaining() <= 0:
            raise EndpointTimeoutError(f"{shown_url} did not answer within {self.seconds:g} s", url=shown_url)


@dataclass(frozen=True)
class HTTPReply:
    status: int
    body: bytes
    content_type: str = ""


class _Exchange:
    """One request in a worker thread; :meth:`abort` ends it from any thread."""

    def __init__(self, target: Target, body: bytes, headers: dict[str, str], max_bytes: int, budget: CallBudget):
        self.target = target
        self.budget_s = budget.seconds  # what messages say
        self.body = body
        self.headers = headers
        self.max_bytes = max_bytes
        self.timeout = max(0.001, budget.remaining())
        self.done = threading.Event()
        self.reply: HTTPReply | None = None
        self.error: BaseException | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False
        self._lock = threading.Lock()

    def start(self) -> _Exchange:
        threading.Thread(target=self._run, name="mepg-endpoint-call", daemon=True).start()
        return self

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sock = getattr(self._conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def result(self) -> HTTPReply:
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply

    def _run(self) -> None:
        try:
            self.reply = self._exchange()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            self.error = exc
        finally:
            conn = self._conn
            if conn is not None:
                conn.close()
            self.done.set()

    def _exchange(self) -> HTTPReply:
        t, shown = self.target, self.target.shown
        if t.scheme == "https":
            conn = http.client.HTTPSConnection(t.host, t.port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(t.host, t.port, timeout=self.timeout)
        with self._lock:
            self._conn = conn
        try:
            conn.connect()
        except TimeoutError:
            raise EndpointTimeoutError(f"{shown}: no connection within {self.budget_s:g} s", url=shown) from None
        except ssl.SSLError as exc:
            raise EndpointBadResponseError(f"{shown}: TLS handshake failed ({_reason(exc)})", url=shown) from None
        except OSError as exc:
            raise EndpointUnreachableError(f"cannot reach {shown}: {_reason(exc)}", url=shown) from None
        with self._lock:
            if self._aborted:
                raise CallInterrupted(f"the call to {shown} was stopped")
        try:
            conn.request("POST", t.path, body=self.body, headers=self.headers)
            resp = conn.getresponse()
            if resp.length is not None and resp.length > self.max_bytes:
                raise EndpointResponseTooLargeError(
                    f"{shown} answered {resp.length} bytes (HTTP {resp.status}); at most {self.max_bytes} are read",
                    url=shown, status=resp.status)
            data = resp.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                raise EndpointResponseTooLargeError(
                    f"{shown} answered more than {self.max_bytes} bytes (HTTP {resp.status})", url=shown,
                    status=resp.status)
            if resp.length:  # Content-Length promised more than arrived before the connection closed
                raise EndpointBadResponseError(
                    f"{shown} sent an incomplete answer: the connection closed {resp.length} bytes short of "
                    "its Content-Length", url=shown, status=resp.status)
            return HTTPReply(resp.status, data, resp.getheader("Content-Type", "") or "")
        except http.client.RemoteDisconnected:
            raise EndpointBadResponseError(f"{shown} accepted the connection but closed it without an HTTP answer",
                                           url=shown) from None
        except http.client.IncompleteRead as exc:
            raise EndpointBadResponseError(f"{shown} sent an incomplete answer ({len(exc.partial)} bytes, then "
                                           "the connection closed)", url=shown) from None
        except http.client.HTTPException as exc:
            raise EndpointBadResponseError(f"{shown} sent an invalid HTTP answer ({type(exc).__name__}: "
                                           f"{_short(str(exc))})", url=shown) from None
        except TimeoutError:
            raise EndpointTimeoutError(f"{shown} did not answer within {self.budget_s:g} s", url=shown) from None
        except OSError as exc:
            raise EndpointBadResponseError(f"{shown}: the connection failed during the exchange ({_reason(exc)})",
                                           url=shown) from None


def _reason(exc: BaseException) -> str:
    return _short(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def post(target: Target, body: bytes, headers: dict[str, str], *, budget: CallBudget, max_bytes: int) -> HTTPReply:
    """POST ``body`` and return the whole reply, whatever its status; bounded and cancellable by ``budget``."""
    budget.check(target.shown)
    exchange = _Exchange(target, body, headers, max_bytes, budget).start()
    try:
        while not exchange.done.wait(POLL_S):
            budget.check(target.shown)
    finally:
        if not exchange.done.is_set():
            exchange.abort()
    return exchange.result()


async def apost(target: Target, body: bytes, headers: dict[str, str], *, budget: CallBudget,
                max_bytes: int) -> HTTPReply:
    """:func:`post` for asyncio: the event loop stays free while the worker thread waits on the server."""
    budget.check(target.shown)
    exchange = _Exchange(target, body, headers, max_bytes, budget).start()
    try:
        while not exchange.done.is_set():
            await asyncio.sleep(POLL_S)
            if not exchange.done.is_set():
                budget.check(target.shown)
    finally:  # also when the awaiting task itself is cancelled
        if not exchange.done.is_set():
            exchange.abort()
    return exchange.result()


def sleep(seconds: float, budget: CallBudget, shown_url: str) -> None:
    """Wait ``seconds`` (a retry's backoff), checking ``budget`` every :data:`POLL_S` seconds."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        budget.check(shown_url)
        time.sleep(min(POLL_S, left))


async def asleep(seconds: float, budget: CallBudget, shown_url: str) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        budget.check(shown_url)
        await asyncio.sleep(min(POLL_S, left))
