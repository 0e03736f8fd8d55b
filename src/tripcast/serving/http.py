"""uvicorn's HTTP protocol (httptools) with the limits it lacks: a request's headers may take at most
``http_max_header_bytes`` (431 past it) and ``http_header_timeout_seconds`` from the connection or the previous
answer (408), and its body ``http_body_timeout_seconds`` (408). Without them one client could hold a
connection, and its memory, for as long as it liked by sending a byte at a time (uvicorn's keep-alive timer
restarts at every byte) or headers without end. And an answer's head leaves with its body, in one write.
``tripcast serve`` passes this class to uvicorn by name.
"""

from __future__ import annotations

import asyncio
from functools import cache

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tripcast.config import Settings, load_settings

TIMED_OUT = "tripcast.timed_out"  # set in a request's scope when its body did not arrive in time
_STATUS = {408: b"408 Request Timeout", 431: b"431 Request Header Fields Too Large"}


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"  # an interim answer: it goes at once


class _HeadWithBody:
    """A connection as one answer sees it: the head uvicorn writes first is held until the body's first write
    and leaves with it. Written apart, a replica killed between the two cut an answer whose head nginx had
    already passed on: too late to retry it on another replica, so the client saw a broken response."""

    __slots__ = ("_transport", "_head", "_held")

    def __init__(self, transport) -> None:
        self._transport, self._head, self._held = transport, None, False

    def write(self, data: bytes) -> None:
        if not self._held and data != _CONTINUE:
            self._head, self._held = data, True
            return
        if self._head is not None:
            data, self._head = self._head + data, None
        self._transport.write(data)

    def close(self) -> None:  # a head whose body never came is not sent: nginx retries a request with no answer
        self._head = None
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


@cache
def _limits() -> Settings:
    return load_settings()


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        settings = _limits()
        self._max_header = settings.http_max_header_bytes
        self._header_timeout = settings.http_header_timeout_seconds
        self._body_timeout = settings.http_body_timeout_seconds
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._deadline_body = False
        self._header_bytes = 0
        self._in_headers = False  # between a request's first byte and the end of its headers
        self._rejected = False  # answered 431 or 408 and closing: the rest of what arrives is ignored

    # --- the deadlines ----------------------------------------------------------------------------------
    # Arming and disarming only set a deadline (several times per request); one timer per connection looks
    # at it when it is due, and moves itself if the deadline moved: a timer per request cost ~4 % of req/s.
    def _arm(self, seconds: float, body: bool) -> None:
        self._deadline, self._deadline_body = self.loop.time() + seconds, body
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._due)

    def _disarm(self) -> None:
        self._deadline = None

    def _due(self) -> None:
        self._timer = None
        if self._deadline is None or self.transport.is_closing():
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._due)
            return
        self._expired(self._deadline_body)

    def _expired(self, body: bool) -> None:
        if body:  # the application waits for the body: it sees a disconnect, and answers 408 to the metrics
            self.scope[TIMED_OUT] = True
            if not self.cycle.response_started:
                self._answer(408, "the request body did not arrive in time")
            else:
                self.transport.close()
        elif self._in_headers:
            self._answer(408, "the request headers did not arrive in time")
        else:
            self.transport.close()  # idle between requests: close, as the keep-alive timeout would

    def _answer(self, status: int, message: str) -> None:
        """A plain-text answer written straight to the connection, which is then closed."""
        self._rejected = True
        body = message.encode()
        self.transport.write(b"HTTP/1.1 " + _STATUS[status] + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()

    # --- uvicorn's protocol, with the limits -------------------------------------------------------------
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._header_timeout, body=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        before = self._header_bytes
        super().data_received(data)
        if self._in_headers and not self.transport.is_closing():
            # Headers not complete yet: all of this chunk was header bytes (httptools keeps an unfinished header
            # in memory until it ends, so the callbacks alone would not bound it).
            self._header_bytes = max(self._header_bytes, before + len(data))
            if self._header_bytes > self._max_header:
                self._answer(431, f"request headers over {self._max_header:,} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._header_bytes = True, 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._rejected:
            return
        if self._header_bytes > self._max_header:
            self._answer(431, f"request headers over {self._max_header:,} bytes")
            return
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before and self.scope["method"] != "HEAD":  # a HEAD answer has no body to wait for
            self.cycle.transport = _HeadWithBody(self.transport)
        self._arm(self._body_timeout, body=True)

    def on_body(self, body: bytes) -> None:
        if not self._rejected:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._rejected:
            return
        super().on_message_complete()
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        idle = self.cycle is None or self.cycle.response_complete  # not a pipelined request starting
        if idle and not self.transport.is_closing():
            self._arm(self._header_timeout, body=False)
